"""Structured pruning for SlimMoE on any supported MoE family: sensitivity scores (Eq. 2-4), the tensor surgery behind
`prune_to` / `model.prune_to`, and the expert-dropping baselines (`drop_experts` by KD sensitivity, activation
frequency or REAP).

The package is lazy, as transformers' model packages are: its names (every submodule's `__all__`) load from their
submodule on first use, and importing one submodule does not load the others.
"""

from typing import TYPE_CHECKING

from transformers.utils import _LazyModule
from transformers.utils.import_utils import define_import_structure

if TYPE_CHECKING:
    from .expert_dropping import *
    from .iterative import *
    from .safetensors_stream import *
    from .sensitivity import *
    from .streaming import *
    from .surgery import *
else:
    import sys

    _file = globals()["__file__"]
    sys.modules[__name__] = _LazyModule(__name__, _file, define_import_structure(_file), module_spec=__spec__)
