"""hf_slimmoe: SlimMoE compression of Mixture-of-Experts language models on the Hugging Face stack.

Importing the package registers `model_type: "slimmoe"` with `AutoConfig` and `AutoModelForCausalLM`, and the
per-expert checkpoint layout of Phi-3.5-MoE for it, so `save_pretrained` writes keys stock PhiMoE reads.

`compute_sensitivity`, `slim_config`, `prune_to` and `count_parameters` work on stock model instances and
configurations of every family in `SUPPORTED_MODEL_TYPES` (PhiMoE, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2,
DeepSeek-V3, gpt-oss); see `hf_slimmoe.architectures`.
"""

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .architectures import SUPPORTED_MODEL_TYPES, count_parameters, slim_config
from .configuration_slimmoe import SlimMoeConfig
from .modeling_slimmoe import SlimMoeForCausalLM
from .pruning import SensitivityScores, compute_sensitivity, prune_to
from .schedule import plan_stages
from .distillation import (
    DistillationConfig,
    DistillationTrainer,
    cache_teacher_topk,
    teacher_topk,
    topk_kl_loss,
)
from .posttrain import SFTDistillationConfig, SFTDistillationTrainer

__version__ = "0.1.0"

AutoConfig.register(SlimMoeConfig.model_type, SlimMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(SlimMoeConfig, SlimMoeForCausalLM, exist_ok=True)
register_checkpoint_conversion_mapping(
    SlimMoeConfig.model_type, get_checkpoint_conversion_mapping("phimoe"), overwrite=True
)

__all__ = ["SlimMoeConfig", "SlimMoeForCausalLM", "__version__", "teacher_topk", "topk_kl_loss",
           "DistillationConfig", "DistillationTrainer", "cache_teacher_topk", "plan_stages",
           "SensitivityScores", "compute_sensitivity", "SFTDistillationConfig", "SFTDistillationTrainer",
           "SUPPORTED_MODEL_TYPES", "count_parameters", "prune_to", "slim_config"]
