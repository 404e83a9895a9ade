"""Baselines: drop whole experts instead of slimming them (paper Table 3, columns "Prune Expert"; REAP).

SlimMoE keeps every expert and narrows each one; the baselines it is compared against remove whole experts from
every MoE layer, chosen by one of three criteria:

- **KD sensitivity** (`expert_scores_from_sensitivity`): an expert's score is the l2 norm of the KD-loss sensitivity
  scores of its down projection, i.e. of its neuron scores in [`SensitivityScores`] (the same Eq. 2-4 statistic,
  aggregated over the whole expert).
- **Activation frequency** (`expert_activation_frequency`, Seer-MoE, Muzio et al. 2024): how often the router picks
  the expert among its top-k over the calibration tokens.
- **REAP** (`reap_scores`, Router-weighted Expert Activation Pruning, Lasby et al., Cerebras 2025): the mean, over the
  tokens routed to the expert, of its router weight times the l2 norm of its output, `mean_{x routed to e}
  g_e(x) * ||f_e(x)||_2`: an expert that is rarely chosen, chosen with a small weight, or contributes little when
  chosen scores low.

`drop_experts` is the surgery: per MoE layer it keeps the highest-scoring experts (their router rows, router bias and
DeepSeek's score-correction bias, and every per-expert tensor of the fused experts, in original order) and sets the
family's expert-count field. Every layer keeps the same number of experts, since the configuration holds one value.
All of it goes through the family's [`~hf_slimmoe.architectures.MoeArchitecture`].
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import get_architecture
from .sensitivity import SensitivityScores, compute_sensitivity
from .surgery import keep_indices

logger = logging.getLogger(__name__)

EXPERT_CRITERIA = ("kd", "frequency", "reap")
# Module attributes that cache the number of experts and must follow the dropped tensors.
_COUNT_ATTRIBUTES = ("num_experts", "out_features")


def expert_scores_from_sensitivity(scores: SensitivityScores) -> list[torch.Tensor]:
    """Per layer, `[num_experts]`: the l2 norm of each expert's neuron scores (= of all its down-projection scores);
    empty for a dense layer."""
    return [torch.linalg.vector_norm(layer.float(), dim=-1) for layer in scores.experts]  # [E, I] -> [E]


def _routed_tokens(model: nn.Module, batches: Iterable[Mapping], on_route: Callable, desc: str,
                   show_progress: bool) -> None:
    """Run `model` (eval mode, no grad) over `batches`, calling `on_route(layer, experts, hidden, index, weights)` on
    every MoE layer with the routed experts' inputs restricted to the non-padding tokens: `hidden [N, H]`,
    `index [N, top_k]` (chosen experts) and `weights [N, top_k]` (their router weights)."""
    arch = get_architecture(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mask_now: list[torch.Tensor] = []

    def hook_for(layer: int):
        def hook(module, args, kwargs, _output):
            hidden, index, weights = (list(args) + list(kwargs.values()))[:3]
            keep = mask_now[0].to(index.device)
            on_route(layer, module, hidden[keep], index[keep], weights[keep])
        return hook

    hooks = [arch.experts_of(block).register_forward_hook(hook_for(layer), with_kwargs=True)
             for layer, block in arch.moe_blocks(model).items()]
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not show_progress):
                input_ids = torch.as_tensor(batch["input_ids"]).to(device)  # [B, T]
                attention_mask = batch.get("attention_mask")
                mask = (torch.ones_like(input_ids) if attention_mask is None
                        else torch.as_tensor(attention_mask).to(device)).bool()
                mask_now[:] = [mask.reshape(-1)]  # [B*T]: the experts see the flattened tokens
                model(input_ids=input_ids, attention_mask=None if attention_mask is None else mask.long(),
                      use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)


def _per_layer(model: nn.Module, values: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """A list over all decoder layers: `values[layer]` for MoE layers, an empty tensor for dense ones."""
    return [values.get(layer, torch.zeros(0)).float() for layer in range(model.config.num_hidden_layers)]


def expert_activation_frequency(model: nn.Module, batches: Iterable[Mapping], show_progress: bool = True
                                ) -> list[torch.Tensor]:
    """Per layer, `[num_experts]`: the fraction of (token, top-k slot) assignments routed to each expert (empty for a
    dense layer). Runs the model in eval mode (deterministic routing); padding (attention_mask 0) is not counted."""
    num_experts = get_architecture(model).num_experts_of(model.config)
    counts: dict[int, torch.Tensor] = {}

    def count(layer, _experts, _hidden, index, _weights):
        counts.setdefault(layer, torch.zeros(num_experts, dtype=torch.float64))
        counts[layer] += torch.bincount(index.reshape(-1).cpu(), minlength=num_experts).double()

    _routed_tokens(model, batches, count, "Expert activation frequency", show_progress)
    if not counts or any(c.sum() == 0 for c in counts.values()):
        raise ValueError("expert_activation_frequency: the calibration set is empty (no counted tokens).")
    return _per_layer(model, {layer: c / c.sum() for layer, c in counts.items()})


def reap_scores(model: nn.Module, batches: Iterable[Mapping], show_progress: bool = True) -> list[torch.Tensor]:
    """Per layer, `[num_experts]`: REAP saliency, the mean over the tokens routed to each expert of its router weight
    times the l2 norm of its output (0 for an expert no token reached; empty for a dense layer).

    Each expert's output is recomputed by the family's own experts forward with a routing weight of 1, for all
    (token, chosen expert) pairs at once, so every layout (gpt-oss's clamped, biased SwiGLU included) is handled.
    """
    num_experts = get_architecture(model).num_experts_of(model.config)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}

    def accumulate(layer, experts, hidden, index, weights):
        tokens, top_k = index.shape
        pairs = experts.forward(hidden.repeat_interleave(top_k, dim=0), index.reshape(-1, 1),
                                torch.ones(tokens * top_k, 1, dtype=weights.dtype, device=weights.device))
        saliency = weights.float() * torch.linalg.vector_norm(pairs.float(), dim=-1).view(tokens, top_k)  # [N, k]
        flat = index.reshape(-1).cpu()
        sums.setdefault(layer, torch.zeros(num_experts, dtype=torch.float64)).index_add_(
            0, flat, saliency.reshape(-1).cpu().double())
        counts.setdefault(layer, torch.zeros(num_experts, dtype=torch.float64)).index_add_(
            0, flat, torch.ones(flat.numel(), dtype=torch.float64))

    _routed_tokens(model, batches, accumulate, "REAP expert saliency", show_progress)
    if not counts or any(c.sum() == 0 for c in counts.values()):
        raise ValueError("reap_scores: the calibration set is empty (no counted tokens).")
    return _per_layer(model, {layer: sums[layer] / counts[layer].clamp(min=1) for layer in sums})


def score_experts(model: nn.Module, batches: Iterable[Mapping], criterion: str = "reap", show_progress: bool = True,
                  **sensitivity_kwargs) -> list[torch.Tensor]:
    """Per-layer expert scores for `drop_experts` by `criterion`: `"kd"` (KD sensitivity; `sensitivity_kwargs` go to
    `compute_sensitivity`, e.g. `teacher=`), `"frequency"` or `"reap"`."""
    if criterion == "kd":
        return expert_scores_from_sensitivity(
            compute_sensitivity(model, batches, show_progress=show_progress, **sensitivity_kwargs))
    if criterion == "frequency":
        return expert_activation_frequency(model, batches, show_progress=show_progress)
    if criterion == "reap":
        return reap_scores(model, batches, show_progress=show_progress)
    raise ValueError(f"score_experts: criterion={criterion!r} is not supported; use one of {EXPERT_CRITERIA}.")


def _check_drop(model: nn.Module, num_experts: int, expert_scores: list[torch.Tensor]) -> None:
    arch, config = get_architecture(model), model.config
    current, top_k = arch.num_experts_of(config), arch.top_k_of(config)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not top_k <= num_experts <= current:
        raise ValueError(
            f"drop_experts: num_experts={num_experts!r} must be an integer between {arch.top_k} ({top_k}) and "
            f"{arch.num_experts} ({current})."
        )
    groups = getattr(config, arch.expert_groups, None) if arch.expert_groups else None
    if groups and groups > 1:
        raise ValueError(
            f"drop_experts: {arch.model_type} routes within {arch.expert_groups}={groups} groups of experts; dropping "
            "experts would break its group-limited routing."
        )
    moe = set(arch.moe_layer_indices(config))
    layers = config.num_hidden_layers
    if len(expert_scores) != layers or any(
            (tuple(s.shape) != (current,)) if i in moe else s.numel() != 0 for i, s in enumerate(expert_scores)):
        raise ValueError(
            f"drop_experts: expert_scores must hold {layers} tensors, of shape [{current}] for the MoE layers "
            f"{sorted(moe)} and empty for dense ones; got {[tuple(s.shape) for s in expert_scores]}."
        )


def _keep_experts(module: nn.Module, keep: torch.Tensor, old: int) -> None:
    """Keep rows `keep` of every per-expert parameter and buffer of `module` (router or experts; dim 0 is the
    expert)."""
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.dim() == 0 or tensor.shape[0] != old:
                raise ValueError(f"drop_experts: {type(module).__name__}.{name} {list(tensor.shape)} is not indexed "
                                 f"by expert along dim 0.")
            value = tensor.index_select(0, keep.to(tensor.device)).contiguous()
            setattr(module, name, nn.Parameter(value, requires_grad=tensor.requires_grad)
                    if isinstance(tensor, nn.Parameter) else value)
    for name in _COUNT_ATTRIBUTES:
        if getattr(module, name, None) == old:
            setattr(module, name, keep.numel())


def drop_experts(model: nn.Module, num_experts: int, expert_scores: list[torch.Tensor]) -> nn.Module:
    """Keep, in every MoE layer, the `num_experts` experts with the highest `expert_scores[layer]`; in place, returns
    the model (any supported family).

    Raises:
        `ValueError`: before any weight changes, for a `num_experts` outside `[top_k, current experts]`, scores of
            the wrong shape, or a family that routes within expert groups (DeepSeek with `n_group > 1`).
    """
    _check_drop(model, num_experts, expert_scores)
    arch, config = get_architecture(model), model.config
    old = arch.num_experts_of(config)
    for layer, block in arch.moe_blocks(model).items():
        keep = keep_indices(expert_scores[layer], num_experts)  # [num_experts], ascending
        _keep_experts(arch.router_of(block), keep, old)
        _keep_experts(arch.experts_of(block), keep, old)
        if getattr(block, "num_experts", None) == old:
            block.num_experts = num_experts
    logger.info("Dropped experts: %d -> %d per MoE layer", old, num_experts)
    setattr(config, arch.num_experts, num_experts)
    if getattr(model, "num_experts", None) == old:
        model.num_experts = num_experts  # the causal LM's copy, read by its aux loss
    return model


__all__ = [
    "EXPERT_CRITERIA",
    "drop_experts",
    "expert_activation_frequency",
    "expert_scores_from_sensitivity",
    "reap_scores",
    "score_experts",
]
