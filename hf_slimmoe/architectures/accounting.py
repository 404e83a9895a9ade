"""Exact parameter counts from a configuration alone, for every supported family (no weights, instant for 235B).

The counts match `sum(p.numel() for p in model.parameters())` of the stock model built from the configuration
(buffers such as DeepSeek's `e_score_correction_bias` are not parameters). *Active* parameters are those one token
uses: everything except the routed experts it is not sent to (`num_experts - top_k` per MoE layer); shared experts,
routers, attention, embeddings and `lm_head` all count as active.
"""

from __future__ import annotations

from .adapter import MoeArchitecture


def _gqa_attention(arch: MoeArchitecture, config) -> int:
    h, head_dim = config.hidden_size, arch.head_dim_of(config)
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    count = h * q + 2 * h * kv + q * h  # q_proj, k_proj, v_proj [out, H]; o_proj [H, q]
    if arch.flag(config, arch.qkv_bias):
        count += q + 2 * kv
    if arch.flag(config, arch.o_bias):
        count += h
    if arch.qk_norm == "head":  # RMSNorm(head_dim) for queries and keys
        count += 2 * head_dim
    elif arch.qk_norm == "projection":  # RMSNorm over the whole projections
        count += q + kv
    return count + config.num_attention_heads * len(arch.query_head_parameters)


def _mla_attention(arch: MoeArchitecture, config) -> int:
    h, heads = config.hidden_size, config.num_attention_heads
    qk_head = config.qk_nope_head_dim + config.qk_rope_head_dim
    bias = arch.flag(config, arch.qkv_bias)
    if config.q_lora_rank is None:
        count = h * heads * qk_head  # q_proj
    else:
        rank = config.q_lora_rank  # q_a_proj (+ bias), q_a_layernorm, q_b_proj
        count = h * rank + rank * bias + rank + rank * heads * qk_head
    kv_a = config.kv_lora_rank + config.qk_rope_head_dim
    count += h * kv_a + kv_a * bias + config.kv_lora_rank  # kv_a_proj_with_mqa (+ bias), kv_a_layernorm
    count += config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)  # kv_b_proj
    count += heads * config.v_head_dim * h + h * arch.flag(config, arch.o_bias)  # o_proj
    return count


_ATTENTION = {"gqa": _gqa_attention, "mla": _mla_attention}


def _glu(arch: MoeArchitecture, config, width: int) -> int:
    """A dense GLU MLP (gate_proj, up_proj [I, H], down_proj [H, I]) with the family's MLP biases."""
    h = config.hidden_size
    return 3 * h * width + (2 * width + h) * arch.flag(config, arch.mlp_bias)


def one_expert_parameters(arch: MoeArchitecture, config) -> int:
    """Parameters of one routed expert: gate, up and down projections (and gpt-oss's biases)."""
    h, width = config.hidden_size, arch.expert_width_of(config)
    return 3 * h * width + (2 * width + h) * arch.expert_bias


def parameter_groups(arch: MoeArchitecture, config) -> dict[str, int]:
    """Exact parameter counts per component of a model of family `arch` with configuration `config`."""
    h, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    norm = h * (2 if arch.norm_bias else 1)
    moe_layers = len(arch.moe_layer_indices(config))
    dense_layers = layers - moe_layers
    experts = arch.num_experts_of(config)
    groups = {
        "embeddings": v * h,
        "lm_head": 0 if config.tie_word_embeddings else v * h + v * arch.flag(config, arch.lm_head_bias),
        "norms": layers * 2 * norm + norm,  # two per layer, one final
        "attention": layers * _ATTENTION[arch.attention_kind](arch, config),
        "dense_mlp": dense_layers * _glu(arch, config, getattr(config, arch.dense_layers.width)) if dense_layers else 0,
        "router": moe_layers * (experts * h + experts * arch.router_bias),
        "experts": moe_layers * experts * one_expert_parameters(arch, config),
        "active_experts": moe_layers * arch.top_k_of(config) * one_expert_parameters(arch, config),
        "shared_experts": 0,
    }
    shared = arch.shared_width_of(config)
    if shared is not None:
        gate = h if arch.shared_expert.gate else 0
        groups["shared_experts"] = moe_layers * (_glu(arch, config, shared) + gate)
    return groups


def total_and_active(arch: MoeArchitecture, config) -> tuple[int, int]:
    groups = parameter_groups(arch, config)
    total = sum(n for name, n in groups.items() if name != "active_experts")
    active = sum(n for name, n in groups.items() if name != "experts")
    return total, active


__all__ = ["parameter_groups", "total_and_active", "one_expert_parameters"]
