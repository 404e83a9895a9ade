"""Architecture adapters: one [`MoeArchitecture`] per transformers MoE family, in a registry keyed by `model_type`.

Supported: PhiMoE (and hf_slimmoe's SlimMoE), Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3 and
gpt-oss. Everything that prunes, scores, drops experts or counts parameters asks the adapter where things are.
"""

from .adapter import DenseLayers, MoeArchitecture, SharedExpert
from .export import save_stock
from .registry import ARCHITECTURES, SUPPORTED_MODEL_TYPES, count_parameters, get_architecture
from .slimming import slim_config

__all__ = ["ARCHITECTURES", "SUPPORTED_MODEL_TYPES", "DenseLayers", "MoeArchitecture", "SharedExpert",
           "count_parameters", "get_architecture", "save_stock", "slim_config"]
