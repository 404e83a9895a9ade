"""Architecture adapters: one [`MoeArchitecture`] per transformers MoE family, read off a meta-device model of it.

Supported: every family of the installed transformers whose causal LM keeps routed experts in the fused layout
(`SUPPORTED_MODEL_TYPES`, found in transformers' own sources), PhiMoE and hf_slimmoe's SlimMoE among them.
Everything that prunes, scores, drops experts or counts parameters asks the adapter where things are.

The package is lazy, as transformers' model packages are: its names (every submodule's `__all__`) load from their
submodule on first use, and importing one submodule does not load the others.
"""

from typing import TYPE_CHECKING

from transformers.utils import _LazyModule
from transformers.utils.import_utils import define_import_structure

if TYPE_CHECKING:
    from .accounting import *
    from .adapter import *
    from .derive import *
    from .export import *
    from .families import *
    from .loading import *
    from .registry import *
    from .skeleton import *
    from .slimming import *
    from .table import *
else:
    import sys

    _file = globals()["__file__"]
    sys.modules[__name__] = _LazyModule(__name__, _file, define_import_structure(_file), module_spec=__spec__)
