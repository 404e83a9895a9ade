"""Exact parameter counts from a configuration alone, for every supported family: the parameters of a meta-device
model of it (no weights, about a second for a 235B configuration).

The counts are `sum(p.numel() for p in model.parameters())` of the stock model built from the configuration (tied
weights once; buffers such as DeepSeek's `e_score_correction_bias` are not parameters). *Active* parameters are those
one token uses: everything except the routed experts it is not sent to (`num_experts - top_k` per MoE layer); shared
experts, routers, attention, embeddings and `lm_head` all count as active.
"""

from __future__ import annotations

from .adapter import MoeArchitecture
from .skeleton import skeleton


def parameter_groups(arch: MoeArchitecture, config) -> dict[str, int]:
    """Parameters of a model of family `arch` with configuration `config`: `total`, the routed `experts` (all of
    them), the `active_experts` one token uses and the GQA `attention`."""
    model = skeleton(config)
    experts = [arch.experts_of(block) for block in arch.moe_blocks(model).values()]
    attention = [arch.attention_of(layer) for layer in arch.decoder_layers(model)]
    routed = sum(p.numel() for module in experts for p in module.parameters())
    per_token = arch.top_k_of(config) / arch.num_experts_of(config)
    return {"total": sum(p.numel() for p in model.parameters()), "experts": routed,
            "active_experts": round(routed * per_token),
            "attention": sum(p.numel() for module in attention if module is not None for p in module.parameters())}


def total_and_active(arch: MoeArchitecture, config) -> tuple[int, int]:
    groups = parameter_groups(arch, config)
    return groups["total"], groups["total"] - groups["experts"] + groups["active_experts"]


__all__ = ["parameter_groups", "total_and_active"]
