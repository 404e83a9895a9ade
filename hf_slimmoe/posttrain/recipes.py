"""Post-training recipes: a flat YAML of config fields (+ an optional `hub:` section), parsed with TRL's `TrlParser`
into `(PostTrainScriptArguments, trl.ModelConfig, SFTDistillationConfig | trl.DPOConfig, hub)`."""

from __future__ import annotations

import os
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
    import yaml
    from trl import TrlParser

    if kind not in ("sft", "lora", "dpo"):
        raise ValueError(f"Unknown post-training kind {kind!r}; use 'sft', 'lora' or 'dpo'.")
    values: dict[str, Any] = {}
    if recipe is not None:
        if not os.path.isfile(recipe):
            raise FileNotFoundError(f"No recipe file at {recipe}.")
        with open(recipe) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{recipe} must hold a YAML mapping of config fields.")
    hub = values.pop("hub", None)
    if hub is not None:
        from ..hub import HubSettings

        HubSettings.from_dict(hub)  # validate before any work
    config_cls = DPOConfig if kind == "dpo" else SFTDistillationConfig
    parser = TrlParser((PostTrainScriptArguments, ModelConfig, config_cls))
    parser.set_defaults(**MODEL_DEFAULTS)
    unknown = parser.set_defaults_with_config(**values)
    if unknown:
        keys = ", ".join(k.lstrip("-") for k in unknown[::2])
        raise ValueError(f"Unknown key(s) in {recipe}: {keys}; `slimmoe {kind} RECIPE --help` lists the fields.")
    script_args, model_args, config = parser.parse_args_into_dataclasses(args=list(overrides or []))
    if kind == "lora":
        model_args.use_peft = True
    return script_args, model_args, config, hub


def run_recipe(kind: str, recipe: str | None, overrides: list[str] | None = None) -> str:
    """`slimmoe sft | lora | dpo RECIPE.yaml [--field value ...]`: parse, train, save, card, publish; returns it."""
    script_args, model_args, config, hub = parse_recipe(kind, recipe, overrides)
    run = run_dpo if kind == "dpo" else run_sft
    return run(script_args, model_args, config, hub)


__all__ = ["MODEL_DEFAULTS", "parse_recipe", "run_recipe"]
