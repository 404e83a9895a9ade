"""Architecture adapters: one [`MoeArchitecture`] per transformers MoE family, in a registry keyed by `model_type`.

Supported: PhiMoE (and hf_slimmoe's SlimMoE), Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3 and
gpt-oss. Everything that prunes, scores, drops experts or counts parameters asks the adapter where things are.
"""

from .adapter import DenseLayers, MoeArchitecture, SharedExpert
from .export import save_stock, stock_config
from .loading import SLIMMOE_TYPES, config_from_dict, load_model, new_model
from .registry import ARCHITECTURES, SUPPORTED_MODEL_TYPES, count_parameters, get_architecture
from .slimming import slim_config

__all__ = ["ARCHITECTURES", "SLIMMOE_TYPES", "SUPPORTED_MODEL_TYPES", "DenseLayers", "MoeArchitecture",
           "SharedExpert", "config_from_dict", "count_parameters", "get_architecture", "load_model", "new_model",
           "save_stock", "slim_config", "stock_config"]
