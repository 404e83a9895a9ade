"""Post-training recipes: a flat YAML of config fields (+ an optional `hub:` section), parsed with TRL's `TrlParser`
into `(PostTrainScriptArguments, trl.ModelConfig, SFTDistillationConfig | trl.DPOConfig, hub)`."""

from __future__ import annotations

from typing import Any

from trl import DPOConfig, ModelConfig

from .config import PostTrainScriptArguments, SFTDistillationConfig
from .run import run_dpo, run_sft

# Defaults of `trl.ModelConfig` fields that differ in recipes: models load in the dtype they are stored in, and LoRA
# has no dropout (PEFT's adapters on parameters, `lora_target_parameters`, work only without it)
MODEL_DEFAULTS = {"dtype": "auto", "lora_dropout": 0.0}


def parse_recipe(
    kind: str, recipe: str | None, overrides: list[str] | None = None
) -> tuple[PostTrainScriptArguments, ModelConfig, SFTDistillationConfig | DPOConfig, dict[str, Any] | None]:
    """
    Parse a post-training recipe (YAML) and command-line overrides into `(script_args, model_args, config, hub)`.

    `kind` is `"sft"`, `"lora"` (SFT with `use_peft=True`) or `"dpo"`. The YAML's keys are the fields of
    [`PostTrainScriptArguments`], of `trl.ModelConfig` (model, dtype, LoRA) and of [`SFTDistillationConfig`] /
    `trl.DPOConfig`, flat, plus an optional `hub:` mapping of `hf_slimmoe.hub.HubSettings` keys. Flags
    (`--learning_rate 1e-5`) override the YAML; an unknown key raises. `MODEL_DEFAULTS` lists the `ModelConfig`
    defaults that differ (`dtype: auto`, `lora_dropout: 0.0`).
    """
    from ..utils.config_io import parse_config_file

    if kind not in ("sft", "lora", "dpo"):
        raise ValueError(f"Unknown post-training kind {kind!r}; use 'sft', 'lora' or 'dpo'.")
    config_cls = DPOConfig if kind == "dpo" else SFTDistillationConfig
    (script_args, model_args, config), sections = parse_config_file(
        (PostTrainScriptArguments, ModelConfig, config_cls), recipe, overrides, defaults=MODEL_DEFAULTS,
        sections=("hub",), help_command=f"slimmoe {kind} RECIPE --help")
    hub = sections.get("hub")
    if hub is not None:
        from ..hub import HubSettings

        HubSettings.from_dict(hub)  # validate before any work
    if kind == "lora":
        model_args.use_peft = True
    return script_args, model_args, config, hub


def run_recipe(kind: str, recipe: str | None, overrides: list[str] | None = None) -> str:
    """`slimmoe sft | lora | dpo RECIPE.yaml [--field value ...]`: parse, train, save, card, publish; returns it."""
    script_args, model_args, config, hub = parse_recipe(kind, recipe, overrides)
    run = run_dpo if kind == "dpo" else run_sft
    return run(script_args, model_args, config, hub)


__all__ = ["MODEL_DEFAULTS", "parse_recipe", "run_recipe"]
