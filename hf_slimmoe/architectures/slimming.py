"""`slim_config`: a smaller configuration of the same family (and the same configuration class)."""

from __future__ import annotations

from .adapter import MoeArchitecture
from .registry import get_architecture

# Keys of `to_dict()` that are not constructor arguments.
_NOT_ARGUMENTS = ("model_type", "transformers_version")


def _check_size(name: str, value, current: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"slim_config: {name} must be a positive integer, got {value!r}.")
    if value > current:
        raise ValueError(
            f"slim_config: {name}={value} is larger than the current {current}; slimming only removes neurons and heads."
        )


def _shared_values(arch: MoeArchitecture, config, expert_width: int, shared_width: int | None) -> dict:
    """Configuration values that give the shared expert width `shared_width` next to experts of width
    `expert_width`; `None` keeps the shared expert's own size field (Qwen2-MoE's width, DeepSeek's count)."""
    spec, current = arch.shared_expert, arch.shared_width_of(config)
    if spec is None:
        if shared_width is not None:
            raise ValueError(f"slim_config: shared_expert_width={shared_width} was given but {arch.model_type} "
                             "models have no shared expert.")
        return {}
    if shared_width is not None:
        _check_size("shared_expert_width", shared_width, current)
    if not spec.tied:
        return {} if shared_width is None else {spec.width: shared_width}
    # The family ties its shared experts to the routed width (x count as in DeepSeek, or equal): without a shared width
    # the count is kept (the shared experts follow the routed width); a given width must be a multiple of it.
    if shared_width is None:
        return {}
    if spec.count is None:
        if shared_width != expert_width:
            raise ValueError(f"slim_config: {arch.model_type} sizes its shared expert as {arch.expert_width}, so "
                             f"shared_expert_width={shared_width} must equal expert_width={expert_width}.")
        return {}
    if shared_width % expert_width:
        raise ValueError(
            f"slim_config: {arch.model_type} sizes its shared experts as {arch.expert_width} x {spec.count}, so "
            f"shared_expert_width={shared_width} must be a multiple of expert_width={expert_width} (e.g. "
            f"{max(1, shared_width // expert_width) * expert_width})."
        )
    return {spec.count: shared_width // expert_width}


def slim_config(config, expert_width: int | None = None, num_key_value_heads: int | None = None,
                shared_expert_width: int | None = None, num_attention_heads: int | None = None):
    """A copy of `config` (same class; any supported family) with narrower routed experts, fewer GQA groups and/or a
    narrower shared expert; every other field is kept and `head_dim` is written explicitly.

    ```python
    >>> from transformers import Qwen3MoeConfig
    >>> from hf_slimmoe import slim_config, count_parameters
    >>> small = slim_config(Qwen3MoeConfig(), expert_width=256, num_key_value_heads=2)  # 32/4 heads -> 16/2
    >>> type(small).__name__, small.moe_intermediate_size, small.num_attention_heads, small.head_dim
    ('Qwen3MoeConfig', 256, 16, 64)

    ```

    The number of query heads per KV group is kept: `num_key_value_heads=2` on a 32/4 model gives 16/2 heads.
    `num_attention_heads`, when given, is only a check of that rule.

    Raises:
        `ValueError`: naming the field, for a size that is not a positive integer no larger than the current one,
            a `num_attention_heads` that breaks the heads-per-group rule, attention pruning on a family whose
            attention cannot lose GQA groups, a shared width on a family without shared experts, or (DeepSeek) a
            shared width that is not a multiple of the expert width. (DeepSeek sizes its shared experts as
            `moe_intermediate_size x n_shared_experts`: without `shared_expert_width` the count is kept and the
            shared experts narrow with the routed ones.)
    """
    arch = get_architecture(config)
    values = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARGUMENTS}
    width = arch.expert_width_of(config)
    if expert_width is not None:
        _check_size(f"expert_width ({arch.expert_width})", expert_width, width)
        values[arch.expert_width] = width = expert_width
    values.update(_shared_values(arch, config, width, shared_expert_width))
    per_group = config.num_attention_heads // config.num_key_value_heads
    if num_key_value_heads is not None and num_key_value_heads != config.num_key_value_heads:
        if not arch.attention_prunable:
            raise ValueError(f"slim_config: num_key_value_heads cannot change for {arch.model_type}: "
                             f"{arch.attention_refusal}. Slim the experts only.")
        _check_size("num_key_value_heads", num_key_value_heads, config.num_key_value_heads)
        values["num_key_value_heads"] = num_key_value_heads
        values["num_attention_heads"] = num_key_value_heads * per_group
    if num_attention_heads is not None and num_attention_heads != values["num_attention_heads"]:
        raise ValueError(
            f"slim_config: num_attention_heads={num_attention_heads} does not keep {per_group} query heads per KV "
            f"group with num_key_value_heads={values['num_key_value_heads']}; GQA groups are removed whole, so it "
            f"must be {values['num_key_value_heads'] * per_group}."
        )
    if arch.attention_prunable:
        values["head_dim"] = arch.head_dim_of(config)
    return type(config)(**values)


__all__ = ["slim_config"]
