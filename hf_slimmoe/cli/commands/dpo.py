"""`slimmoe dpo`: DPO on the SFT model (TRL `DPOTrainer`)."""

from __future__ import annotations

from .sft import SFTCommand


class DPOCommand(SFTCommand):
    name = "dpo"
    help = "DPO on the SFT model (TRL DPOTrainer)"
    trainer_config = "trl.DPOConfig"

    def dataclass_types(self) -> tuple[type, ...]:
        from trl import DPOConfig, ModelConfig

        from ...posttrain import PostTrainScriptArguments

        return PostTrainScriptArguments, ModelConfig, DPOConfig

    def train(self, script_args, model_args, config, hub) -> str:
        from ...posttrain import run_dpo

        return run_dpo(script_args, model_args, config, hub)
