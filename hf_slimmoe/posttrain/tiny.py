"""Tiny random chat models and a tiny BPE tokenizer with a chat template, for CPU demos and tests (`tiny_init`)."""

from __future__ import annotations

import logging
import os

import torch

from ..utils.tokenization import CHAT_TEMPLATE, ENDOFTEXT, train_bpe_tokenizer
from .chat_data import DOCSTRING_MODULES
from .config import PostTrainScriptArguments

logger = logging.getLogger(__name__)


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a few local standard-library sources, with the Phi-style chat template
    `CHAT_TEMPLATE` (`<|end|>` ends a turn and is EOS, `<|pad|>` pads)."""
    import importlib

    files = [importlib.import_module(m).__file__ for m in DOCSTRING_MODULES[:6]]
    specials = [ENDOFTEXT, "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    return train_bpe_tokenizer(files, vocab_size, specials, bos_token=ENDOFTEXT, eos_token="<|end|>",
                               pad_token="<|pad|>", unk_token=ENDOFTEXT, chat_template=CHAT_TEMPLATE)


def build_tiny_chat_model(directory: str, tokenizer=None, seed: int = 0, **config_overrides) -> str:
    """Save a tiny random SlimMoE model and a tiny tokenizer to `directory` (CPU demos and tests); returns it."""
    from ..model.configuration_slimmoe import SlimMoeConfig
    from ..model.modeling_slimmoe import SlimMoeForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer()
    values = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    values.update(config_overrides)
    torch.manual_seed(seed)
    SlimMoeForCausalLM(SlimMoeConfig(**values)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def maybe_tiny_init(args: PostTrainScriptArguments, *paths: str | None) -> None:
    """With `args.tiny_init`, build tiny random models sharing one tokenizer at the `paths` that do not exist."""
    if not args.tiny_init:
        return
    paths = [p for p in paths if p]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing and len(missing) != len(paths):
        raise ValueError(
            f"tiny_init builds the student and the teacher together (one tokenizer), but only {missing} are missing: "
            "point both paths to new directories, or to existing models."
        )
    tokenizer = build_tiny_tokenizer() if missing else None
    for seed, path in enumerate(missing):
        logger.info("tiny_init: building a tiny random SlimMoE model and tokenizer in %s", path)
        build_tiny_chat_model(path, tokenizer, seed=seed)


__all__ = ["build_tiny_chat_model", "build_tiny_tokenizer", "maybe_tiny_init"]
