"""Tiny models of every MoE family of the installed transformers, built from each family's own config class.

One generic shrinking rule maps a configuration's size fields to tiny values by their names (hidden size, layers,
heads, widths, expert counts, latent ranks, linear-attention and Mamba sizes); per-layer lists are cut to the new
number of layers keeping every kind of layer. `CONFIG_OVERRIDES` holds what the rule cannot guess for a family.
"""

from __future__ import annotations

import re

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

VOCAB, LAYERS = 128, 4
_RULES = (  # (field-name pattern, tiny value); the first match wins
    (r"(^|_)vocab_size(_per_layer_input)?$", VOCAB),
    (r"^hidden_size$", 64),
    (r"^(num_hidden_layers|num_layers)$", LAYERS),
    (r"^(num_local_experts|num_experts|n_routed_experts|moe_num_experts)$", 4),
    (r"^(num_experts_per_tok|num_experts_per_token|moe_topk|moe_k|top_k)$", 2),
    (r"^(n_group|num_expert_group|topk_group)$", 1),
    (r"^zero_expert_num$", 2),
    (r"^num_attention_heads$", 4),
    (r"^head_dim$", 16),
    (r"^(qk_rope_head_dim|qk_nope_head_dim)$", 8),
    (r"^(v_head_dim|qk_head_dim)$", 16),
    (r"^kv_lora_rank$", 16),
    (r"^(q_lora_rank|o_lora_rank)$", 24),
    (r"^linear_num_key_heads$", 2), (r"^linear_num_value_heads$", 4), (r"^linear_num_heads$", 2),
    (r"^linear_(key_|value_)?head_dim$", 8),
    (r"^(mamba_num_heads|mamba_n_heads)$", 4), (r"^(mamba_head_dim|mamba_d_head)$", 8),
    (r"^(ssm_state_size|mamba_d_state|mamba_dt_rank)$", 8), (r"^(n_groups|mamba_n_groups)$", 1),
    (r"^chunk_size$", 16),
    (r"^index_n_heads$", 2), (r"^index_head_dim$", 16), (r"^index_topk$", 8),
    (r"^max_position_embeddings$", 256), (r"^(sliding_window|attention_chunk_size)$", 32),
    (r"^hidden_size_per_layer_input$", 8),
)
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "eod_token_id": 3, "sep_token_id": 4}

# What the generic rule cannot guess, per family.
CONFIG_OVERRIDES: dict[str, dict] = {
    "zaya": {"num_experts_per_tok": 1},  # its router is top-1 only
    "dots1": {"n_shared_experts": 1},  # the default leaves it unset
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 0},
    # heads x d_head = 2 x hidden; the default layer pattern is all Mamba (Granite-4 mixes in attention layers)
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_expand": 2,
                         "layer_types": ["linear_attention", "attention", "linear_attention", "attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},  # the default leaves it unset
    # the default Gemma-4 text model is dense; its MoE variant (26B-A4B) has experts beside each layer's dense MLP
    "gemma4_text": {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2},
}


def _width(name: str) -> int:
    """Distinct tiny widths, so a field is told apart from the others by its value."""
    if "shared" in name:
        return 16
    if "moe" in name or "expert" in name:
        return 24
    return 40 if name == "intermediate_size" else 56


def _cut_layer_list(values: list, layers: int) -> list:
    """The first `layers` entries of a per-layer list, the last ones replaced so every kind of layer stays."""
    head = list(values[:layers])
    missing = [kind for kind in dict.fromkeys(values) if kind not in head]
    if missing and len(missing) < layers:
        head[-len(missing):] = missing
    return head


def tiny_values(config) -> dict:
    """The tiny overrides of a default configuration's fields, by the generic rule."""
    values = config.to_dict()
    heads, groups = values.get("num_attention_heads"), values.get("num_key_value_heads")
    layers = values.get("num_hidden_layers", values.get("num_layers"))
    out = {}
    for name, value in values.items():
        if name in _TOKEN_IDS:
            out[name] = _TOKEN_IDS[name] if value is not None else None
        elif isinstance(value, list) and layers and len(value) == layers:
            out[name] = _cut_layer_list(value, LAYERS)
        elif isinstance(value, list) and name.endswith("layers") and all(isinstance(v, int) for v in value):
            out[name] = [v for v in value if v < LAYERS]  # layer indices
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            out[name] = {k: v for k, v in value.items() if int(k) < LAYERS}  # per-layer settings
        elif isinstance(value, bool) or not isinstance(value, int) and value is not None:
            continue
        elif "intermediate" in name or "ffn_hidden_size" in name:
            out[name] = _width(name)
        elif name == "num_key_value_heads":
            out[name] = 4 if groups == heads else 2
        else:
            tiny = next((tiny for pattern, tiny in _RULES if re.search(pattern, name)), None)
            if tiny is not None:
                out[name] = tiny
    if "qk_rope_head_dim" in values:  # MLA: the rotary part is the family's head_dim
        out["head_dim"] = out["qk_rope_head_dim"]
    return out


def tiny_config(model_type: str):
    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    values = {k: v for k, v in default.to_dict().items() if k not in ("model_type", "transformers_version")}
    values.update(tiny_values(default))
    values.update(CONFIG_OVERRIDES.get(model_type, {}))
    return config_class(**values)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny stock model of `model_type` with every weight drawn from N(0, 0.2), eager experts; raises whatever the
    family's classes raise on a configuration they cannot build."""
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.set_experts_implementation("eager")
    model.to(dtype)
    with torch.no_grad():  # stock inits leave some weights at 0 (routers, biases): give every weight a value
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model
