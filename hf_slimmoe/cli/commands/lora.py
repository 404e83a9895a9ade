"""`slimmoe lora`: LoRA fine-tuning (PEFT; optionally the fused expert parameters), adapter saved and merged."""

from __future__ import annotations

from .sft import SFTCommand


class LoraCommand(SFTCommand):
    name = "lora"
    help = "LoRA fine-tuning (PEFT; optionally the fused expert parameters), adapter saved and merged"

    def train(self, script_args, model_args, config, hub) -> str:
        model_args.use_peft = True
        return super().train(script_args, model_args, config, hub)
