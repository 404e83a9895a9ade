"""What scoring, distillation, evaluation and post-training need from a causal LM, in one place below them all.

- [`causal_lm`] / [`backbone`]: the transformers model inside a PEFT wrapper, and its decoder (the module whose last
  hidden state feeds `lm_head`);
- [`forward_hidden`]: a forward through any accelerate / DDP wrapper that also returns that hidden state;
- [`module_layout`] / [`read_stored_layout`]: a state dict in the key layout `save_pretrained` writes (transformers'
  conversion mapping reverted) converted to the module's own, as `from_pretrained` converts it;
- [`vocab_size`], [`check_same_vocabulary`], [`check_tokenizer_vocabulary`]: the vocabulary checks made before any
  compute;
- [`chunk_tokens`]: how many tokens a chunked projection to the vocabulary takes at a time, from a byte budget;
- [`teacher_topk`], [`teacher_topk_from_hidden`], [`teacher_topk_from_model`]: a model's top-k next-token ids and
  log-probabilities relative to its full vocabulary, without `(tokens, V)` logits for all tokens at once.
"""

from __future__ import annotations

from typing import Any

import torch

from . import CHUNK_BYTES  # the default budget of a chunked projection's working blocks


# ----------------------------------------------------------------------------------------------------- access
def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder of a causal LM (its `base_model_prefix` attribute, e.g. `model.model`, else `model.model` as in
    Llama-4's text model, whose prefix names the multimodal wrapper's attribute), through PEFT if present."""
    model = causal_lm(model)
    prefix = getattr(model, "base_model_prefix", "model")
    decoder = getattr(model, prefix, None) or getattr(model, "model", None)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no backbone attribute {prefix!r}; pass a causal LM model.")
    return decoder


def forward_hidden(model: torch.nn.Module, decoder: torch.nn.Module, **inputs) -> tuple[Any, torch.Tensor]:
    """Run `model(**inputs)` (through any accelerate wrapper); return its outputs and `decoder`'s last hidden state
    `(B, T, H)`, captured with a forward hook."""
    captured: dict[str, torch.Tensor] = {}
    handle = decoder.register_forward_hook(lambda module, args, output: captured.__setitem__("hidden", output[0]))
    try:
        outputs = model(**inputs)
    finally:
        handle.remove()
    return outputs, captured["hidden"]


# ------------------------------------------------------------------------------------------------ vocabulary
def module_layout(model: torch.nn.Module, state_dict: dict) -> dict:
    """`state_dict` under `model`'s own parameter names: keys in the layout `save_pretrained` writes (the family's
    conversion mapping reverted: PhiMoE's per-expert `w1/w2/w3`, Qwen's per-expert `gate_proj/up_proj/down_proj`,
    GraniteMoE's `input_linear`, ...) are renamed and converted as `from_pretrained` converts them, through
    transformers' own `get_model_conversion_mapping`; keys the model already has are kept as they are."""
    from copy import deepcopy

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    own = set(model.state_dict())
    if own.issuperset(state_dict):
        return state_dict
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    converted, pending = {}, {}
    for key in sorted(state_dict, key=dot_natural_key):  # experts in their order, as MergeModulelist stacks them
        name, pattern = (key, None) if key in own else rename_source_key(key, renamings, converters)
        if pattern is None:
            converted[name] = state_dict[key]
            continue
        if name not in pending:
            pending[name] = deepcopy(next(c for c in converters if pattern in c.source_patterns))
        pending[name].add_tensor(name, key, pattern, state_dict[key])
    for name, converter in pending.items():
        for target, value in converter.convert(name, model=model, config=model.config).items():
            converted[target] = value[0] if isinstance(value, list) else value
    return converted


def _convert_stored_layout(module, state_dict, prefix, *args) -> None:
    converted = module_layout(module, dict(state_dict)) if not prefix else state_dict
    if converted is not state_dict:
        state_dict.clear()
        state_dict.update(converted)


def read_stored_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model.load_state_dict` read the key layout `save_pretrained` writes (see [`module_layout`]) and return
    `model`. `Trainer` resumes from a checkpoint and loads its best model with a plain `load_state_dict` on the saved
    safetensors, which bypasses the conversion of `from_pretrained`: without this, the routed experts of a family
    saved in another layout would keep their current values (the load is not strict)."""
    if not getattr(model, "_reads_stored_layout", False):
        model.register_load_state_dict_pre_hook(_convert_stored_layout)
        model._reads_stored_layout = True
    return model


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output embeddings (the vocabulary its logits cover)."""
    return causal_lm(model).get_output_embeddings().weight.size(0)


def check_same_vocabulary(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Raise `ValueError` when teacher and student logits cover different vocabularies (top-k KD compares them id for
    id, so both must use one tokenizer)."""
    student_vocab, teacher_vocab = vocab_size(student), vocab_size(teacher)
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"The teacher's vocabulary (vocab_size {teacher_vocab}) differs from the student's ({student_vocab}): "
            "distillation needs teacher and student to share one tokenizer; prune the student from this teacher."
        )


def check_tokenizer_vocabulary(tokenizer, model_vocab_size: int, name: str = "the tokenizer") -> None:
    """Raise `ValueError` when `tokenizer` has more tokens than the model's `vocab_size`."""
    if len(tokenizer) > model_vocab_size:
        raise ValueError(f"{name} has {len(tokenizer)} tokens but the teacher's vocab_size is {model_vocab_size}: "
                         "teacher and student vocabularies must match.")


# ---------------------------------------------------------------------------------------------------- chunks


def chunk_tokens(vocab_size: int, blocks: float, chunk_size: int | None = None, chunk_bytes: int | None = None) -> int:
    """
    Tokens per chunk of a chunked projection to the vocabulary: `chunk_size` when given, else as many as fit
    `blocks` float32 `(chunk, vocab_size)` blocks (what that computation holds at its peak) in `chunk_bytes`
    (default [`CHUNK_BYTES`]), rounded down to a multiple of 8 from 8 tokens up, at least 1. Sizing chunks in bytes
    keeps their memory the same at every vocabulary: 1,024 tokens of float32 logits are 125 MiB at 32,064 tokens
    but 970 MiB at 248,320.
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be at least 1.")
        return int(chunk_size)
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if budget < 1:
        raise ValueError(f"chunk_bytes={budget} must be at least 1.")
    tokens = int(budget // (blocks * 4 * vocab_size))
    return max(1, tokens - tokens % 8 if tokens >= 8 else tokens)


# ----------------------------------------------------------------------------------------------------- top-k
def teacher_topk(logits: torch.Tensor, top_k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Top-k token ids of a teacher's logits and their log-probabilities relative to the full vocabulary.

    Args:
        logits (`torch.Tensor`):
            Teacher logits of shape `(..., V)`.
        top_k (`int`):
            Number of tokens kept per position; at most `V`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature: log-probabilities are those of `softmax(logits / temperature)`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ids (`int64`, shape `(..., top_k)`, by decreasing probability) and
        log-probabilities (`float32`, shape `(..., top_k)`), `logit / T - logsumexp(all logits / T)`.
    """
    vocab = logits.size(-1)
    if not 0 < top_k <= vocab:
        raise ValueError(f"top_k={top_k} must be between 1 and the vocabulary size ({vocab}).")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive.")
    scaled = logits.float() / temperature  # (..., V)
    values, ids = scaled.topk(top_k, dim=-1)  # (..., k)
    logprobs = values - torch.logsumexp(scaled, dim=-1, keepdim=True)  # (..., k)
    return ids.long(), logprobs


_TOPK_BLOCKS = 3  # the chunk's logits, their float32 scaled copy and logsumexp's temporary


@torch.no_grad()
def teacher_topk_from_hidden(
    hidden: torch.Tensor, lm_head: torch.nn.Module, top_k: int, temperature: float = 1.0,
    chunk_size: int | None = None, chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    [`teacher_topk`] of `lm_head(hidden)` for hidden states `(..., H)`, projecting `chunk_size` tokens at a time
    (`None`: as many as fit `chunk_bytes`, see [`chunk_tokens`]), so the teacher's `(tokens, V)` logits are never
    held for all tokens at once.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ids `(..., k)` int64 and log-probabilities `(..., k)` float32.
    """
    flat = hidden.reshape(-1, hidden.size(-1))  # (N, H)
    ids = torch.empty(flat.size(0), top_k, dtype=torch.long, device=flat.device)
    logprobs = torch.empty(flat.size(0), top_k, dtype=torch.float32, device=flat.device)
    chunk_size = chunk_tokens(lm_head.weight.size(0), _TOPK_BLOCKS, chunk_size, chunk_bytes)
    for start in range(0, flat.size(0), chunk_size):
        ids[start:start + chunk_size], logprobs[start:start + chunk_size] = teacher_topk(
            lm_head(flat[start:start + chunk_size]), top_k, temperature)  # (C, V) -> (C, k)
    shape = (*hidden.shape[:-1], top_k)
    return ids.view(shape), logprobs.view(shape)


@torch.no_grad()
def teacher_topk_from_model(
    teacher: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    top_k: int,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Teacher top-k ids and full-vocabulary log-probabilities at every position, without `(tokens, V)` logits.

    Args:
        teacher (`torch.nn.Module`): causal LM with a `base_model_prefix` backbone and output embeddings.
        input_ids (`torch.Tensor`): `(B, T)`.
        attention_mask (`torch.Tensor`, *optional*): `(B, T)`.
        top_k (`int`): tokens kept per position.
        temperature (`float`, *optional*, defaults to `1.0`): softmax temperature.
        chunk_size (`int`, *optional*): tokens projected to the vocabulary at a time; `None` sizes chunks from
            [`CHUNK_BYTES`] (see [`chunk_tokens`]).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ids `(B, T, k)` int64 and log-probabilities `(B, T, k)` float32; position
        `t` holds the teacher's prediction of token `t + 1`.
    """
    hidden = backbone(teacher)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    return teacher_topk_from_hidden(hidden, teacher.get_output_embeddings(), top_k, temperature, chunk_size)


__all__ = [
    "backbone",
    "causal_lm",
    "check_same_vocabulary",
    "check_tokenizer_vocabulary",
    "module_layout",
    "read_stored_layout",
    "chunk_tokens",
    "forward_hidden",
    "teacher_topk",
    "teacher_topk_from_hidden",
    "teacher_topk_from_model",
    "vocab_size",
]
