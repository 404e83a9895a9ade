"""The `slimmoe` entry point: one parser with a sub-parser per command, and the error boundary around them.

The boundary: an expected failure (a bad argument, a missing or damaged file, a refused output directory, a value
a library rejects: `ValueError`, `OSError` and safetensors' errors) prints one line, `slimmoe COMMAND: error: ...`,
and exits with status 2 (`--log-level DEBUG` adds its traceback). Anything else is a bug and keeps its traceback.
Ctrl-C prints how to resume and exits with 130. On the way out, on every rank, the command's `torch.distributed`
process group is destroyed and tqdm's monitor thread stopped, so a finished multi-process job exits 0.
"""

from __future__ import annotations

import logging
import sys
import threading

from .commands import Command, get_commands
from .commands.base import ArgumentParser

logger = logging.getLogger("hf_slimmoe")

COMMANDS: dict[str, Command] = {command.name: command for command in get_commands()}
INTERRUPTED = "interrupted; run the same command again to resume"


def build_parser() -> ArgumentParser:
    """The `slimmoe` parser; building it imports nothing heavy, so `slimmoe --help` is quick."""
    parser = ArgumentParser(
        prog="slimmoe",
        description="SlimMoE: compress a Mixture-of-Experts LM by expert slimming and staged distillation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.register(subparsers)
    return parser


def is_expected(error: BaseException) -> bool:
    """Whether `error` is a failure a user can fix from its message (printed as one line) rather than a bug."""
    if isinstance(error, (ValueError, OSError)):
        return True
    return type(error).__name__ == "SafetensorError"  # safetensors' Rust errors: a damaged weights file


def one_line(error: BaseException) -> str:
    """The error's message on one line (or its type when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def release_resources() -> None:
    """
    End what a command may have started: the default `torch.distributed` process group (its gloo/NCCL threads must
    not outlive the interpreter, or a finished rank aborts at exit and torchrun reports the job failed) and tqdm's
    monitor threads. Runs on every rank; imports nothing heavy that is not already loaded.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        from ..utils.distributed import destroy_process_group

        try:
            destroy_process_group()
        except Exception:  # never hide the command's own outcome
            logger.warning("Could not destroy the torch.distributed process group.", exc_info=True)
    monitor_class = getattr(sys.modules.get("tqdm._monitor"), "TMonitor", None)
    for thread in threading.enumerate():  # one monitor per tqdm class used (tqdm, tqdm.auto, ...)
        if monitor_class is not None and isinstance(thread, monitor_class):
            thread.exit()
            thread.tqdm_cls.monitor = None


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
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return command.run(args, extra_args) or 0
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as e:
        if not is_expected(e):
            raise
        logger.debug("slimmoe %s failed:", args.command, exc_info=True)
        print(f"slimmoe {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        release_resources()


if __name__ == "__main__":
    sys.exit(main())
