"""The Hub: model cards rendered from the files a run leaves in a model directory (`cards`, with the trajectory plot of
`plot`) and publishing through `huggingface_hub` (`publish`).

The package is lazy, as transformers' model packages are: its names (every submodule's `__all__`) load from their
submodule on first use.
"""

from typing import TYPE_CHECKING

from transformers.utils import _LazyModule
from transformers.utils.import_utils import define_import_structure

if TYPE_CHECKING:
    from .cards import *
    from .plot import *
    from .publish import *
else:
    import sys

    _file = globals()["__file__"]
    sys.modules[__name__] = _LazyModule(__name__, _file, define_import_structure(_file), module_spec=__spec__)
