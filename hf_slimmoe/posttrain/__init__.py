"""Post-training of a compressed SlimMoE model: SFT with distillation, DPO and LoRA, on TRL and PEFT.

- [`SFTDistillationTrainer`] (`trainer.py`) is `trl.SFTTrainer` (chat templates, packing, completion-only /
  assistant-only loss, every dataset format) whose loss mixes the usual cross-entropy with a KD loss (`kd_loss`:
  teacher samples by default, or the paper's top-k) against an instruct teacher, online or from a cached teacher pass
  over the formatted SFT data; [`SFTDistillationConfig`] (`config.py`) is `trl.SFTConfig` plus the KD fields.
- DPO is `trl.DPOTrainer` unchanged (reference model handling as TRL does it); [`run_dpo`] wires it to a recipe.
- LoRA is PEFT's `LoraConfig` from TRL's `ModelConfig` (`use_peft`, `lora_*`; the fused expert parameters through
  `lora_target_parameters`), trained with the SFT trainer and merged back into a checkpoint that `from_pretrained`
  loads ([`run_sft`], [`save_lora`] in `run.py`).
- Recipes (`recipes.py`): flat YAML of the fields of [`PostTrainScriptArguments`] (`trl.ScriptArguments` + ours),
  `trl.ModelConfig` and the trainer config, parsed with `TrlParser`. Data (`chat_data.py`): the recipe's splits in a
  TRL format, or `builtin:stdlib-docstrings`; `tiny.py` builds tiny random chat models for CPU runs.

Every output directory gets a `stage.json` (lineage: parent model, teacher, training numbers) and a generated card.

The package is lazy, as transformers' model packages are: its names (every submodule's `__all__`) load from their
submodule on first use, and importing one submodule does not load the others.
"""

from typing import TYPE_CHECKING

from transformers.utils import _LazyModule
from transformers.utils.import_utils import define_import_structure

if TYPE_CHECKING:
    from .chat_data import *
    from .config import *
    from .recipes import *
    from .run import *
    from .tiny import *
    from .trainer import *
else:
    import sys

    _file = globals()["__file__"]
    sys.modules[__name__] = _LazyModule(__name__, _file, define_import_structure(_file), module_spec=__spec__)
