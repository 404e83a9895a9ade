"""What every `slimmoe` sub-command shares: the `Command` base class and the YAML + flags parsing of config dataclasses.

Modules in this package import nothing heavy at module level (no torch, transformers, TRL, datasets): `slimmoe --help`
builds every command's parser, and only the command that runs imports what it needs, inside `run`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

LOG_LEVEL_HELP = "logging level of hf_slimmoe: DEBUG, INFO, WARNING, ERROR (default: INFO)"


class Command:
    """
    One `slimmoe` sub-command.

    Subclasses set `name`, `help` (one line for `slimmoe --help`) and `description` (the paragraph of
    `slimmoe NAME --help`), declare their arguments in `add_arguments` and do the work in `run`.
    """

    name: str = ""
    help: str = ""
    description: str = ""
    takes_extra_args: bool = False  # True: arguments the sub-parser does not know are passed to `run`

    def register(self, subparsers) -> argparse.ArgumentParser:
        """Add this command's parser to `subparsers` (every command takes `--log-level`)."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description)
        self.add_arguments(parser)
        parser.add_argument("--log-level", default="INFO", help=LOG_LEVEL_HELP)
        return parser

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the command's arguments on `parser`."""

    def run(self, args: argparse.Namespace, extra_args: list[str]) -> int:
        """Run the command; returns the exit status. `extra_args` is empty except for `DataclassCommand`s."""
        raise NotImplementedError


class DataclassCommand(Command):
    """
    A command whose options are the fields of config dataclasses, parsed by `trl.TrlParser` as TRL's scripts do:

        slimmoe NAME [CONFIG.yaml] [--config CONFIG.yaml] [--field value ...]

    The YAML file's keys are the field names; flags given on the command line override the file. As in TRL, an `env:`
    mapping sets environment variables. Top-level keys named in `sections` (e.g. `hub`) are not fields: they are taken
    out of the file and returned beside the dataclasses.
    `slimmoe NAME --help` lists every field (with the file's values as defaults when a file is given).
    """

    sections: tuple[str, ...] = ()
    takes_extra_args = True

    def register(self, subparsers) -> argparse.ArgumentParser:
        # The real parser is built from the dataclasses in `parse` (importing them is slow): this one only takes
        # --log-level and leaves every other argument, -h included, to `run`.
        parser = subparsers.add_parser(self.name, help=self.help, add_help=False, allow_abbrev=False)
        parser.add_argument("--log-level", default="INFO", help=LOG_LEVEL_HELP)
        return parser

    def dataclass_types(self) -> tuple[type, ...]:
        """The config dataclasses whose fields are this command's options."""
        raise NotImplementedError

    def field_defaults(self) -> dict[str, Any]:
        """Defaults of dataclass fields that differ for this command (the YAML file and flags override them)."""
        return {}

    def parse(self, argv: list[str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Parse `argv` (what follows the command name) into `(dataclass instances, {section: value})`."""
        from trl import TrlParser

        parser = TrlParser(self.dataclass_types(), prog=f"slimmoe {self.name}", description=self.description)
        parser.set_defaults(**self.field_defaults())
        config_path, argv = split_config_path(argv)
        values = read_yaml_mapping(config_path) if config_path is not None else {}
        sections = {key: values.pop(key) for key in self.sections if key in values}
        env = values.pop("env", None) or {}
        if not isinstance(env, dict):
            raise ValueError(f"`env` in {config_path} must be a mapping of environment variables to values.")
        os.environ.update({str(key): str(value) for key, value in env.items()})
        unknown = parser.set_defaults_with_config(**values)
        if unknown:
            keys = ", ".join(key.lstrip("-") for key in unknown[::2])
            raise ValueError(f"Unknown key(s) in {config_path}: {keys}; `slimmoe {self.name} --help` lists the fields.")
        return tuple(parser.parse_args_into_dataclasses(args=argv)), sections


def split_config_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take the config file out of `argv`: `--config FILE`, `--config=FILE`, or a first argument that is not a flag."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 == len(argv):
                raise ValueError("--config needs a YAML file path.")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def read_yaml_mapping(path: str) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is an empty mapping); errors name the file."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No config file at {path}.")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a valid YAML text file: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a YAML mapping of field names to values.")
    return values
