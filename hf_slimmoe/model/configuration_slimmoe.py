"""SlimMoE configuration: a PhiMoE configuration whose sizes may have been slimmed.

A SlimMoE model is architecturally a Phi-3.5-MoE model (LayerNorm with bias, sparsemixer top-2 routing, fused experts)
whose expert width (`intermediate_size`) and number of GQA groups (`num_key_value_heads`, with the query heads of each
group) were reduced. Because pruning never touches `head_dim`, it is always stored explicitly: after pruning,
`head_dim != hidden_size // num_attention_heads`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PhimoeConfig

#: The `model_type`s read as a [`SlimMoeConfig`] / [`SlimMoeForCausalLM`]: stock PhiMoE and hf_slimmoe's own.
SLIMMOE_TYPES = ("phimoe", "slimmoe")

# Keys of a config dict (`to_dict()`, config.json) that name the class, the library version or remote code, not a size
CONFIG_METADATA_KEYS = ("model_type", "transformers_version", "architectures", "auto_map")


def config_fields(values: dict) -> dict:
    """The configuration fields of a config dict, without its `CONFIG_METADATA_KEYS`."""
    return {k: v for k, v in values.items() if k not in CONFIG_METADATA_KEYS}


@strict
class SlimMoeConfig(PhimoeConfig):
    r"""
    Configuration of a [`SlimMoeForCausalLM`]. Every field of [`~transformers.PhimoeConfig`] is accepted with the same
    meaning and default (the defaults describe Phi-3.5-MoE: hidden 4096, 32 layers, 16 experts, top-2, expert width
    6400, 32 query / 8 key-value heads), plus:

    head_dim (`int`, *optional*):
        Width of one attention head. Defaults to `hidden_size // num_attention_heads` of the configuration it is first
        created with and is then kept fixed, so that pruning attention heads never changes it.

    Parameter accounting is analytic and instant even for a 42B configuration:

    ```python
    >>> from hf_slimmoe import SlimMoeConfig
    >>> cfg = SlimMoeConfig(attention_bias=True, lm_head_bias=True)  # Phi-3.5-MoE sizes
    >>> round(cfg.num_parameters() / 1e9, 1), round(cfg.num_active_parameters() / 1e9, 1)
    (41.9, 6.6)
    >>> tiny = cfg.slimmed(intermediate_size=448, num_key_value_heads=4)  # Phi-tiny-MoE sizes, 16/4 heads
    >>> round(tiny.num_parameters() / 1e9, 1)
    3.8
    ```"""

    model_type = "slimmoe"
    # the generic MoE name TRL's fused LM head reads for the load-balancing loss
    attribute_map = {"num_experts": "num_local_experts"}

    head_dim: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check_sizes()

    def _check_sizes(self):
        """Refuse sizes no model can be built with, with a `ValueError` naming the field."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SlimMoeConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"SlimMoeConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}): every GQA group has the same number of query heads."
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"SlimMoeConfig.num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_local_experts "
                f"({self.num_local_experts})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"SlimMoeConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.")

    # ------------------------------------------------------------------ stock interop
    @classmethod
    def from_config_dict(cls, values: dict) -> "SlimMoeConfig":
        """A SlimMoeConfig from a PhiMoE or SlimMoE config dict (a config.json, or `to_dict()`): the metadata keys are
        dropped and a missing `head_dim` is `hidden_size // num_attention_heads`."""
        return cls(**config_fields(values))

    @classmethod
    def from_phimoe(cls, config: PhimoeConfig) -> "SlimMoeConfig":
        """Build a SlimMoeConfig from a stock `PhimoeConfig` (for example Phi-3.5-MoE's), fixing `head_dim`."""
        if config.model_type not in ("phimoe", "slimmoe"):
            raise ValueError(
                f"Cannot build a SlimMoeConfig from a configuration of model_type {config.model_type!r}; "
                "supported: 'phimoe' (Phi-3.5-MoE, Phi-mini-MoE, Phi-tiny-MoE) and 'slimmoe'."
            )
        return cls.from_config_dict(config.to_dict())

    def to_phimoe(self) -> PhimoeConfig:
        """A stock `PhimoeConfig` with the same sizes; `head_dim` travels as an attribute stock PhiMoE reads, and
        `architectures` is `PhiMoEForCausalLM`, the name vLLM and SGLang register."""
        config = PhimoeConfig(**config_fields(self.to_dict()))
        config.architectures = ["PhiMoEForCausalLM"]  # the name vLLM registers; transformers loads by model_type
        return config

    # ------------------------------------------------------------------ slimming
    def slimmed(self, intermediate_size: int | None = None, num_key_value_heads: int | None = None) -> "SlimMoeConfig":
        """A copy with a narrower expert width and/or fewer GQA groups: [`slim_config`], the same for every family.

        The number of query heads per KV group and `head_dim` are kept, so `num_key_value_heads=4` on a 32/8 model
        gives 16/4 heads. Raises `ValueError` naming the field for a size that is not a positive integer no larger
        than the current one.
        """
        from ..architectures.slimming import slim_config

        return slim_config(self, expert_width=intermediate_size, num_key_value_heads=num_key_value_heads)

    # ------------------------------------------------------------------ parameter accounting
    def num_parameters(self) -> int:
        """Total parameters of a model with this configuration (embeddings, lm_head with bias, attention, norms,
        routers, all experts), counted as for every family ([`count_parameters`], a meta-device model)."""
        from ..architectures.registry import count_parameters

        return count_parameters(self)[0]

    def num_active_parameters(self) -> int:
        """Parameters used per token: as `num_parameters()`, counting only `num_experts_per_tok` experts per layer."""
        from ..architectures.registry import count_parameters

        return count_parameters(self)[1]


__all__ = ["SLIMMOE_TYPES", "SlimMoeConfig", "config_fields"]
