"""Tensor surgery: slice a MoE model of any supported family down to a smaller configuration, in place.

Two structured cuts, both driven by [`SensitivityScores`] and located through the family's [`MoeArchitecture`]:

- **Expert slimming.** Every routed expert keeps its own `target` expert-width highest-scoring neurons. A neuron `i`
  of expert `e` is one gate row, one up row and one down column of the fused experts; where they sit is read from the
  layout flags transformers records on the experts module: `gate_up_proj [E, 2I, H]` with the gate half first
  (Mixtral, PhiMoE, OLMoE, Qwen, DeepSeek) or gpt-oss's transposed `[E, H, 2I]` with gate and up interleaved
  (`2i`, `2i + 1`) and a `gate_up_proj_bias [E, 2I]`; `down_proj [E, H, I]` or `[E, I, H]`. The slices leave
  together and the kept neurons keep their original order. A shared expert (a dense GLU beside the router) is slimmed
  the same way when the target narrows it.
- **Attention pruning by GQA group.** Each layer keeps its `target.num_key_value_heads` highest-scoring groups; a
  dropped group takes its KV head (rows of `k_proj`/`v_proj`) and its `num_attention_heads // num_key_value_heads`
  query heads (rows of `q_proj`, columns of `o_proj`, per-query-head parameters such as gpt-oss's `sinks`) with it,
  biases included. `head_dim` never changes. Families whose attention cannot lose a group (OLMoE, DeepSeek MLA)
  refuse with the reason.

Everything is validated before the first weight is touched; a bad target raises a `ValueError` naming the field.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..architectures import get_architecture

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from ..architectures import MoeArchitecture
    from .sensitivity import SensitivityScores

logger = logging.getLogger(__name__)

# Module attributes that cache an expert / MLP width and must follow the pruned tensors.
_WIDTH_ATTRIBUTES = ("intermediate_dim", "intermediate_size", "ffn_dim", "expert_dim", "ffn_hidden_size")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_sizes(arch: MoeArchitecture, config, target) -> None:
    """Target sizes: positive, fixed fields kept, nothing wider, whole GQA groups, attention prunable."""
    for name in arch.pruned_fields():
        value = getattr(target, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prune_to: target {name} must be a positive integer, got {value!r}.")
    for name in arch.fixed_fields(config):
        now = _head_dim(config) if name == "head_dim" else getattr(config, name, None)
        wanted = _head_dim(target) if name == "head_dim" else getattr(target, name, None)
        if now != wanted:
            raise ValueError(
                f"prune_to: target {name}={wanted!r} differs from the model's {name}={now!r}; pruning only narrows "
                "the experts and removes whole GQA groups. Build the target with `slim_config(model.config, ...)` "
                "(or `model.config.slimmed(...)`)."
            )
    widths = [(name, getattr(config, name), getattr(target, name)) for name in arch.pruned_fields()]
    if arch.shared_expert is not None:
        widths.append(("shared expert width", arch.shared_width_of(config), arch.shared_width_of(target)))
    for name, now, wanted in widths:
        if wanted > now and name != (arch.shared_expert and arch.shared_expert.count):
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
    if target.num_key_value_heads != config.num_key_value_heads and not arch.attention_prunable:
        raise ValueError(
            f"prune_to: the attention of {arch.model_type} models cannot be pruned: {arch.attention_refusal}. Keep "
            f"num_key_value_heads={config.num_key_value_heads} and slim the experts only."
        )


def _check_scores(arch: MoeArchitecture, config, target, scores: SensitivityScores) -> None:
    """One score tensor per decoder layer of the right shape (empty for layers without what it scores)."""
    if scores is None:
        raise ValueError("prune_to: scores is None; compute them with `compute_sensitivity(model, batches)`.")
    moe = set(arch.moe_layer_indices(config))
    attention = set(arch.attention_layer_indices(config))
    expected = {
        "experts": lambda i: (arch.num_experts_of(config), arch.expert_width_of(config)) if i in moe else None,
        "kv_groups": lambda i: (config.num_key_value_heads,) if i in attention else None,
    }
    if arch.shared_expert is not None and arch.shared_width_of(target) != arch.shared_width_of(config):
        expected["shared_experts"] = lambda i: (arch.shared_width_of(config),) if i in moe else None
    if arch.dense_tied and arch.expert_width_of(target) != arch.expert_width_of(config):
        dense = set(arch.dense_layer_indices(config))
        expected["dense"] = lambda i: (arch.expert_width_of(config),) if i in dense else None
    layers = config.num_hidden_layers
    for name, shape_of in expected.items():
        per_layer = getattr(scores, name)
        if len(per_layer) != layers:
            raise ValueError(
                f"prune_to: scores.{name} has {len(per_layer)} layers, the model has {layers}; these scores were "
                "computed on a different model."
            )
        for layer, tensor in enumerate(per_layer):
            shape = shape_of(layer)
            if (tuple(tensor.shape) != shape) if shape is not None else tensor.numel() != 0:
                raise ValueError(
                    f"prune_to: scores.{name}[{layer}] has shape {list(tensor.shape)}, expected "
                    f"{list(shape) if shape is not None else 'an empty tensor (a layer without it)'} for this model; these "
                    "scores were computed on a model of different sizes."
                )


def validate_prune_target(config: PretrainedConfig, target: PretrainedConfig, scores: SensitivityScores) -> None:
    """Check that a model with configuration `config` can be pruned to `target` with `scores`; raise otherwise.

    Raises:
        `ValueError`: naming the offending field, for an unsupported family, a target wider than the model, a
            changed fixed field (hidden size, vocabulary, layers, experts, top-k, head_dim, biases, dense layers), a
            different number of query heads per GQA group, attention pruning on a family that cannot prune its
            attention, or scores whose shapes do not match the model.
    """
    arch = get_architecture(config)
    _check_sizes(arch, config, target)
    _check_scores(arch, config, target, scores)


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


def _set_width(module: nn.Module, value: int) -> None:
    for name in _WIDTH_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, value)


def expert_neurons(arch: MoeArchitecture, experts: nn.Module) -> tuple[torch.Tensor, ...]:
    """Views of a fused experts module's weights with one row per neuron: `(gate, up, down)` (`(up, down)` for
    experts without a gate), each `[num_experts, width, in]`. Row `i` of expert `e` in all of them is neuron `i` of
    that expert, whatever the layout (gate half first or interleaved, transposed or not: the adapter's flags, which
    are `@use_experts_implementation`'s)."""
    transposed = arch.expert_transposed
    down = experts.down_proj if transposed else experts.down_proj.transpose(1, 2)  # [E, I, H]
    if not arch.expert_gate:
        return (experts.up_proj.transpose(1, 2) if transposed else experts.up_proj), down  # [E, I, H] each
    gate_up = experts.gate_up_proj.transpose(1, 2) if transposed else experts.gate_up_proj  # [E, 2I, H]
    if arch.expert_concatenated:
        size = down.shape[1]
        return gate_up[:, :size], gate_up[:, size:], down
    return gate_up[:, 0::2], gate_up[:, 1::2], down


def head_rows(heads: torch.Tensor, rows_per_head: int) -> torch.Tensor:
    """The rows `[len(heads) * rows_per_head]` of the heads `heads` in a projection holding `rows_per_head` rows per
    head, heads one after the other."""
    return (heads[:, None] * rows_per_head + torch.arange(rows_per_head, device=heads.device)).reshape(-1)


def gqa_rows(groups: torch.Tensor, heads_per_group: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the GQA groups `groups` (`[G]`): `(q_rows, kv_rows)`, where `q_rows`
    (`[G * heads_per_group * head_dim]`) index `q_proj`'s outputs and `o_proj`'s inputs, and `kv_rows`
    (`[G * head_dim]`) index `k_proj`'s and `v_proj`'s outputs."""
    return head_rows(head_rows(groups, heads_per_group), head_dim), head_rows(groups, head_dim)


def gate_up_index(keep: torch.Tensor, old_size: int, concatenated: bool) -> torch.Tensor:
    """Positions in a fused `gate_up` axis of the neurons `keep` (`[E, I_new]`): `[E, 2 * I_new]`, gate half first
    (`i` and `I + i`) or interleaved (`2i`, `2i + 1`) as the experts store them."""
    if concatenated:
        return torch.cat([keep, keep + old_size], dim=1)
    return torch.stack([2 * keep, 2 * keep + 1], dim=-1).reshape(keep.shape[0], -1)


def slim_experts(arch: MoeArchitecture, experts: nn.Module, keep: torch.Tensor) -> None:
    """Keep, per expert, the neurons `keep` (`[num_experts, new_width]`, ascending) of a fused experts module.

    The layout is the adapter's (the flags `@use_experts_implementation` sets on the module): transposed (weights
    stored `[E, in, out]`), concatenated (gate half first, else interleaved), biased, gated (`gate_up_proj`) or
    up-only (`up_proj`).
    """
    transposed = arch.expert_transposed
    neuron_axis = 1 if transposed else 2  # of down_proj: [E, I, H] or [E, H, I]
    input_axis = 2 if transposed else 1  # of gate_up_proj [E, H, 2I] / [E, 2I, H], up_proj [E, H, I] / [E, I, H]
    old_size = experts.down_proj.shape[neuron_axis]
    keep = keep.to(experts.down_proj.device)
    name = "gate_up_proj" if arch.expert_gate else "up_proj"
    rows = gate_up_index(keep, old_size, arch.expert_concatenated) if arch.expert_gate else keep  # [E, 2I_new | I_new]
    with torch.no_grad():
        replace_parameter(experts, name, torch.take_along_dim(
            getattr(experts, name), rows.unsqueeze(3 - input_axis), dim=input_axis))
        replace_parameter(experts, "down_proj", torch.take_along_dim(
            experts.down_proj, keep.unsqueeze(3 - neuron_axis), dim=neuron_axis))
        if arch.expert_bias:
            replace_parameter(experts, f"{name}_bias", getattr(experts, f"{name}_bias").gather(1, rows))
    _set_width(experts, keep.shape[1])


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


def slim_glu(mlp: nn.Module, keep: torch.Tensor) -> None:
    """Keep the neurons `keep` (ascending) of a dense MLP (`gate_proj` where it is a GLU, `up_proj` rows; `down_proj`
    columns)."""
    if getattr(mlp, "gate_proj", None) is not None:
        _slice_linear(mlp.gate_proj, keep, dim=0)
    _slice_linear(mlp.up_proj, keep, dim=0)
    _slice_linear(mlp.down_proj, keep, dim=1)
    _set_width(mlp, keep.numel())


def prune_attention_groups(attention: nn.Module, keep_groups: torch.Tensor, heads_per_group: int, head_dim: int,
                           query_head_parameters: tuple[str, ...] = (), gated_queries: bool = False) -> None:
    """Keep the GQA groups `keep_groups` (ascending) of a GQA attention module: their KV heads and their query heads
    (with the per-query-head parameters named in `query_head_parameters`, e.g. gpt-oss's `sinks`, and, with
    `gated_queries`, each head's gate rows, which follow its query rows in `q_proj`: `2 * head_dim` rows a head)."""
    q_rows, kv_rows = gqa_rows(keep_groups, heads_per_group, head_dim)
    q_heads = head_rows(keep_groups, heads_per_group)
    _slice_linear(attention.q_proj, head_rows(q_heads, 2 * head_dim) if gated_queries else q_rows, dim=0)
    _slice_linear(attention.k_proj, kv_rows, dim=0)
    _slice_linear(attention.v_proj, kv_rows, dim=0)
    _slice_linear(attention.o_proj, q_rows, dim=1)
    with torch.no_grad():
        for name in query_head_parameters:
            value = getattr(attention, name)
            replace_parameter(attention, name, value.index_select(0, q_heads.to(value.device)))  # [kept query heads, ...]
    for name in ("num_heads", "num_key_value_heads"):  # cached head counts follow the kept groups
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, len(keep_groups) * (heads_per_group if name == "num_heads" else 1))


def _prune_moe_blocks(arch: MoeArchitecture, model: nn.Module, target, scores: SensitivityScores) -> None:
    config = model.config
    new_width, new_shared = arch.expert_width_of(target), arch.shared_width_of(target)
    for index, block in arch.moe_blocks(model).items():
        if new_width != arch.expert_width_of(config):
            slim_experts(arch, arch.experts_of(block), keep_indices(scores.experts[index], new_width))
            _set_width(block, new_width)
        if new_shared != arch.shared_width_of(config):
            slim_glu(arch.shared_of(block), keep_indices(scores.shared_experts[index], new_shared))
    if new_width != arch.expert_width_of(config):  # dense MLPs sized by the expert width field (Jamba)
        for index, mlp in arch.dense_blocks(model).items():
            slim_glu(mlp, keep_indices(scores.dense[index], new_width))


def prune_model(model: PreTrainedModel, target: PretrainedConfig, scores: SensitivityScores) -> PreTrainedModel:
    """Prune `model` (any supported MoE family: [`SlimMoeForCausalLM`], `MixtralForCausalLM`,
    `Qwen3MoeForCausalLM`, ...) in place to the sizes of `target`.

    Keeps, in every routed expert of every MoE layer, the target expert-width neurons with the highest
    `scores.experts[layer][expert]`; in a shared expert the target shared-width neurons with the highest
    `scores.shared_experts[layer]`; in a dense MLP sized by the expert width field (Jamba) the target width's
    neurons with the highest `scores.dense[layer]`; and in every layer the `target.num_key_value_heads` GQA groups with
    the highest
    `scores.kv_groups[layer]`. Updates `model.config` (the family's expert width field, heads, the shared expert's
    width; `head_dim` is kept and written explicitly) and the size attributes of the modules. Returns `model`.

    Raises:
        `ValueError`: before any weight changes, for a target or scores that do not fit the model
            (see [`validate_prune_target`]).
    """
    arch, config = get_architecture(model), model.config
    validate_prune_target(config, target, scores)
    new_groups = target.num_key_value_heads
    heads_per_group = config.num_attention_heads // config.num_key_value_heads
    _prune_moe_blocks(arch, model, target, scores)
    layers = arch.decoder_layers(model)
    if new_groups != config.num_key_value_heads:
        for index in arch.attention_layer_indices(config):
            prune_attention_groups(arch.attention_of(layers[index]), keep_indices(scores.kv_groups[index], new_groups),
                                   heads_per_group, _head_dim(config), arch.query_head_parameters,
                                   arch.gated_queries)
    logger.info(
        "Pruned %d layers (%s): expert width %d -> %d, attention heads %d/%d -> %d/%d (head_dim %d)",
        len(layers), arch.model_type, arch.expert_width_of(config), arch.expert_width_of(target),
        config.num_attention_heads, config.num_key_value_heads, new_groups * heads_per_group, new_groups,
        _head_dim(config),
    )
    if arch.attention_prunable:
        config.head_dim = _head_dim(config)
    for name in arch.pruned_fields():
        setattr(config, name, getattr(target, name))
    return model


def experts_kernel_fits(model: PreTrainedModel) -> bool:
    """Whether the experts' rows are 16-byte aligned in the model's dtype, as the `grouped_mm` kernel needs (expert
    widths that are multiples of 4 in float32, of 8 in bf16)."""
    arch = get_architecture(model)
    multiple = max(1, 16 // torch.empty((), dtype=model.dtype).element_size())
    return arch.expert_width_of(model.config) % multiple == 0 and model.config.hidden_size % multiple == 0


def prune_to(model: PreTrainedModel, target: PretrainedConfig, scores: SensitivityScores) -> PreTrainedModel:
    """Prune `model` in place to the sizes of `target` (from [`slim_config`]) with `scores` (from
    [`compute_sensitivity`]) and return it. The model keeps its own class; see [`prune_model`].

    An expert width whose rows are not 16-byte aligned switches the experts to the eager kernel (the stock
    `grouped_mm` one would fail on it).
    """
    prune_model(model, target, scores)
    if getattr(model.config, "_experts_implementation", None) == "grouped_mm" and not experts_kernel_fits(model):
        logger.warning("Expert width %d is not 16-byte aligned in %s: switching the experts to the eager kernel. Load "
                       "the saved model with experts_implementation='eager' too.",
                       get_architecture(model).expert_width_of(model.config), model.dtype)
        model.set_experts_implementation("eager")
    return model


__all__ = [
    "validate_prune_target",
    "prune_model",
    "prune_to",
    "slim_experts",
    "slim_glu",
    "prune_attention_groups",
    "gate_up_index",
    "keep_indices",
    "replace_parameter",
    "experts_kernel_fits",
    "expert_neurons",
    "gqa_rows",
]
