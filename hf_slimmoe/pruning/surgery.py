"""Tensor surgery: slice a SlimMoE/PhiMoE model down to a smaller configuration, in place.

Two structured cuts, both driven by [`SensitivityScores`]:

- **Expert slimming.** Every expert keeps its own `target.intermediate_size` highest-scoring neurons. A neuron `i` of
  expert `e` is row `i` of the gate half and row `I + i` of the up half of `gate_up_proj[e]` (`[2I, H]`) and column `i`
  of `down_proj[e]` (`[H, I]`); the three slices leave together and the kept neurons keep their original order.
- **Attention pruning by GQA group.** Each layer keeps its `target.num_key_value_heads` highest-scoring groups; a
  dropped group takes its KV head (rows of `k_proj`/`v_proj`) and its `num_attention_heads // num_key_value_heads`
  query heads (rows of `q_proj`, columns of `o_proj`) with it, biases included. `head_dim` never changes.

Everything is validated before the first weight is touched; a bad target raises a `ValueError` naming the field.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from .sensitivity import SensitivityScores

logger = logging.getLogger(__name__)

# Fields a pruning target must share with the model: structured pruning never changes them.
FIXED_FIELDS = ("hidden_size", "vocab_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok",
                "head_dim", "attention_bias", "lm_head_bias", "tie_word_embeddings")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def validate_prune_target(config: PretrainedConfig, target: PretrainedConfig, scores: SensitivityScores) -> None:
    """Check that `model` with configuration `config` can be pruned to `target` with `scores`; raise otherwise.

    Raises:
        `ValueError`: naming the offending field, for a target wider than the model, a changed fixed field
            (hidden size, vocabulary, layers, experts, top-k, head_dim, biases), a different number of query heads
            per GQA group, or scores whose shapes do not match the model.
    """
    for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads"):
        value = getattr(target, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prune_to: target {name} must be a positive integer, got {value!r}.")
    for name in FIXED_FIELDS:
        now = _head_dim(config) if name == "head_dim" else getattr(config, name, None)
        wanted = _head_dim(target) if name == "head_dim" else getattr(target, name, None)
        if now != wanted:
            raise ValueError(
                f"prune_to: target {name}={wanted!r} differs from the model's {name}={now!r}; pruning only narrows "
                "intermediate_size and removes whole GQA groups. Build the target with `model.config.slimmed(...)`."
            )
    for name in ("intermediate_size", "num_key_value_heads", "num_attention_heads"):
        now, wanted = getattr(config, name), getattr(target, name)
        if wanted > now:
            raise ValueError(
                f"prune_to: target {name}={wanted} is wider than the model's {name}={now}; pruning can only remove."
            )
    per_group = config.num_attention_heads // config.num_key_value_heads
    if target.num_attention_heads != target.num_key_value_heads * per_group:
        raise ValueError(
            f"prune_to: target num_attention_heads={target.num_attention_heads} with num_key_value_heads="
            f"{target.num_key_value_heads} has {target.num_attention_heads / target.num_key_value_heads:g} query heads "
            f"per GQA group, the model has {per_group}; whole groups are removed, so set num_attention_heads="
            f"{target.num_key_value_heads * per_group}."
        )
    if scores is None:
        raise ValueError("prune_to: scores is None; compute them with `compute_sensitivity(model, batches)`.")
    layers = config.num_hidden_layers
    for name, expected in (("experts", (config.num_local_experts, config.intermediate_size)),
                           ("kv_groups", (config.num_key_value_heads,))):
        per_layer = getattr(scores, name)
        if len(per_layer) != layers:
            raise ValueError(
                f"prune_to: scores.{name} has {len(per_layer)} layers, the model has {layers}; these scores were "
                "computed on a different model."
            )
        for layer, tensor in enumerate(per_layer):
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"prune_to: scores.{name}[{layer}] has shape {list(tensor.shape)}, expected {list(expected)} for "
                    "this model; these scores were computed on a model of different sizes."
                )


def keep_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores along the last dim, in ascending (original) order.

    A stable sort makes ties deterministic: among equal scores the lower index is kept.
    """
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return order[..., :keep].sort(dim=-1).values


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set `module.name` to a new parameter holding `value`, keeping the old one's `requires_grad`."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def expert_neurons(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a fused experts module's weights with one row per neuron: `(gate, up, down)`, each
    `[num_experts, intermediate, hidden]`. Row `i` of expert `e` in all three is neuron `i` of that expert."""
    size = experts.down_proj.shape[-1]
    gate_up = experts.gate_up_proj  # [E, 2I, H], gate half first
    return gate_up[:, :size], gate_up[:, size:], experts.down_proj.transpose(1, 2)  # down_proj: [E, H, I]


def gqa_rows(groups: torch.Tensor, heads_per_group: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the GQA groups `groups` (`[G]`): `(q_rows, kv_rows)`, where `q_rows`
    (`[G * heads_per_group * head_dim]`) index `q_proj`'s outputs and `o_proj`'s inputs, and `kv_rows`
    (`[G * head_dim]`) index `k_proj`'s and `v_proj`'s outputs."""
    offsets = torch.arange(head_dim, device=groups.device)
    kv_rows = (groups[:, None] * head_dim + offsets).reshape(-1)
    q_heads = (groups[:, None] * heads_per_group + torch.arange(heads_per_group, device=groups.device)).reshape(-1)
    q_rows = (q_heads[:, None] * head_dim + offsets).reshape(-1)
    return q_rows, kv_rows


def slim_experts(experts: nn.Module, keep: torch.Tensor) -> None:
    """Keep, per expert, the neurons `keep` (`[num_experts, new_intermediate]`, ascending) of a fused experts module."""
    num_experts, new_size = keep.shape
    hidden = experts.down_proj.shape[1]
    keep = keep.to(experts.down_proj.device)
    with torch.no_grad():
        rows = keep[:, :, None].expand(num_experts, new_size, hidden)  # [E, I_new, H]
        gate, up, down = (weight.gather(1, rows) for weight in expert_neurons(experts))  # each [E, I_new, H]
        replace_parameter(experts, "gate_up_proj", torch.cat([gate, up], dim=1))  # [E, 2I_new, H]
        replace_parameter(experts, "down_proj", down.transpose(1, 2))  # [E, H, I_new]
    experts.intermediate_dim = new_size


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep `index` along `dim` of `linear.weight` ([out, in]); the bias follows the output dim."""
    index = index.to(linear.weight.device)
    with torch.no_grad():
        replace_parameter(linear, "weight", linear.weight.index_select(dim, index))
        if dim == 0 and linear.bias is not None:
            replace_parameter(linear, "bias", linear.bias.index_select(0, index))
    if dim == 0:
        linear.out_features = index.numel()
    else:
        linear.in_features = index.numel()


def prune_attention_groups(attention: nn.Module, keep_groups: torch.Tensor, heads_per_group: int) -> None:
    """Keep the GQA groups `keep_groups` (ascending) of a `PhimoeAttention`: their KV heads and their query heads."""
    q_rows, kv_rows = gqa_rows(keep_groups, heads_per_group, attention.head_dim)
    _slice_linear(attention.q_proj, q_rows, dim=0)
    _slice_linear(attention.k_proj, kv_rows, dim=0)
    _slice_linear(attention.v_proj, kv_rows, dim=0)
    _slice_linear(attention.o_proj, q_rows, dim=1)


def prune_model(model: PreTrainedModel, target: PretrainedConfig, scores: SensitivityScores) -> PreTrainedModel:
    """Prune `model` (a [`SlimMoeForCausalLM`] or stock `PhimoeForCausalLM`) in place to the sizes of `target`.

    Keeps, in every expert of every layer, the `target.intermediate_size` neurons with the highest
    `scores.experts[layer][expert]`, and in every layer the `target.num_key_value_heads` GQA groups with the highest
    `scores.kv_groups[layer]`. Updates `model.config` (`intermediate_size`, `num_attention_heads`,
    `num_key_value_heads`; `head_dim` is kept) and the size attributes of the modules. Returns `model`.

    Raises:
        `ValueError`: before any weight changes, for a target or scores that do not fit the model
            (see [`validate_prune_target`]).
    """
    config = model.config
    validate_prune_target(config, target, scores)
    new_size, new_groups = target.intermediate_size, target.num_key_value_heads
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    layers = model.model.layers
    for index, layer in enumerate(layers):
        if new_size != config.intermediate_size:
            slim_experts(layer.mlp.experts, keep_indices(scores.experts[index], new_size))
            layer.mlp.ffn_dim = new_size
        if new_groups != config.num_key_value_heads:
            prune_attention_groups(layer.self_attn, keep_indices(scores.kv_groups[index], new_groups),
                                   heads_per_group)
    logger.info(
        "Pruned %d layers: intermediate_size %d -> %d, attention heads %d/%d -> %d/%d (head_dim %d)",
        len(layers), config.intermediate_size, new_size, config.num_attention_heads, config.num_key_value_heads,
        new_groups * heads_per_group, new_groups, _head_dim(config),
    )
    config.head_dim = _head_dim(config)
    config.intermediate_size = new_size
    config.num_key_value_heads = new_groups
    config.num_attention_heads = new_groups * heads_per_group
    return model


__all__ = ["validate_prune_target", "prune_model", "slim_experts", "prune_attention_groups", "expert_neurons",
           "gqa_rows", "FIXED_FIELDS"]
