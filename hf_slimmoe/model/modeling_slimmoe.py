"""SlimMoeForCausalLM: Phi-3.5-MoE's causal LM whose experts and attention can be slimmed in place.

The forward pass is stock `PhimoeForCausalLM` (logits are identical on the same weights); what this class adds is
loading of stock PhiMoE checkpoints as SlimMoE, export back to a stock `model_type: phimoe` checkpoint, and
`prune_to` (see `hf_slimmoe.pruning`). Weights live in transformers' fused layout:

    mlp.experts.gate_up_proj  [num_experts, 2 * intermediate_size, hidden_size]   (gate half first)
    mlp.experts.down_proj     [num_experts, hidden_size, intermediate_size]

and are saved in the original per-expert layout of Phi-3.5-MoE (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`,
`block_sparse_moe.gate.weight`) by transformers' own PhiMoE conversion mapping (registered for `slimmoe`), so stock
transformers and vLLM-style servers read them; `load_state_dict` reads that layout too (`read_stored_layout`).
"""

from __future__ import annotations

import os

import torch
from transformers import PhimoeForCausalLM, PretrainedConfig

from ..utils.modeling import read_stored_layout
from .configuration_slimmoe import SLIMMOE_TYPES, SlimMoeConfig

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _read_model_type(pretrained_model_name_or_path, **hub_kwargs) -> tuple[str | None, dict]:
    config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
    return config_dict.get("model_type"), config_dict


def _grouped_mm_aligned(config, dtype: torch.dtype) -> bool:
    """Whether expert rows (`intermediate_size` and `hidden_size` elements) are 16-byte aligned for `grouped_mm`."""
    multiple = max(1, 16 // torch.empty((), dtype=dtype).element_size())  # 4 in float32, 8 in bf16/fp16
    return config.intermediate_size % multiple == 0 and config.hidden_size % multiple == 0


class SlimMoeForCausalLM(PhimoeForCausalLM):
    """A PhiMoE causal LM with a `SlimMoeConfig`; loads stock Phi-3.5-MoE / Phi-mini-MoE / Phi-tiny-MoE checkpoints."""

    config_class = SlimMoeConfig
    config: SlimMoeConfig

    def __init__(self, config: SlimMoeConfig):
        super().__init__(config)
        # Trainer resumes with a plain `load_state_dict` of the per-expert layout `save_pretrained` writes
        read_stored_layout(self)

    # transformers decides which attention/experts kernels a class supports by reading its module's source. Ours runs
    # the stock PhiMoE modules, so it supports exactly what PhimoeForCausalLM does (without this, a SlimMoE model
    # built before any stock one falls back to eager experts, and the two would not give bit-identical logits).
    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return PhimoeForCausalLM._can_set_experts_implementation()

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return PhimoeForCausalLM._can_set_attn_implementation()

    def _grouped_mm_can_dispatch(self) -> bool:
        """The `grouped_mm` experts kernel needs 16-byte aligned rows (widths that are multiples of 4 in float32, of
        8 in bf16). Pruned widths need not be (say 100), so such a model runs the eager experts instead of failing;
        transformers falls back to eager when this raises and no kernel was requested explicitly. The check runs
        while the model is built, under the dtype it is built in."""
        super()._grouped_mm_can_dispatch()
        if not _grouped_mm_aligned(self.config, torch.get_default_dtype()):
            raise ValueError(
                f"grouped_mm needs 16-byte aligned expert rows; intermediate_size={self.config.intermediate_size}, "
                f"hidden_size={self.config.hidden_size} in {torch.get_default_dtype()} are not. "
                "Use experts_implementation='eager'."
            )
        return True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a SlimMoE checkpoint, or a stock PhiMoE one (converted to `SlimMoeConfig` with an explicit `head_dim`).

        Any other `model_type` (Llama, Mixtral, ...) raises a `ValueError` naming what was found and what is supported.
        """
        config = kwargs.pop("config", None)
        if config is None or isinstance(config, (str, os.PathLike)):
            source = pretrained_model_name_or_path if config is None else config
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            model_type, config_dict = _read_model_type(source, **hub_kwargs)
            if model_type not in SLIMMOE_TYPES:
                raise ValueError(
                    f"{source} holds a checkpoint of model_type {model_type!r} "
                    f"(architectures {config_dict.get('architectures')}); SlimMoeForCausalLM loads only "
                    f"{' and '.join(repr(t) for t in SLIMMOE_TYPES)} checkpoints (Phi-3.5-MoE, Phi-mini-MoE, "
                    "Phi-tiny-MoE and models compressed by hf_slimmoe)."
                )
            config = SlimMoeConfig.from_config_dict(config_dict)
        elif not isinstance(config, SlimMoeConfig):
            config = SlimMoeConfig.from_phimoe(config)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    def export_phimoe(self, save_directory: str | os.PathLike, **save_kwargs) -> None:
        """Save a stock `model_type: phimoe` checkpoint that plain transformers loads, with no plugin and no remote code:
        [`save_stock`], as for every family.

        The weights are the same safetensors `save_pretrained` writes (original per-expert key layout); only
        `config.json` differs: `model_type: phimoe`, `architectures: [PhiMoEForCausalLM]` (vLLM's name; transformers
        itself loads by `model_type`) and an explicit `head_dim`.
        """
        from ..architectures.export import save_stock

        save_stock(self, save_directory, **save_kwargs)

    def prune_to(self, target_config: PretrainedConfig, scores) -> "SlimMoeForCausalLM":
        """Prune in place to the sizes of `target_config` (e.g. `model.config.slimmed(...)`) and return the model:
        [`~hf_slimmoe.prune_to`], the surgery of every family.

        Every expert keeps its `target_config.intermediate_size` highest-scoring neurons (gate, up and down slices
        together, original order kept); every layer keeps its `target_config.num_key_value_heads` highest-scoring
        GQA groups (each KV head with its query heads, biases included). `scores` is a
        [`~hf_slimmoe.SensitivityScores`] from [`~hf_slimmoe.compute_sensitivity`]. The config is updated
        (`head_dim` kept). A target that is wider, changes a fixed size (hidden, vocabulary, layers, experts, top-k,
        head_dim) or the query heads per group, or scores of the wrong shape raise a `ValueError` naming the field
        before any weight changes; expert rows that are not 16-byte aligned switch the experts to the eager kernel.
        """
        from ..pruning.surgery import prune_to

        return prune_to(self, target_config, scores)


__all__ = ["SlimMoeForCausalLM"]
