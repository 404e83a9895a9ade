"""Architecture adapters: one [`MoeArchitecture`] per transformers MoE family, read off a meta-device model of it.

Supported: every family of the installed transformers whose causal LM keeps routed experts in the fused layout
(`SUPPORTED_MODEL_TYPES`, found in transformers' own sources), PhiMoE and hf_slimmoe's SlimMoE among them.
Everything that prunes, scores, drops experts or counts parameters asks the adapter where things are.
"""

from .adapter import MoeArchitecture, SharedExpert
from .derive import derive_architecture
from .skeleton import UnsupportedArchitecture
from .export import save_stock, stock_config
from .loading import SLIMMOE_TYPES, config_from_dict, load_model, new_model
from .registry import SUPPORTED_MODEL_TYPES, count_parameters, get_architecture
from .slimming import slim_config

__all__ = ["SLIMMOE_TYPES", "SUPPORTED_MODEL_TYPES", "MoeArchitecture", "SharedExpert", "UnsupportedArchitecture",
           "config_from_dict", "derive_architecture", "count_parameters", "get_architecture", "load_model", "new_model",
           "save_stock", "slim_config", "stock_config"]
