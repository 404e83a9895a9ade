"""What every `slimmoe` sub-command shares: the `Command` base class, the YAML + flags parsing of config dataclasses,
and the checks of paths and sizes that run before any work.

Modules in this package import nothing heavy at module level (no torch, transformers, TRL, datasets): `slimmoe --help`
builds every command's parser, and only the command that runs imports what it needs, inside `run`.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """Every command's `--log-level` (of hf_slimmoe's own logging; `--log_level` of a trainer config is another)."""
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        help="logging level: DEBUG, INFO, WARNING, ERROR (default: INFO); DEBUG also shows the "
                        "traceback of an error")


def one_line_error(parser: argparse.ArgumentParser, message: str):
    """`ArgumentParser.error` as one line (the argument and the problem) and exit status 2, without the usage block."""
    parser.exit(2, f"{parser.prog}: error: {message} (`{parser.prog} --help` lists the arguments)\n")


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line; sub-parsers made by `add_subparsers` inherit the class."""

    error = one_line_error


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
        add_log_level(parser)
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
        add_log_level(parser)
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

        from ...utils.config_io import parse_config_file

        class CommandParser(TrlParser):
            error = one_line_error

        config_path, argv = split_config_path(argv)
        return parse_config_file(self.dataclass_types(), config_path, argv, defaults=self.field_defaults(),
                                 sections=self.sections, help_command=f"slimmoe {self.name} --help",
                                 parser_class=CommandParser, prog=f"slimmoe {self.name}", description=self.description)


def positive_int(text: str) -> int:
    """argparse type of counts and sizes (`--block-size`, `--batch-size`, ...): an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_path(path: str, name: str) -> str:
    """
    Check a model argument before anything loads it: a local directory with a `config.json` (or a LoRA
    `adapter_config.json`) whose safetensors files have a readable header, or, when no such path exists, a Hub id
    (`org/name`, downloaded by `from_pretrained`). Raises naming `name` (the argument) and the path.
    """
    if not os.path.exists(path):
        if _HUB_ID.fullmatch(path) and not path.startswith((".", "/")):
            return path
        raise FileNotFoundError(f"{name} {path} does not exist: pass a model directory (config.json and "
                                "*.safetensors) or a Hub id such as org/model.")
    if not os.path.isdir(path):
        raise ValueError(f"{name} {path} is a file: pass the model's directory (config.json and *.safetensors).")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(f"{name} {path} has no config.json: pass a saved model directory.")
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        check_safetensors_header(os.path.join(path, file))
    return path


def check_safetensors_header(path: str) -> None:
    """Raise `ValueError` naming `path` when it is empty, truncated or not a safetensors file, and what to do."""
    from ...utils.outputs import check_safetensors

    try:
        check_safetensors(path)
    except ValueError as e:
        raise ValueError(f"{e} Re-create it: re-run the command that wrote it, or download it again.") from None


def check_output_dir(path: str, name: str, overwrite: bool = False, resumable: bool = False) -> None:
    """
    Check a directory a command writes into: it is not a file, and it is empty or missing unless `overwrite` (then
    it must hold a model, so that `--overwrite` never replaces a directory of something else) or `resumable` (a
    command that continues what an earlier run left there).
    """
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise ValueError(f"{name} {path} is a file, not a directory: choose another path or remove the file.")
    entries = os.listdir(path)
    if not entries or resumable:
        return
    if not overwrite:
        raise ValueError(f"{name} {path} exists and is not empty; choose a new directory, or pass --overwrite to "
                         "replace the model in it.")
    if not {"config.json", "adapter_config.json"} & set(entries):
        raise ValueError(f"{name} {path} is not empty and holds no model (no config.json); --overwrite only "
                         "replaces a model directory: choose a new directory.")


def check_output_file(path: str, name: str) -> None:
    """Check a file a command writes: not a directory, and its directory can be created."""
    if os.path.isdir(path):
        example = os.path.join(path, "scores.safetensors")
        raise ValueError(f"{name} {path} is a directory: pass a file path, e.g. {example}.")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"{name} {path}: {parent} is a file, not a directory.")


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
