"""The `slimmoe` command line, shaped like `trl`'s: `main.py` is the entry point, `commands/` has one module per
sub-command. `slimmoe COMMAND --help` documents each; `python -m hf_slimmoe.cli` and `torchrun -m hf_slimmoe.cli`
run the same thing."""

from .main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
