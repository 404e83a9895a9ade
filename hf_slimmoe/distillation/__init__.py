"""Distillation for SlimMoE: the chunked KD losses, the distillation trainer, the teacher caches (top-k, samples).

The package is lazy, as transformers' model packages are: its names (every submodule's `__all__`) load from their
submodule on first use, and importing one submodule does not load the others.
"""

from typing import TYPE_CHECKING

from transformers.utils import _LazyModule
from transformers.utils.import_utils import define_import_structure

if TYPE_CHECKING:
    from .config import *
    from .kd import *
    from .losses import *
    from .run import *
    from .teacher_cache import *
    from .trainer import *
else:
    import sys

    _file = globals()["__file__"]
    sys.modules[__name__] = _LazyModule(__name__, _file, define_import_structure(_file), module_spec=__spec__)
