"""The `slimmoe` entry point: one parser with a sub-parser per command, and the error boundary around them."""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import Command, get_commands

COMMANDS: dict[str, Command] = {command.name: command for command in get_commands()}


def build_parser() -> argparse.ArgumentParser:
    """The `slimmoe` parser; building it imports nothing heavy, so `slimmoe --help` is quick."""
    parser = argparse.ArgumentParser(
        prog="slimmoe",
        description="SlimMoE: compress a Mixture-of-Experts LM by expert slimming and staged distillation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `slimmoe ARGV`; returns the exit status."""
    parser = build_parser()
    args, extra_args = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = COMMANDS[args.command]
    if extra_args and not command.takes_extra_args:
        parser.error(f"unrecognized arguments: {' '.join(extra_args)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return command.run(args, extra_args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"slimmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
