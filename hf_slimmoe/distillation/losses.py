"""Top-k knowledge-distillation loss (SlimMoE Eq. 3), computed from hidden states in chunks of tokens.

The teacher is summarised per token by its top-k token ids and their log-probabilities *relative to its full
vocabulary* (`logit - logsumexp(all logits)`), which is what `hf_slimmoe.modeling_utils.teacher_topk` returns and what the
teacher cache stores. The loss is `KL(p_teacher_topk || p_student)` where the teacher's probabilities outside its top-k are 0.
"""

from __future__ import annotations

import torch


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    # (C, V) in the model's dtype, bias fused; then float32 and the temperature in place (no extra (C, V) copies)
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    logits = logits.float()
    return logits if temperature == 1.0 else logits.div_(temperature)


class _WeightedTokenCrossEntropy(torch.autograd.Function):
    """
    `sum_n w_n * sum_k c_nk * (a_nk - log q_n[ids_nk])` with `q_n = softmax((h_n W^T + b) / T)`.

    With `c = p_teacher` and `a = log p_teacher` this is the top-k KL; with `k = 1, c = 1, a = 0` it is the
    cross-entropy of a label. The gradients are computed in the forward pass, one chunk at a time, while the chunk's
    softmax is at hand (the loss is a scalar, so the backward only rescales them): peak extra memory is one
    `(chunk_size, V)` float block instead of `(N, V)`, and no logits are recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, coef, const, token_weight, temperature, chunk_size, compute_grad):
        # hidden (N, H); weight (V, H); bias (V,) | None; ids (N, k) int64; coef (N, k) float32;
        # const (N,) float32 = sum_k coef * a; token_weight (N,) float32
        # forward() always runs under no_grad: `compute_grad` says whether the caller's graph needs the gradients
        need_h, need_w, need_b = (compute_grad and needs for needs in ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b and bias is not None else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        coef_sum = coef.sum(-1)  # (N,)
        for start in range(0, hidden.size(0), chunk_size):
            end = min(start + chunk_size, hidden.size(0))
            h = hidden[start:end]  # (C, H)
            logits = _chunk_logits(h, weight, bias, temperature)  # (C, V) float32
            lse = torch.logsumexp(logits, dim=-1)  # (C,)
            picked = logits.gather(-1, ids[start:end]) - lse[:, None]  # (C, k) student log-probs at the ids
            per_token = const[start:end] - (coef[start:end] * picked).sum(-1)  # (C,)
            total = total + (token_weight[start:end] * per_token).sum()
            if need_h or need_w or need_b:
                # d loss / d logits = w * (sum_k c * softmax - scatter(c)) / T, built in place on the logits block
                grad_logits = logits.sub_(lse[:, None]).exp_().mul_(coef_sum[start:end, None])  # (C, V)
                grad_logits.scatter_add_(-1, ids[start:end], -coef[start:end])
                grad_logits.mul_((token_weight[start:end] / temperature)[:, None])
                if need_h:
                    grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)  # (C, H)
                if need_w:
                    grad_weight += grad_logits.t() @ h.float()  # (V, H)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)  # (V,)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _weighted_token_cross_entropy(hidden, weight, bias, ids, coef, const, token_weight, temperature, chunk_size):
    return _WeightedTokenCrossEntropy.apply(
        hidden, weight, bias, ids, coef, const, token_weight, temperature, chunk_size, torch.is_grad_enabled()
    )


def _flatten_valid(
    student_hidden: torch.Tensor, mask: torch.Tensor | None, *per_token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Flatten `(..., H)` hidden states and `(..., *)` per-token tensors to the masked tokens only."""
    hidden_size = student_hidden.size(-1)
    hidden = student_hidden.reshape(-1, hidden_size)  # (N, H)
    if mask is None:
        valid = torch.ones(hidden.size(0), dtype=torch.bool, device=hidden.device)
    else:
        if mask.numel() != hidden.size(0):
            raise ValueError(
                f"mask has {mask.numel()} entries (shape {tuple(mask.shape)}) but student_hidden has "
                f"{hidden.size(0)} tokens (shape {tuple(student_hidden.shape)}); pass one mask entry per token."
            )
        valid = mask.reshape(-1).to(hidden.device) != 0  # (N,)
    flat = []
    for tensor in per_token:
        if tensor.shape[: student_hidden.dim() - 1] != student_hidden.shape[:-1] and tensor.size(0) != hidden.size(0):
            raise ValueError(
                f"A per-token tensor of shape {tuple(tensor.shape)} does not match student_hidden "
                f"{tuple(student_hidden.shape)}: pass one row per token, e.g. ids of shape (B, T, k) for (B, T, H)."
            )
        flat.append(tensor.reshape(hidden.size(0), -1).to(hidden.device)[valid])
    return hidden[valid], valid, flat


def topk_kl_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    renormalize: bool = False,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """
    KL divergence from the teacher's top-k distribution to the student's, from the student's hidden states.

    Per token, with `p` the teacher's top-k probabilities (the rest of the vocabulary at probability 0) and
    `q = softmax((student_hidden @ lm_head_weight.T + lm_head_bias) / temperature)` over the full vocabulary:
    `KL = sum_k p_k * (log p_k - log q[id_k])`. With `renormalize=True`, `p` is first renormalized to sum to 1 over
    its k entries. With `k = V` this is the full-vocabulary KL.

    Memory: tokens are projected to the vocabulary `chunk_size` at a time and each chunk's gradient with respect to
    the hidden states, weight and bias is computed while its softmax is at hand, so only one `(chunk_size, V)`
    float block lives at a time, never the `(tokens, V)` logits; masked tokens are dropped before projection.

    Args:
        student_hidden (`torch.Tensor`):
            Student last hidden states (input of the `lm_head`), shape `(N, H)` or `(B, T, H)`, already aligned
            with the teacher targets (for causal LMs: position `t` predicts token `t + 1`).
        lm_head_weight (`torch.Tensor`):
            Student `lm_head` weight of shape `(V, H)`.
        lm_head_bias (`torch.Tensor` or `None`):
            Student `lm_head` bias of shape `(V,)`, or `None`.
        teacher_topk_ids (`torch.Tensor`):
            Teacher top-k token ids, integer, shape `(N, k)` or `(B, T, k)`.
        teacher_topk_logprobs (`torch.Tensor`):
            Teacher log-probabilities of those ids relative to the full vocabulary, at the same `temperature`
            (see [`teacher_topk`]), shape `(N, k)` or `(B, T, k)`.
        mask (`torch.Tensor`, *optional*):
            Bool or 0/1 tensor of shape `(N,)` or `(B, T)`; non-zero marks tokens counted in the loss. `None`
            counts every token.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of the student; the teacher log-probabilities must have been taken at the same one.
            No `T**2` factor is applied.
        renormalize (`bool`, *optional*, defaults to `False`):
            Renormalize the teacher's top-k probabilities to sum to 1 (the variant of the ablation) instead of
            keeping them relative to the full vocabulary.
        chunk_size (`int`, *optional*, defaults to `1024`):
            Number of tokens projected to the vocabulary at a time.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: sum of per-token KL over the counted tokens divided by their number (0 when there are none).
            `"sum"`: the plain sum. For gradient accumulation and multiple ranks use `"sum"` and divide by the
            number of counted tokens of the whole global batch (Trainer's `num_items_in_batch`), times the number
            of processes under DDP since DDP averages the gradients; then accumulated micro-batches give the same
            loss and gradients as one big batch.

    Returns:
        `torch.Tensor`: scalar float32 loss; gradients flow to `student_hidden`, `lm_head_weight` and `lm_head_bias`.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; use 'mean' or 'sum'.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1.")
    vocab_size, hidden_size = lm_head_weight.shape
    if student_hidden.size(-1) != hidden_size:
        raise ValueError(
            f"student_hidden has hidden size {student_hidden.size(-1)} but lm_head_weight is {tuple(lm_head_weight.shape)};"
            " pass the hidden states that feed this lm_head."
        )
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape."
        )
    top_k = teacher_topk_ids.size(-1)
    if top_k > vocab_size:
        raise ValueError(f"The teacher top-k has k={top_k} entries, more than the student vocabulary ({vocab_size}).")
    hidden, _, (ids, logprobs) = _flatten_valid(student_hidden, mask, teacher_topk_ids, teacher_topk_logprobs)
    ids = ids.long()  # (n, k)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"teacher_topk_ids hold ids outside [0, {vocab_size}) on counted tokens: the teacher's vocabulary does "
            "not match the student's, or the mask counts padding positions."
        )
    logprobs = logprobs.float()  # (n, k)
    if renormalize:
        logprobs = logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)
    probs = logprobs.exp()  # (n, k)
    const = (probs * logprobs).sum(-1)  # (n,) teacher negative entropy over its top-k
    num_tokens = hidden.size(0)
    scale = 1.0 / max(num_tokens, 1) if reduction == "mean" else 1.0
    token_weight = torch.full((num_tokens,), scale, dtype=torch.float32, device=hidden.device)
    return _weighted_token_cross_entropy(
        hidden, lm_head_weight, lm_head_bias, ids, probs, const, token_weight, float(temperature), chunk_size
    )


def chunked_cross_entropy(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """
    Next-token cross-entropy from hidden states, chunked like [`topk_kl_loss`] (it is its `k = 1`, one-hot case).

    Args:
        student_hidden (`torch.Tensor`): hidden states `(N, H)` or `(B, T, H)` aligned with `labels`.
        lm_head_weight (`torch.Tensor`): `(V, H)`.
        lm_head_bias (`torch.Tensor` or `None`): `(V,)`.
        labels (`torch.Tensor`): target ids `(N,)` or `(B, T)`; `ignore_index` positions are not counted.
        ignore_index (`int`, *optional*, defaults to `-100`): label value that is not counted.
        chunk_size (`int`, *optional*, defaults to `1024`): tokens projected at a time.
        reduction (`str`, *optional*, defaults to `"mean"`): `"mean"` over counted tokens or `"sum"`.

    Returns:
        `torch.Tensor`: scalar float32 loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; use 'mean' or 'sum'.")
    labels = labels.reshape(-1)
    hidden, _, (ids,) = _flatten_valid(student_hidden, labels != ignore_index, labels)
    num_tokens = hidden.size(0)
    coef = torch.ones((num_tokens, 1), dtype=torch.float32, device=hidden.device)
    const = torch.zeros((num_tokens,), dtype=torch.float32, device=hidden.device)
    scale = 1.0 / max(num_tokens, 1) if reduction == "mean" else 1.0
    token_weight = torch.full((num_tokens,), scale, dtype=torch.float32, device=hidden.device)
    return _weighted_token_cross_entropy(
        hidden, lm_head_weight, lm_head_bias, ids.long(), coef, const, token_weight, 1.0, chunk_size
    )


@torch.no_grad()
def chunked_student_topk_stats(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_topk_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For evaluation: the student's argmax token `(N,)` and its log-probabilities at the teacher's top-k ids
    `(N, k)` (relative to its full vocabulary, at `temperature`), for hidden `(N, H)`, one `(chunk, V)` block at a time.
    """
    argmax = torch.empty(hidden.size(0), dtype=torch.long, device=hidden.device)
    logprobs = torch.empty(teacher_topk_ids.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), chunk_size):
        end = start + chunk_size
        logits = _chunk_logits(hidden[start:end], lm_head_weight, lm_head_bias, temperature)  # (C, V) float32
        argmax[start:end] = logits.argmax(-1)
        logprobs[start:end] = logits.gather(-1, teacher_topk_ids[start:end].to(logits.device)) - torch.logsumexp(
            logits, dim=-1, keepdim=True)
    return argmax, logprobs


def topk_tail_kl(teacher_topk_logprobs: torch.Tensor, student_topk_logprobs: torch.Tensor) -> torch.Tensor:
    """
    Per-token KL between teacher and student coarse-grained to `k + 1` outcomes: the teacher's top-k tokens and
    "any other token". Computable from a top-k cache, it is a true KL divergence (>= 0, and 0 exactly when the student
    gives every top-k token and the rest of the vocabulary the teacher's probabilities), unlike the value of the
    top-k training loss, whose teacher distribution does not sum to 1 and which goes negative once the student puts
    more mass on the top-k than the teacher does. With `k = V` it is the full KL.

    Args:
        teacher_topk_logprobs (`torch.Tensor`): `(..., k)` teacher log-probabilities relative to its full vocabulary.
        student_topk_logprobs (`torch.Tensor`): `(..., k)` student log-probabilities at the same token ids.

    Returns:
        `torch.Tensor`: `(...)` float32 per-token divergences.
    """
    p_log, q_log = teacher_topk_logprobs.float(), student_topk_logprobs.float()
    p = p_log.exp()
    head = (p * (p_log - q_log)).sum(-1)  # (...)
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - q_log.exp().sum(-1)).clamp(min=torch.finfo(torch.float32).tiny)
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=torch.finfo(torch.float32).tiny).log() - q_rest.log()),
                       torch.zeros_like(p_rest))
    return head + tail
