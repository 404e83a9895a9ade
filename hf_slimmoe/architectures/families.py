"""One [`MoeArchitecture`] per transformers MoE family: the registry's data.

Each entry was read off the installed `transformers/models/<family>/modeling_<family>.py` and
`configuration_<family>.py`; the comments say what decided each non-default value.
"""

from __future__ import annotations

from dataclasses import replace

from .adapter import DenseLayers, MoeArchitecture, SharedExpert

_LOSS = "transformers.models.{0}.modeling_{0}:load_balancing_loss_func"

PHIMOE = MoeArchitecture(
    model_type="phimoe",
    architecture="PhiMoEForCausalLM",  # vLLM's name; transformers' class is PhimoeForCausalLM (loads by model_type)
    expert_width="intermediate_size",
    num_experts="num_local_experts",
    router="router",  # PhimoeSparseMoeBlock.router, a Linear(H, E) with sparsemixer top-2
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    lm_head_bias="lm_head_bias",
    norm_bias=True,  # nn.LayerNorm (weight + bias) everywhere
    aux_loss=_LOSS.format("phimoe"),
)

# hf_slimmoe's own PhiMoE subclass: same modules, exported as stock phimoe.
SLIMMOE = replace(PHIMOE, model_type="slimmoe", export_model_type="phimoe")

MIXTRAL = MoeArchitecture(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    expert_width="intermediate_size",
    num_experts="num_local_experts",
    aux_loss=_LOSS.format("mixtral"),
)

QWEN2_MOE = MoeArchitecture(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    expert_width="moe_intermediate_size",
    num_experts="num_experts",
    shared_expert=SharedExpert(module="shared_expert", width="shared_expert_intermediate_size",
                               gate="shared_expert_gate"),
    dense_layers=DenseLayers(listed="mlp_only_layers", sparse_step="decoder_sparse_step", width="intermediate_size"),
    qkv_bias="qkv_bias",  # q/k/v carry biases, o_proj does not
    aux_loss=_LOSS.format("qwen2_moe"),
)

QWEN3_MOE = MoeArchitecture(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    expert_width="moe_intermediate_size",
    num_experts="num_experts",
    dense_layers=DenseLayers(listed="mlp_only_layers", sparse_step="decoder_sparse_step", width="intermediate_size"),
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    qk_norm="head",  # q_norm/k_norm are RMSNorm(head_dim), applied per head: GQA groups leave cleanly
    aux_loss=_LOSS.format("qwen3_moe"),
)

OLMOE = MoeArchitecture(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
    expert_width="intermediate_size",
    num_experts="num_experts",
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    qk_norm="projection",
    attention_prunable=False,
    attention_refusal=(
        "OLMoE normalizes the whole query projection with q_norm = RMSNorm(hidden_size) and the keys with "
        "k_norm = RMSNorm(hidden_size // num_attention_heads * num_key_value_heads) before splitting heads: the stock "
        "class cannot build a model with fewer heads (q_norm stays hidden_size wide), and the RMS over the kept heads "
        "would differ anyway, so removing a GQA group is not exact"
    ),
    aux_loss=_LOSS.format("olmoe"),
)

_MLA_REFUSAL = (
    "{} uses multi-head latent attention (MLA): keys and values are decoded per head from one shared latent "
    "(kv_b_proj) with a shared rotary key, and num_key_value_heads equals num_attention_heads, so there are no GQA "
    "groups to remove"
)

DEEPSEEK_V3 = MoeArchitecture(
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    expert_width="moe_intermediate_size",
    num_experts="n_routed_experts",
    shared_expert=SharedExpert(module="shared_experts", count="n_shared_experts"),  # width = moe width * count
    dense_layers=DenseLayers(first_k="first_k_dense_replace", width="intermediate_size"),
    qkv_bias="attention_bias",  # q_a_proj and kv_a_proj_with_mqa
    o_bias="attention_bias",
    expert_groups="n_group",  # group-limited routing over num_experts // n_group experts per group
    attention_kind="mla",
    attention_prunable=False,
    attention_refusal=_MLA_REFUSAL.format("DeepSeek-V3"),
    aux_loss=None,  # auxiliary-loss-free balancing (e_score_correction_bias); transformers has no aux loss for it
)

DEEPSEEK_V2 = replace(
    DEEPSEEK_V3,
    model_type="deepseek_v2",
    architecture="DeepseekV2ForCausalLM",
    mlp_bias="mlp_bias",  # dense and shared MLPs may carry biases
    attention_refusal=_MLA_REFUSAL.format("DeepSeek-V2"),
)

GPT_OSS = MoeArchitecture(
    model_type="gpt_oss",
    architecture="GptOssForCausalLM",
    expert_width="intermediate_size",
    num_experts="num_local_experts",
    router="router",
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    query_head_parameters=("sinks",),  # one attention-sink logit per query head
    router_bias=True,
    expert_bias=True,  # transposed, interleaved gate/up with biases (read from the experts' layout flags)
    aux_loss=_LOSS.format("gpt_oss"),
)

FAMILIES = (PHIMOE, SLIMMOE, MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V3, DEEPSEEK_V2, GPT_OSS)

__all__ = ["FAMILIES", "PHIMOE", "SLIMMOE", "MIXTRAL", "QWEN2_MOE", "QWEN3_MOE", "OLMOE", "DEEPSEEK_V3", "DEEPSEEK_V2",
           "GPT_OSS"]
