"""Models built on the meta device: every module and shape of a configuration's model, no memory and no weights."""

from __future__ import annotations

import functools
import json

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    """A family SlimMoE cannot score or slim, with the part and the reason in the message."""


def build_skeleton(config) -> nn.Module:
    """A model of `config` on the meta device: every module and shape, no memory."""
    from transformers import AutoModelForCausalLM  # hf_slimmoe registers its own SlimMoE classes with it

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@functools.lru_cache(maxsize=16)
def _cached_skeleton(config_class, config_json: str) -> nn.Module:
    config = config_class.from_dict(json.loads(config_json))
    return build_skeleton(config)


def skeleton(config) -> nn.Module:
    """[`build_skeleton`], cached per configuration (class and values)."""
    return _cached_skeleton(type(config), config.to_json_string(use_diff=False))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitecture(f"{model.config.model_type}: no decoder layers at "
                                      f"{model.base_model_prefix}.layers.")
    return layers


__all__ = ["UnsupportedArchitecture", "build_skeleton", "skeleton", "decoder_layers"]
