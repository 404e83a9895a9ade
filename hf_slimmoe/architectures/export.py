"""Stock checkpoints: a (pruned) model saved so that plain transformers loads it, with no plugin and no remote code."""

from __future__ import annotations

import logging
import os

from transformers import CONFIG_MAPPING

from ..model.configuration_slimmoe import config_fields
from .registry import get_architecture

logger = logging.getLogger(__name__)



def stock_config(config):
    """The configuration a stock checkpoint of `config`'s family carries: the family's stock `model_type` and
    configuration class, the server-side `architectures` name (vLLM's registry) and, for GQA attention, an explicit
    `head_dim` (after pruning heads it is no longer `hidden_size // num_attention_heads`)."""
    arch = get_architecture(config)
    values = config_fields(config.to_dict())
    if arch.attention_prunable:
        values["head_dim"] = arch.head_dim_of(config)
    stock = CONFIG_MAPPING[arch.stock_model_type](**values)
    stock.architectures = [arch.architecture]
    return stock


def save_stock(model, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """Save `model` as a stock checkpoint of its family: the safetensors `save_pretrained` writes (transformers
    converts the fused experts back to the family's original key layout) and the config of [`stock_config`]."""
    model.save_pretrained(save_directory, **save_kwargs)
    stock_config(model.config).save_pretrained(save_directory)  # overwrites config.json only
    logger.info("Saved a stock %s checkpoint to %s", get_architecture(model).stock_model_type, save_directory)


__all__ = ["save_stock", "stock_config"]
