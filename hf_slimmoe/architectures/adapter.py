"""What SlimMoE needs to know about one transformers MoE family, declared as data.

An [`MoeArchitecture`] names where a family keeps its decoder layers, routed experts, shared experts, router and
attention, which configuration fields hold the expert width and count, which layers are dense, the family's own
load-balancing loss, and whether its attention can lose whole GQA groups. The pruning, scoring, expert-dropping and
parameter-accounting code reads these facts and nothing else: no code path tests a `model_type`.

The routed experts themselves are read through the layout flags that transformers' `@use_experts_implementation`
records on every experts module (`is_transposed`, `is_concatenated`, `has_bias`), so the same slicing serves
`gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` (gate half first: Mixtral, PhiMoE, OLMoE, Qwen, DeepSeek) and
gpt-oss's transposed, interleaved layout with biases (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class DenseLayers:
    """
    Configuration fields that make a decoder layer dense (a plain GLU MLP instead of a sparse MoE block). A layer is
    an MoE layer when it passes every rule that is set.

    listed (`str`, *optional*):
        Field holding a list of dense layer indices (Qwen2/3-MoE `mlp_only_layers`).
    sparse_step (`str`, *optional*):
        Field `n`: only layers with `(index + 1) % n == 0` are MoE (Qwen2/3-MoE `decoder_sparse_step`).
    first_k (`str`, *optional*):
        Field `k`: the first `k` layers are dense (DeepSeek `first_k_dense_replace`).
    width (`str`, *optional*):
        Field holding the dense MLP width (`intermediate_size` where the experts use `moe_intermediate_size`).
    """

    listed: str | None = None
    sparse_step: str | None = None
    first_k: str | None = None
    width: str | None = None

    def is_moe(self, config, index: int) -> bool:
        if self.listed and index in (getattr(config, self.listed, None) or ()):
            return False
        step = getattr(config, self.sparse_step, None) if self.sparse_step else None
        if step and (index + 1) % step != 0:
            return False
        first_k = getattr(config, self.first_k, None) if self.first_k else None
        return not (first_k and index < first_k)


@dataclass(frozen=True)
class SharedExpert:
    """
    A dense GLU MLP beside the router (`gate_proj`/`up_proj` `[I_s, H]`, `down_proj` `[H, I_s]`), always active.

    module (`str`):
        Attribute of the sparse MoE block holding it (Qwen2-MoE `shared_expert`, DeepSeek `shared_experts`).
    width (`str`, *optional*):
        Configuration field of its width (Qwen2-MoE `shared_expert_intermediate_size`).
    count (`str`, *optional*):
        Set instead of `width` when the family ties the shared width to the routed one:
        `width = expert width * config.<count>` (DeepSeek `n_shared_experts`).
    gate (`str`, *optional*):
        Attribute of the sparse block holding its sigmoid gate, a `Linear(H, 1)` (Qwen2-MoE `shared_expert_gate`).
    """

    module: str
    width: str | None = None
    count: str | None = None
    gate: str | None = None


@dataclass(frozen=True)
class MoeArchitecture:
    """
    The facts SlimMoE reads about one transformers MoE family (one entry of the registry, keyed by `model_type`).

    Parameters that say where things are (attribute names; decoder layers are `model.model.layers`):
        model_type (`str`): the registry key, `config.model_type`.
        architecture (`str`): the `architectures` name servers register (vLLM's registry), written on export.
        export_model_type (`str`, *optional*): the stock `model_type` exports use (defaults to `model_type`;
            hf_slimmoe's own `slimmoe` exports as `phimoe`).
        moe_block (`str`, defaults to `"mlp"`): the decoder layer's sparse block (or dense MLP on dense layers).
        router (`str`, defaults to `"gate"`): the block's router, `weight [E, H]` (and `bias [E]` where present).
        experts (`str`, defaults to `"experts"`): the block's fused experts module.
        attention (`str`, defaults to `"self_attn"`): the layer's attention (`q/k/v/o_proj` for GQA).
        shared_expert ([`SharedExpert`], *optional*): the block's always-active dense expert.

    Parameters that name configuration fields:
        expert_width (`str`): routed expert width (`intermediate_size` or `moe_intermediate_size`).
        num_experts (`str`): routed experts per layer (`num_local_experts`, `num_experts`, `n_routed_experts`).
        top_k (`str`, defaults to `"num_experts_per_tok"`): experts per token.
        dense_layers ([`DenseLayers`]): which layers are dense.
        qkv_bias / o_bias (`str`, *optional*): flags of the attention biases (Qwen2-MoE has `qkv_bias`, no `o_proj`
            bias).
        lm_head_bias (`str`, *optional*): flag of an `lm_head` bias (PhiMoE).
        mlp_bias (`str`, *optional*): flag of biases in the dense and shared MLPs (DeepSeek-V2 `mlp_bias`).
        expert_groups (`str`, *optional*): router expert groups (DeepSeek `n_group`); dropping experts would break
            group-limited routing, so `drop_experts` refuses when it is above 1.

    Parameters that describe what the modules hold (for exact parameter counts without weights):
        attention_kind (`str`, defaults to `"gqa"`): `"gqa"` (q/k/v/o projections) or `"mla"` (DeepSeek latent
            attention: `q_a/q_b` or `q_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`).
        qk_norm (`str`, *optional*): `"head"` (RMSNorm over each head's `head_dim`, Qwen3-MoE) or `"projection"`
            (RMSNorm over the whole q and k projections, OLMoE).
        query_head_parameters (`tuple[str]`): attention parameters with one entry per query head (gpt-oss `sinks`);
            they leave with their heads.
        norm_bias (`bool`): LayerNorm with a bias (PhiMoE) instead of RMSNorm.
        router_bias (`bool`): the router has a bias `[E]` (gpt-oss).
        expert_bias (`bool`): the experts have biases `gate_up_proj_bias [E, 2I]`, `down_proj_bias [E, H]` (gpt-oss).

    Parameters that say what may be pruned:
        attention_prunable (`bool`, defaults to `True`): whether whole GQA groups can be removed and the stock class
            still builds the pruned model and computes the same function on the kept heads.
        attention_refusal (`str`): why not, for the error message.
        aux_loss (`str`, *optional*): `"module:function"` of the family's own load-balancing loss
            (`f(router_logits, num_experts, top_k, attention_mask)`); `None` when the family trains without one.
    """

    model_type: str
    architecture: str
    expert_width: str
    num_experts: str
    top_k: str = "num_experts_per_tok"
    moe_block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    attention: str = "self_attn"
    shared_expert: SharedExpert | None = None
    dense_layers: DenseLayers = field(default_factory=DenseLayers)
    qkv_bias: str | None = None
    o_bias: str | None = None
    lm_head_bias: str | None = None
    mlp_bias: str | None = None
    expert_groups: str | None = None
    attention_kind: str = "gqa"
    qk_norm: str | None = None
    query_head_parameters: tuple[str, ...] = ()
    norm_bias: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    attention_prunable: bool = True
    attention_refusal: str = ""
    aux_loss: str | None = None
    export_model_type: str | None = None

    @property
    def stock_model_type(self) -> str:
        return self.export_model_type or self.model_type

    # ------------------------------------------------------------------ configuration
    def expert_width_of(self, config) -> int:
        return getattr(config, self.expert_width)

    def num_experts_of(self, config) -> int:
        return getattr(config, self.num_experts)

    def top_k_of(self, config) -> int:
        return getattr(config, self.top_k)

    def head_dim_of(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def moe_layer_indices(self, config) -> list[int]:
        """Indices of the decoder layers that hold a sparse MoE block."""
        return [i for i in range(config.num_hidden_layers) if self.dense_layers.is_moe(config, i)]

    def shared_width_of(self, config) -> int | None:
        """Width of the shared expert (`None` for a family without one)."""
        shared = self.shared_expert
        if shared is None:
            return None
        if shared.width:
            return getattr(config, shared.width)
        return self.expert_width_of(config) * getattr(config, shared.count)

    def fixed_fields(self) -> tuple[str, ...]:
        """Every configuration field structured pruning keeps (sizes, expert count, top-k, biases, dense layers and,
        for MLA, the latent ranks and head widths)."""
        dense = self.dense_layers
        mla = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
        names = ("hidden_size", "vocab_size", "num_hidden_layers", self.num_experts, self.top_k, "head_dim",
                 self.qkv_bias, self.o_bias, self.lm_head_bias, self.mlp_bias, "tie_word_embeddings",
                 dense.listed, dense.sparse_step, dense.first_k, dense.width, *(mla if self.attention_kind == "mla"
                                                                               else ()))
        return tuple(dict.fromkeys(name for name in names if name))

    def pruned_fields(self) -> tuple[str, ...]:
        """The configuration fields pruning changes: expert width, heads and the shared expert's width (or
        count)."""
        shared = self.shared_expert
        names = (self.expert_width, "num_key_value_heads", "num_attention_heads",
                 shared.width or shared.count if shared else None)
        return tuple(name for name in names if name)

    def flag(self, config, name: str | None) -> bool:
        return bool(name and getattr(config, name, False))

    def aux_loss_function(self) -> Callable | None:
        """The family's load-balancing loss function, imported on first use."""
        if self.aux_loss is None:
            return None
        module, name = self.aux_loss.split(":")
        return getattr(importlib.import_module(module), name)

    # ------------------------------------------------------------------ modules
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(model, model.base_model_prefix).layers

    def moe_blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        """`{layer index: sparse MoE block}` for the MoE layers of `model`."""
        layers = self.decoder_layers(model)
        return {i: getattr(layers[i], self.moe_block) for i in self.moe_layer_indices(model.config)}

    def experts_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts)

    def router_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router)

    def shared_of(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, self.shared_expert.module) if self.shared_expert else None

    def attention_of(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention)


__all__ = ["MoeArchitecture", "SharedExpert", "DenseLayers"]
