"""What SlimMoE needs to know about one transformers MoE family, as data read off the model.

An [`MoeArchitecture`] names where a family keeps its decoder layers, routed experts, shared experts, router and
attention, which configuration fields hold the expert width and count, the family's own load-balancing loss, and
whether its attention can lose whole GQA groups. `derive.derive_architecture` fills it from a meta-device model of
the configuration. The pruning, scoring, expert-dropping and parameter-accounting code reads these facts and nothing
else: no code path tests a `model_type`.

The routed experts themselves are read through the layout flags that transformers' `@use_experts_implementation`
records on every experts module (`is_transposed`, `is_concatenated`, `has_bias`), so the same slicing serves
`gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` (gate half first: Mixtral, PhiMoE, OLMoE, Qwen, DeepSeek) and
gpt-oss's transposed, interleaved layout with biases (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .skeleton import decoder_layers, skeleton, submodule

# Configuration entries that are not part of the architecture: bookkeeping and runtime switches.
_NOT_STRUCTURAL = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
                   "output_router_logits", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
                   "chunk_size_feed_forward", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
                   "id2label", "label2id", "finetuning_task", "auto_map", "custom_pipelines"}


@dataclass(frozen=True)
class SharedExpert:
    """
    A dense GLU MLP beside the router (`gate_proj`/`up_proj` `[I_s, H]`, `down_proj` `[H, I_s]`), always active.

    module (`str`):
        Attribute of the sparse MoE block holding it (Qwen2-MoE `shared_expert`, DeepSeek `shared_experts`).
    width (`str`, *optional*):
        Configuration field of its own width (Qwen2-MoE `shared_expert_intermediate_size`).
    count (`str`, *optional*):
        With `tied`: the field `n` of `width = expert width * config.<n>` (DeepSeek / GLM `n_shared_experts`).
    gate (`str`, *optional*):
        Attribute of the sparse block holding its sigmoid gate, a `Linear(H, 1)` (Qwen2-MoE `shared_expert_gate`).
    tied (`bool`):
        Its width follows the routed expert width field: `x config.<count>`, or equal to it without `count`
        (Hunyuan, Llama-4); it narrows with the routed experts and has no size of its own.
    """

    module: str
    width: str | None = None
    count: str | None = None
    gate: str | None = None
    tied: bool = False


@dataclass(frozen=True)
class MoeArchitecture:
    """
    The facts SlimMoE reads about one transformers MoE family, derived from a meta-device model of its configuration
    ([`derive_architecture`]); the few that cannot be seen are overrides (`families.FAMILY_OVERRIDES`).

    Parameters that say where things are (paths inside a decoder layer of `model.<base_model_prefix>.layers`):
        model_type (`str`): `config.model_type`.
        architecture (`str`): the `architectures` name servers register (vLLM's registry), written on export;
            the causal LM class name unless overridden.
        export_model_type (`str`, *optional*): the stock `model_type` exports use (defaults to `model_type`;
            hf_slimmoe's own `slimmoe` exports as `phimoe`).
        moe_block (`str`): path of the sparse block holding the experts (`"mlp"`, `"block_sparse_moe"`,
            `"feed_forward"`, `"mixer"`); on dense layers the dense MLP sits there.
        experts (`str`): the fused experts module inside the block.
        router (`str`, *optional*): the block's router, a `weight [E, H]` holder.
        attention (`str`, *optional*): path of the GQA attention module (`q/k/v/o_proj`); `None` when no layer has
            one (MLA). Layers of a hybrid without it (linear attention, Mamba) keep their mixer.
        attention_class (`str`, *optional*): the GQA attention's class name: a hybrid's linear attention may sit at
            the same path with projections of the same names, and is told apart by its class.
        shared_expert ([`SharedExpert`], *optional*): the block's always-active dense expert.

    Parameters that name configuration fields:
        expert_width (`str`): the routed expert width field.
        num_experts (`str`): the routed experts per layer.
        top_k (`str`): experts per token.
        expert_groups (`str`, *optional*): router expert groups (DeepSeek `n_group`) when above 1; dropping experts
            would break group-limited routing, so `drop_experts` refuses.
        dense_tied (`bool`): the dense MLPs (at `moe_block` on the layers without experts) are sized by the expert
            width field too (Jamba), so they narrow with the routed experts, each keeping its own best neurons.

    Parameters that describe the modules:
        expert_bias (`bool`): the experts have biases (gpt-oss).
        expert_gate (`bool`, defaults to `True`): the experts are GLUs (`gate_up_proj`); `False` for `up_proj`-only
            experts (relu², Nemotron-H).
        expert_transposed / expert_concatenated (`bool`): the experts' layout flags (`[E, in, out]` weights; gate
            half first rather than interleaved), as `@use_experts_implementation` records them (for checkpoints).
        gated_queries (`bool`): `q_proj` gives each head its queries and then as many gate logits (Qwen3-Next), so a
            head owns `2 x head_dim` rows of it.
        query_head_parameters (`tuple[str]`): attention parameters with one entry per query head (gpt-oss `sinks`);
            they leave with their heads.

    Parameters that say what may be pruned:
        attention_prunable (`bool`): whether whole GQA groups can be removed and the stock class still builds the
            pruned model and computes the same function on the kept heads.
        attention_refusal (`str`): why not, for the error message.
        aux_loss (`str`, *optional*): `"module:function"` of the family's own load-balancing loss
            (`f(router_logits, num_experts, top_k, attention_mask)`); `None` when the family trains without one.
    """

    model_type: str
    architecture: str
    expert_width: str
    num_experts: str
    top_k: str
    moe_block: str = "mlp"
    experts: str = "experts"
    router: str | None = "gate"
    attention: str | None = "self_attn"
    attention_class: str | None = None
    shared_expert: SharedExpert | None = None
    expert_groups: str | None = None
    dense_tied: bool = False
    expert_bias: bool = False
    expert_gate: bool = True
    expert_transposed: bool = False
    expert_concatenated: bool = True
    gated_queries: bool = False
    query_head_parameters: tuple[str, ...] = ()
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
        """Indices of the decoder layers that hold routed experts (read off a meta-device model of `config`)."""
        return list(self.moe_blocks(skeleton(config)))

    def attention_layer_indices(self, config) -> list[int]:
        """Indices of the decoder layers with GQA attention (all but the linear-attention / Mamba ones of a hybrid)."""
        layers = self.decoder_layers(skeleton(config))
        return [i for i, layer in enumerate(layers) if self.attention_of(layer) is not None]

    def shared_width_of(self, config) -> int | None:
        """Width of the shared expert (`None` for a family without one)."""
        shared = self.shared_expert
        if shared is None:
            return None
        if not shared.tied:
            return getattr(config, shared.width)
        return self.expert_width_of(config) * (getattr(config, shared.count) if shared.count else 1)

    def fixed_fields(self, config) -> tuple[str, ...]:
        """Configuration fields of `config` structured pruning keeps: every structural one (sizes, counts, flags, layer
        lists, activation names, `head_dim`) except the pruned ones; not runtime switches, token ids or floats."""
        pruned = set(self.pruned_fields())
        names = [name for name, value in config.to_dict().items()
                 if name not in pruned and name not in _NOT_STRUCTURAL and not name.startswith("_")
                 and not name.endswith("token_id") and (value is None or isinstance(value, (int, str, list)))
                 and not isinstance(value, float)]
        return tuple(dict.fromkeys([*names, "head_dim"]))

    def pruned_fields(self) -> tuple[str, ...]:
        """The configuration fields pruning changes: expert width, heads and the shared expert's width (or count)."""
        shared = self.shared_expert
        names = (self.expert_width, "num_key_value_heads", "num_attention_heads",
                 (shared.count if shared.tied else shared.width) if shared else None)
        return tuple(name for name in names if name)

    def aux_loss_function(self) -> Callable | None:
        """The family's load-balancing loss function, imported on first use."""
        if self.aux_loss is None:
            return None
        module, name = self.aux_loss.split(":")
        return getattr(importlib.import_module(module), name)

    # ------------------------------------------------------------------ modules
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return decoder_layers(model)

    def moe_blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        """`{layer index: sparse MoE block}` for the layers of `model` that hold routed experts."""
        blocks = {}
        for index, layer in enumerate(self.decoder_layers(model)):
            block = layer.get_submodule(self.moe_block) if self.moe_block else layer
            if isinstance(getattr(getattr(block, self.experts, None), "down_proj", None), nn.Parameter):
                blocks[index] = block
        return blocks

    def dense_blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        """`{layer index: dense MLP}` for the layers whose MLP is sized by the expert width field (`dense_tied`)."""
        if not self.dense_tied:
            return {}
        moe = self.moe_blocks(model)
        mlps = {i: submodule(layer, self.moe_block) for i, layer in enumerate(self.decoder_layers(model))}
        return {i: mlp for i, mlp in mlps.items() if i not in moe and isinstance(getattr(mlp, "down_proj", None),
                                                                                 nn.Linear)}

    def dense_layer_indices(self, config) -> list[int]:
        """Indices of the decoder layers whose dense MLP narrows with the experts (`dense_tied`)."""
        return list(self.dense_blocks(skeleton(config)))

    def experts_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts)

    def router_of(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, self.router) if self.router else None

    def shared_of(self, block: nn.Module) -> nn.Module | None:
        return getattr(block, self.shared_expert.module) if self.shared_expert else None

    def attention_of(self, layer: nn.Module) -> nn.Module | None:
        """The layer's GQA attention module; `None` on a layer without one (linear attention, Mamba, MLA)."""
        module = submodule(layer, self.attention)
        return module if type(module).__name__ == self.attention_class else None


__all__ = ["MoeArchitecture", "SharedExpert"]
