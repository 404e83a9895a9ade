"""hf_slimmoe: SlimMoE compression of Mixture-of-Experts language models on the Hugging Face stack.

Importing the package registers `model_type: "slimmoe"` with `AutoConfig` and `AutoModelForCausalLM`, and the
per-expert checkpoint layout of Phi-3.5-MoE for it, so `save_pretrained` writes keys stock PhiMoE reads.
"""

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_slimmoe import SlimMoeConfig
from .modeling_slimmoe import SlimMoeForCausalLM
from .pruning import SensitivityScores, compute_sensitivity
from .schedule import plan_stages
from .distillation import (
    DistillationConfig,
    DistillationTrainer,
    cache_teacher_samples,
    cache_teacher_topk,
    full_kl_loss,
    sampled_kd_loss,
    teacher_topk,
    topk_kl_loss,
    topk_tail_kl_loss,
)
from .posttrain import SFTDistillationConfig, SFTDistillationTrainer

__version__ = "0.1.0"

AutoConfig.register(SlimMoeConfig.model_type, SlimMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(SlimMoeConfig, SlimMoeForCausalLM, exist_ok=True)
register_checkpoint_conversion_mapping(
    SlimMoeConfig.model_type, get_checkpoint_conversion_mapping("phimoe"), overwrite=True
)

__all__ = ["SlimMoeConfig", "SlimMoeForCausalLM", "__version__", "teacher_topk", "topk_kl_loss",
           "topk_tail_kl_loss", "sampled_kd_loss", "full_kl_loss", "DistillationConfig", "DistillationTrainer",
           "cache_teacher_topk", "cache_teacher_samples", "plan_stages",
           "SensitivityScores", "compute_sensitivity", "SFTDistillationConfig", "SFTDistillationTrainer"]
