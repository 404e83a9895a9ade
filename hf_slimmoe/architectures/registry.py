"""The supported MoE families: those of the installed transformers with fused routed experts, each read off its
model ([`derive_architecture`])."""

from __future__ import annotations

from .adapter import MoeArchitecture
from .families import fused_moe_families

#: The `model_type`s whose causal LM keeps routed experts in transformers' fused layout: SlimMoE derives what it needs
#: from their models. A configuration whose parts it cannot slim is refused by [`get_architecture`] with the reason.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = fused_moe_families()


def _default_config(model_type: str):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]()


def check_model_type(model_type) -> None:
    """Raise a `ValueError` naming `model_type` and the supported ones unless it is a family with fused experts."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported MoE family; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def get_architecture(source) -> MoeArchitecture:
    """The [`MoeArchitecture`] of `source`: a configuration, a model or a `model_type` (its default configuration),
    read off a meta-device model of it.

    Raises:
        `ValueError`: naming the `model_type` and the supported ones, for a family without fused routed experts; naming
            the `model_type`, the part and the reason, for a configuration SlimMoE cannot slim.
    """
    from .derive import derive_architecture

    config = getattr(source, "config", source)
    check_model_type(source if isinstance(source, str) else getattr(config, "model_type", None))
    return derive_architecture(_default_config(source) if isinstance(source, str) else config)


def count_parameters(config) -> tuple[int, int]:
    """Exact `(total, active)` parameter counts of a model with configuration `config`, from a meta-device model of
    it (no weights materialized). *Active* parameters are those one token uses: everything except the routed experts
    it is not sent to (`num_experts - top_k` per MoE layer).

    ```python
    >>> from transformers import MixtralConfig
    >>> from hf_slimmoe import count_parameters
    >>> total, active = count_parameters(MixtralConfig())  # Mixtral-8x7B sizes
    >>> round(total / 1e9, 1), round(active / 1e9, 1)
    (46.7, 12.9)

    ```
    """
    from .accounting import total_and_active

    return total_and_active(get_architecture(config), config)


__all__ = ["SUPPORTED_MODEL_TYPES", "check_model_type", "get_architecture", "count_parameters"]
