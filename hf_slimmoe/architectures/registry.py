"""The registry of supported MoE families, keyed by `model_type`."""

from __future__ import annotations

from .accounting import total_and_active
from .adapter import MoeArchitecture
from .families import FAMILIES

ARCHITECTURES: dict[str, MoeArchitecture] = {arch.model_type: arch for arch in FAMILIES}
#: The `model_type`s SlimMoE can score, slim, count and export.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)


def get_architecture(source) -> MoeArchitecture:
    """The [`MoeArchitecture`] of `source`: a `model_type` string, a configuration, or a model.

    Raises:
        `ValueError`: naming the `model_type` and the supported ones, for a family that is not in the registry.
    """
    config = getattr(source, "config", source)
    model_type = source if isinstance(source, str) else getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported MoE family; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return ARCHITECTURES[model_type]


def count_parameters(config) -> tuple[int, int]:
    """Exact `(total, active)` parameter counts of a model with configuration `config`, from the configuration alone.

    ```python
    >>> from transformers import MixtralConfig
    >>> from hf_slimmoe import count_parameters
    >>> total, active = count_parameters(MixtralConfig())  # Mixtral-8x7B sizes
    >>> round(total / 1e9, 1), round(active / 1e9, 1)
    (46.7, 12.9)

    ```
    """
    return total_and_active(get_architecture(config), config)


__all__ = ["ARCHITECTURES", "SUPPORTED_MODEL_TYPES", "get_architecture", "count_parameters"]
