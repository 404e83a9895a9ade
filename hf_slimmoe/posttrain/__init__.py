"""Post-training of a compressed SlimMoE model: SFT with distillation, DPO and LoRA, on TRL and PEFT.

- [`SFTDistillationTrainer`] (`trainer.py`) is `trl.SFTTrainer` (chat templates, packing, completion-only /
  assistant-only loss, every dataset format) whose loss mixes the usual cross-entropy with the top-k KD loss against an
  instruct teacher, online or from a cached top-k pass over the formatted SFT data; [`SFTDistillationConfig`]
  (`config.py`) is `trl.SFTConfig` plus the KD fields.
- DPO is `trl.DPOTrainer` unchanged (reference model handling as TRL does it); [`run_dpo`] wires it to a recipe.
- LoRA is PEFT's `LoraConfig` from TRL's `ModelConfig` (`use_peft`, `lora_*`; the fused expert parameters through
  `lora_target_parameters`), trained with the SFT trainer and merged back into a checkpoint that `from_pretrained`
  loads ([`run_sft`], [`save_lora`] in `run.py`).
- Recipes (`recipes.py`): flat YAML of the fields of [`PostTrainScriptArguments`] (`trl.ScriptArguments` + ours),
  `trl.ModelConfig` and the trainer config, parsed with `TrlParser`. Data (`chat_data.py`): the recipe's splits in a
  TRL format, or `builtin:stdlib-docstrings`; `tiny.py` builds tiny random chat models for CPU runs.

Every output directory gets a `stage.json` (lineage: parent model, teacher, training numbers) and a generated card.
"""

from .chat_data import docstring_datasets, load_train_eval
from .config import (ATTENTION_PROJECTIONS, BUILTIN_DOCSTRINGS, EXPERT_PARAMETERS, PostTrainScriptArguments,
                     SFTDistillationConfig, lora_config)
from .recipes import MODEL_DEFAULTS, parse_recipe, run_recipe
from .run import run_dpo, run_sft, save_lora
from ..tokenization import CHAT_TEMPLATE
from .tiny import build_tiny_chat_model, build_tiny_tokenizer
from .trainer import SFTDistillationTrainer

__all__ = ["ATTENTION_PROJECTIONS", "MODEL_DEFAULTS", "BUILTIN_DOCSTRINGS", "CHAT_TEMPLATE", "EXPERT_PARAMETERS",
           "PostTrainScriptArguments", "SFTDistillationConfig", "SFTDistillationTrainer", "build_tiny_chat_model",
           "build_tiny_tokenizer", "docstring_datasets", "load_train_eval", "lora_config", "parse_recipe",
           "run_dpo", "run_recipe", "run_sft", "save_lora"]
