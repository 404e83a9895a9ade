"""Models built on the meta device: every module and shape of a configuration's model, no memory and no weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    """A family SlimMoE cannot score or slim, with the part and the reason in the message."""


def build_skeleton(config) -> nn.Module:
    """A model of `config` on the meta device: every module and shape, no memory. Built from a copy (`from_config`
    sets the kernels on the configuration it is given) with the eager experts kernel, which takes any width."""
    from transformers import AutoModelForCausalLM  # hf_slimmoe registers its own SlimMoE classes with it
    from transformers.initialization import no_init_weights

    # meta tensors hold no values: initializing them only costs time (torch's init functions run on them all the
    # same); `no_init_weights` also skips the tying `init_weights` does on the meta device, so the model ties here
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), experts_implementation="eager")
    model.tie_weights()
    return model


_SKELETONS: dict[tuple, nn.Module] = {}


def config_key(config) -> tuple:
    """A hashable key of a configuration: its class and every value."""
    return type(config), config.to_json_string(use_diff=False)


def skeleton(config) -> nn.Module:
    """[`build_skeleton`], cached per configuration (class and values; the last 16 kept)."""
    key = config_key(config)
    if key not in _SKELETONS:
        if len(_SKELETONS) >= 16:
            _SKELETONS.pop(next(iter(_SKELETONS)))
        try:
            _SKELETONS[key] = build_skeleton(config)
        except Exception as error:  # the family's own classes refuse the configuration
            raise UnsupportedArchitecture(f"{config.model_type}: model: transformers cannot build a model of this "
                                          f"configuration ({type(error).__name__}: {error})") from error
    return _SKELETONS[key]


def submodule(module: nn.Module, path: str | None) -> nn.Module | None:
    """`module.get_submodule(path)`, or `None` when `path` is empty or names nothing there."""
    if not path:
        return None
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    bases = (getattr(model, model.base_model_prefix, None), getattr(model, "model", None), model)
    layers = next((base.layers for base in bases if isinstance(getattr(base, "layers", None), nn.ModuleList)), None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitecture(f"{model.config.model_type}: no decoder layers at "
                                      f"{model.base_model_prefix}.layers.")
    return layers


__all__ = ["UnsupportedArchitecture", "build_skeleton", "skeleton", "submodule", "decoder_layers"]
