"""hf_slimmoe: SlimMoE compression of Mixture-of-Experts language models on the Hugging Face stack.

Importing the package registers `model_type: "slimmoe"` with `AutoConfig` and `AutoModelForCausalLM`, and the
per-expert checkpoint layout of Phi-3.5-MoE for it, so `save_pretrained` writes keys stock PhiMoE reads (see
`hf_slimmoe.model.registration`: the registration runs once transformers' Auto classes are loaded).

The import itself is light: the public names below are loaded from their submodules on first use (as transformers'
`_LazyModule` does), so `import hf_slimmoe` and `slimmoe --help` import neither torch nor TRL, PEFT or datasets.

`compute_sensitivity`, `slim_config`, `prune_to` and `count_parameters` work on stock model instances and
configurations of every family in `SUPPORTED_MODEL_TYPES` (PhiMoE, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2,
DeepSeek-V3, gpt-oss); see `hf_slimmoe.architectures`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .model import registration

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY_NAMES = {
    "SlimMoeConfig": "model.configuration_slimmoe",
    "SlimMoeForCausalLM": "model.modeling_slimmoe",
    "SensitivityScores": "pruning",
    "compute_sensitivity": "pruning",
    "prune_to": "pruning",
    "SUPPORTED_MODEL_TYPES": "architectures",
    "count_parameters": "architectures",
    "slim_config": "architectures",
    "plan_stages": "pruning.schedule",
    "DistillationConfig": "distillation",
    "DistillationTrainer": "distillation",
    "cache_teacher_topk": "distillation",
    "cache_teacher_samples": "distillation",
    "teacher_topk": "utils.modeling",
    "topk_kl_loss": "distillation",
    "topk_tail_kl_loss": "distillation",
    "sampled_kd_loss": "distillation",
    "full_kl_loss": "distillation",
    "SFTDistillationConfig": "posttrain",
    "SFTDistillationTrainer": "posttrain",
}

__all__ = ["__version__", *_LAZY_NAMES]

if TYPE_CHECKING:
    from .architectures import SUPPORTED_MODEL_TYPES, count_parameters, slim_config
    from .model.configuration_slimmoe import SlimMoeConfig
    from .distillation import (
        DistillationConfig,
        DistillationTrainer,
        cache_teacher_samples,
        cache_teacher_topk,
        full_kl_loss,
        sampled_kd_loss,
        topk_kl_loss,
        topk_tail_kl_loss,
    )
    from .model.modeling_slimmoe import SlimMoeForCausalLM
    from .utils.modeling import teacher_topk
    from .posttrain import SFTDistillationConfig, SFTDistillationTrainer
    from .pruning import SensitivityScores, compute_sensitivity, prune_to
    from .pruning.schedule import plan_stages


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


registration.install()
