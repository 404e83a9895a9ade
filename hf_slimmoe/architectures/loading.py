"""Configurations and models of any supported family from config.json values or a checkpoint directory.

PhiMoE checkpoints (and hf_slimmoe's own `slimmoe` ones) become [`SlimMoeConfig`] / [`SlimMoeForCausalLM`], as they
always have in the pipeline; every other supported family stays its own stock transformers class.
"""

from __future__ import annotations

import os

from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig

from ..configuration_slimmoe import SLIMMOE_TYPES, SlimMoeConfig, config_fields
from ..modeling_slimmoe import SlimMoeForCausalLM
from .registry import check_model_type, get_architecture

def config_from_dict(values: dict, default_model_type: str = "slimmoe"):
    """A configuration from config.json-style `values`: `model_type` `phimoe`/`slimmoe` (the default when absent)
    gives a [`SlimMoeConfig`] with an explicit `head_dim`; any other supported `model_type` its stock class.

    Raises:
        `ValueError`: for an unsupported `model_type` (naming the supported ones) or values its class refuses.
    """
    model_type = values.get("model_type") or default_model_type
    check_model_type(model_type)
    if model_type in SLIMMOE_TYPES:
        return SlimMoeConfig.from_config_dict(values)
    return CONFIG_MAPPING[model_type](**config_fields(values))


def new_model(config):
    """A freshly initialised model of `config`'s family (`SlimMoeForCausalLM` for SlimMoE configurations)."""
    if isinstance(config, SlimMoeConfig):
        return SlimMoeForCausalLM(config)
    get_architecture(config)
    return AutoModelForCausalLM.from_config(config)


def load_model(path: str | os.PathLike, **kwargs):
    """`from_pretrained` of a checkpoint of any supported family: PhiMoE / SlimMoE as [`SlimMoeForCausalLM`], the
    others as their stock class (through `AutoModelForCausalLM`). `kwargs` go to `from_pretrained`."""
    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    values, _ = PretrainedConfig.get_config_dict(path, **hub)
    model_type = values.get("model_type")
    check_model_type(model_type)
    if model_type in SLIMMOE_TYPES:
        return SlimMoeForCausalLM.from_pretrained(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


__all__ = ["SLIMMOE_TYPES", "config_from_dict", "load_model", "new_model"]
