"""Ablation: drop whole experts instead of slimming them (paper Table 3, columns "Prune Expert").

SlimMoE keeps every expert and narrows each one; the ablations it is compared against remove whole experts from
every layer, chosen by one of two criteria:

- **KD sensitivity** (`expert_scores_from_sensitivity`): an expert's score is the l2 norm of the KD-loss sensitivity
  scores of its down projection, i.e. of its neuron scores in [`SensitivityScores`] (the same Eq. 2-4 statistic,
  aggregated over the whole expert).
- **Activation frequency** (`expert_activation_frequency`, Seer-MoE, Muzio et al. 2024): how often the router picks
  the expert among its top-k over the calibration tokens.

`drop_experts` is the surgery: per layer it keeps the highest-scoring experts (their router rows and their fused
`gate_up_proj` / `down_proj` slices, in original order) and sets `config.num_local_experts`. Every layer keeps the same
number of experts, since the configuration holds one value.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .sensitivity import SensitivityScores
from .surgery import keep_indices, replace_parameter

logger = logging.getLogger(__name__)

EXPERT_CRITERIA = ("kd", "frequency")


def expert_scores_from_sensitivity(scores: SensitivityScores) -> list[torch.Tensor]:
    """Per layer, `[num_experts]`: the l2 norm of each expert's neuron scores (= of all its down-projection scores)."""
    return [torch.linalg.vector_norm(layer.float(), dim=-1) for layer in scores.experts]  # [E, I] -> [E]


@torch.no_grad()
def expert_activation_frequency(model: nn.Module, batches: Iterable[Mapping], show_progress: bool = True
                                ) -> list[torch.Tensor]:
    """Per layer, `[num_experts]`: the fraction of (token, top-k slot) assignments routed to each expert.

    Runs the model in eval mode (deterministic routing); padding (attention_mask 0) is not counted.
    """
    config = model.config
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(config.num_hidden_layers, config.num_local_experts, dtype=torch.float64)
    picks: list[torch.Tensor] = []
    hooks = [layer.mlp.router.register_forward_hook(lambda _m, _i, out: picks.append(out[2]))  # selected experts
             for layer in model.model.layers]
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="Expert activation frequency", unit="batch",
                          disable=not show_progress):
            input_ids = torch.as_tensor(batch["input_ids"]).to(device)  # [B, T]
            attention_mask = batch.get("attention_mask")
            mask = (torch.ones_like(input_ids) if attention_mask is None
                    else torch.as_tensor(attention_mask).to(device)).reshape(-1).bool()  # [B*T]
            picks.clear()
            model(input_ids=input_ids, attention_mask=None if attention_mask is None else mask.view_as(input_ids),
                  use_cache=False)
            for layer, selected in enumerate(picks):  # selected: [B*T, top_k]
                counts[layer] += torch.bincount(selected[mask].reshape(-1).cpu(),
                                                minlength=config.num_local_experts).double()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    totals = counts.sum(dim=1, keepdim=True)
    if (totals == 0).any():
        raise ValueError("expert_activation_frequency: the calibration set is empty (no counted tokens).")
    return list((counts / totals).float())


def drop_experts(model: nn.Module, num_experts: int, expert_scores: list[torch.Tensor]) -> nn.Module:
    """Keep, in every layer, the `num_experts` experts with the highest `expert_scores[layer]`; in place, returns model.

    Raises:
        `ValueError`: before any weight changes, for a `num_experts` outside `[num_experts_per_tok, num_local_experts]`
            or scores of the wrong shape.
    """
    config = model.config
    layers = model.model.layers
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not (
            config.num_experts_per_tok <= num_experts <= config.num_local_experts):
        raise ValueError(
            f"drop_experts: num_experts={num_experts!r} must be an integer between num_experts_per_tok "
            f"({config.num_experts_per_tok}) and num_local_experts ({config.num_local_experts})."
        )
    if len(expert_scores) != len(layers) or any(s.shape != (config.num_local_experts,) for s in expert_scores):
        raise ValueError(
            f"drop_experts: expert_scores must hold {len(layers)} tensors of shape [{config.num_local_experts}], got "
            f"{[tuple(s.shape) for s in expert_scores]}."
        )
    for layer, scores in zip(layers, expert_scores):
        keep = keep_indices(scores, num_experts).to(layer.mlp.router.weight.device)  # [num_experts], ascending
        experts, router = layer.mlp.experts, layer.mlp.router
        with torch.no_grad():
            replace_parameter(router, "weight", router.weight.index_select(0, keep))  # [E_new, H]
            replace_parameter(experts, "gate_up_proj", experts.gate_up_proj.index_select(0, keep))  # [E_new, 2I, H]
            replace_parameter(experts, "down_proj", experts.down_proj.index_select(0, keep))  # [E_new, H, I]
        router.out_features = router.num_experts = num_experts
        experts.num_experts = layer.mlp.num_experts = num_experts
    logger.info("Dropped experts: %d -> %d per layer", config.num_local_experts, num_experts)
    config.num_local_experts = num_experts
    model.num_experts = num_experts
    return model


__all__ = ["EXPERT_CRITERIA", "drop_experts", "expert_activation_frequency", "expert_scores_from_sensitivity"]
