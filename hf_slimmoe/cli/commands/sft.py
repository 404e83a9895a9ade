"""`slimmoe sft`: SFT with distillation from an instruct teacher (TRL `SFTTrainer` + KD loss)."""

from __future__ import annotations

from .base import DataclassCommand, check_output_dir


class SFTCommand(DataclassCommand):
    name = "sft"
    help = "SFT with distillation from an instruct teacher (TRL SFTTrainer + the KD loss of --kd_loss)"
    trainer_config = "SFTDistillationConfig"
    sections = ("hub",)

    @property
    def description(self) -> str:
        return (
            f"{self.help}. RECIPE.yaml (or --config RECIPE.yaml) holds the fields of hf_slimmoe.posttrain."
            f"PostTrainScriptArguments, trl.ModelConfig and {self.trainer_config}, plus an optional hub: section "
            "(hf_slimmoe.hub.HubSettings); any field can be overridden as --field value. "
            f"`slimmoe {self.name} RECIPE.yaml --help` lists every field, with the recipe's values as defaults. "
            "Runs under `accelerate launch` / `torchrun` unchanged."
        )

    def dataclass_types(self) -> tuple[type, ...]:
        from trl import ModelConfig

        from ...posttrain import PostTrainScriptArguments, SFTDistillationConfig

        return PostTrainScriptArguments, ModelConfig, SFTDistillationConfig

    def field_defaults(self) -> dict:
        from ...posttrain import MODEL_DEFAULTS

        return MODEL_DEFAULTS

    def run(self, args, extra_args) -> int:
        from ...hub import HubSettings

        (script_args, model_args, config), sections = self.parse(extra_args)
        check_output_dir(config.output_dir, "output_dir", resumable=True)  # its checkpoints are resumed from
        hub = sections.get("hub")
        if hub is not None:
            HubSettings.from_dict(hub)  # validate before any work
        print(f"{self.name}: saved {self.train(script_args, model_args, config, hub)}")
        return 0

    def train(self, script_args, model_args, config, hub) -> str:
        """Train, save, write the card and publish; returns the output directory."""
        from ...posttrain import run_sft

        return run_sft(script_args, model_args, config, hub)
