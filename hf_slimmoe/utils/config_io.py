"""Config files: YAML mappings read with errors naming the file (`read_yaml_mapping`), config dataclasses parsed from a
YAML file and command-line flags as TRL's scripts do (`parse_config_file`), settings merged (`merge_settings`) and the
path templates `{stdlib}` / `{recipe_dir}` (`expand_path`).
"""

from __future__ import annotations

import copy
import os
import sysconfig
from typing import Any

import yaml


def expand_path(path: str, recipe_dir: str | None = None) -> str:
    """Substitute `{stdlib}` (Python's standard library source directory) and `{recipe_dir}`, expand `~`."""
    path = path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    if recipe_dir is not None:
        path = path.replace("{recipe_dir}", recipe_dir)
    return os.path.expanduser(path)


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is an empty mapping); errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:  # a binary file fails to decode as UTF-8
            raise ValueError(f"{path} is not a valid YAML text file: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a YAML mapping of names to values, got {type(values).__name__}.")
    return values


def parse_config_file(
    dataclass_types: tuple[type, ...],
    config_path: str | os.PathLike | None,
    args: list[str] | None = None,
    defaults: dict[str, Any] | None = None,
    sections: tuple[str, ...] = (),
    help_command: str = "--help",
    parser_class: type | None = None,
    **parser_kwargs,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """
    Parse a YAML file of config-dataclass fields and command-line flags, as TRL's scripts do (`trl.TrlParser`).

    The file's keys are field names and flags (`--learning_rate 1e-5`) override them; as in TRL, an `env:` mapping
    sets environment variables. Top-level keys named in `sections` (e.g. `hub`) are not fields: they are taken out and
    returned beside the instances. `defaults` are field defaults that differ from the dataclasses' own. An unknown key
    raises `ValueError` naming the file and `help_command` (which lists the fields). `parser_class` (a `TrlParser`
    subclass) and `parser_kwargs` (`prog`, `description`) shape the parser.

    Returns:
        `(instances, {section: value})`, one instance per dataclass type, in order.
    """
    from trl import TrlParser

    parser = (parser_class or TrlParser)(dataclass_types, **parser_kwargs)
    parser.set_defaults(**(defaults or {}))
    values = read_yaml_mapping(config_path) if config_path is not None else {}
    found = {key: values.pop(key) for key in sections if key in values}
    env = values.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ValueError(f"`env` in {config_path} must be a mapping of environment variables to values.")
    os.environ.update({str(key): str(value) for key, value in env.items()})
    unknown = parser.set_defaults_with_config(**values)
    if unknown:
        keys = ", ".join(key.lstrip("-") for key in unknown[::2])
        raise ValueError(f"Unknown key(s) in {config_path}: {keys}; `{help_command}` lists the fields.")
    return tuple(parser.parse_args_into_dataclasses(args=list(args or []))), found


def merge_settings(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in recursively (mappings merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


__all__ = [
    "expand_path",
    "read_yaml_mapping",
    "parse_config_file",
    "merge_settings",
]
