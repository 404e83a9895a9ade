"""The `slimmoe` sub-commands, one per module, in the order `slimmoe --help` lists them."""

from .base import Command, DataclassCommand
from .cache_teacher import CacheTeacherCommand
from .card import CardCommand
from .compress import CompressCommand
from .demo import DemoCommand
from .distill import DistillCommand
from .dpo import DPOCommand
from .eval import EvalCommand
from .export import ExportCommand
from .info import InfoCommand
from .lora import LoraCommand
from .plan import PlanCommand
from .prune import PruneCommand
from .push import PushCommand
from .score import ScoreCommand
from .sft import SFTCommand


def get_commands() -> list[Command]:
    """Every `slimmoe` sub-command: the method's steps in order, then the whole pipeline and the tools around it."""
    return [
        PlanCommand(),
        ScoreCommand(),
        PruneCommand(),
        CacheTeacherCommand(),
        DistillCommand(),
        CompressCommand(),
        SFTCommand(),
        DPOCommand(),
        LoraCommand(),
        CardCommand(),
        PushCommand(),
        InfoCommand(),
        ExportCommand(),
        EvalCommand(),
        DemoCommand(),
    ]


__all__ = ["Command", "DataclassCommand", "get_commands"]
