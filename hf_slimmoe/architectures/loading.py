"""Configurations and models of any supported family from config.json values or a checkpoint directory.

PhiMoE checkpoints (and hf_slimmoe's own `slimmoe` ones) become [`SlimMoeConfig`] / [`SlimMoeForCausalLM`], as they
always have in the pipeline; every other supported family stays its own stock transformers class.
"""

from __future__ import annotations

import os

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig

from ..model.configuration_slimmoe import SLIMMOE_TYPES, SlimMoeConfig, config_fields
from ..model.modeling_slimmoe import SlimMoeForCausalLM
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


def load_sharded(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 **kwargs):
    """
    [`load_model`] of `path` sharded with FSDP2 over the default process group (one `fully_shard` unit per decoder
    layer and the root, `distributed.shard_decoder_layers`) without every process holding the whole model: rank 0
    loads the checkpoint, the other ranks build the model on the meta device, and rank 0's weights are broadcast into
    every rank's shards (`torch.distributed.checkpoint`'s `set_model_state_dict` with `broadcast_from_rank0`); the
    buffers (rotary frequencies, ...) are broadcast too. Host memory: the whole model on rank 0, a shard elsewhere.
    The shards are placed on `device` (this process's device). In a single process it is [`load_model`], unsharded.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ..utils.distributed import rank_and_world, shard_decoder_layers

    rank, world = rank_and_world()
    if world == 1:
        return load_model(path, dtype=dtype, **kwargs).to(device)
    if rank == 0:
        model = load_model(path, dtype=dtype, **kwargs)
        full = model.state_dict()  # the whole model's tensors, kept by rank 0 until they are broadcast
    else:
        hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        config = config_from_dict(PretrainedConfig.get_config_dict(path, **hub)[0])
        with torch.device("meta"):
            model = new_model(config).to(dtype)
        full = {}
    _take_dtypes_of_rank_0(model)
    shard_decoder_layers(model)
    if rank == 0:
        model.to(device)  # its shards; `full` keeps the whole tensors on the host until they are broadcast
    else:
        model.to_empty(device=device)  # storage for this rank's shards, filled below
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)
    return model


def _take_dtypes_of_rank_0(model) -> None:
    """Give every parameter and buffer of `model` the dtype it has on rank 0 (a collective). `from_pretrained` keeps
    some tensors in float32 whatever `dtype` asks (rotary frequencies, a family's `_keep_in_fp32_modules`); a model
    built and cast on the meta device must hold the same dtypes for the shards and buffers broadcast into it."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    dtypes = [{name: tensor.dtype for name, tensor in tensors.items()}]
    torch.distributed.broadcast_object_list(dtypes, src=0)
    for name, tensor in tensors.items():
        if tensor.dtype != dtypes[0][name]:
            tensor.data = tensor.data.to(dtypes[0][name])


__all__ = ["SLIMMOE_TYPES", "config_from_dict", "load_model", "load_sharded", "new_model"]
