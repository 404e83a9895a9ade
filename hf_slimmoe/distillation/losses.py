"""Knowledge-distillation losses computed from hidden states in chunks of tokens, never `(tokens, vocab)` logits.

Four objectives, each a public function with exact gradients (custom autograd, one `(chunk, V)` block at a time):

- [`topk_kl_loss`] (`kd_loss="topk"`, SlimMoE Eq. 3): `KL(p_teacher_topk || q)` with the teacher's probabilities
  outside its top-k set to 0. Its minimizer is the renormalized top-k, so it teaches the student to drop the tail.
- [`topk_tail_kl_loss`] (`"topk_tail"`): the KL over the top-k tokens plus one "rest of the vocabulary" outcome.
- [`sampled_kd_loss`] (`"sampled"`): the cross-entropy on `S` tokens sampled from the teacher per position, an
  unbiased estimate of the full cross-entropy (and so of the full-KL gradient).
- [`full_kl_loss`] (`"full"`): the full-vocabulary KL from both models' hidden states (online teacher).

The teacher is summarised per token by its top-k ids and log-probabilities *relative to its full vocabulary*
(`hf_slimmoe.utils.modeling.teacher_topk`), or by `S` ids drawn from its distribution
([`teacher_samples_from_hidden`]); this is what the teacher caches store.

Chunks are sized in bytes, not tokens: with `chunk_size=None` (the default) each function takes as many tokens at a
time as fit its `(chunk, V)` float32 working blocks in `chunk_bytes` (default `hf_slimmoe.utils.CHUNK_BYTES`,
128 MiB; see `chunk_tokens`), so the extra memory of a loss is the same at a vocabulary of 32,064 and of 248,320.
"""

from __future__ import annotations

import math

import torch

from ..utils.modeling import chunk_tokens

# float32 `(chunk, V)` blocks each computation holds at its peak (what `chunk_tokens` divides the byte budget by),
# counted from the code below and checked with `benchmarks/bench_large_vocab.py`
_CE_BLOCKS = 2  # the chunk's logits (reused in place for the gradient) + logsumexp's temporary
_TAIL_BLOCKS = 2  # the same; the masked logsumexp of the rest reuses the logits block
_FULL_BLOCKS = 4  # student logits, teacher log-probabilities and probabilities, + a logsumexp temporary
_SAMPLE_BLOCKS = 5  # float32 logits, then float64 probabilities (2 units) and softmax's float64 input (2 units)


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    # (C, V) in the model's dtype, bias fused; then float32 and the temperature in place (no extra (C, V) copies)
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    logits = logits.float()
    return logits if temperature == 1.0 else logits.div_(temperature)


class _ChunkedHeadLoss(torch.autograd.Function):
    """
    A scalar loss `sum_n f_n(u_n)` of the student's scaled logits `u_n = (h_n W^T + b) / T`, computed `chunk_size`
    tokens at a time (an `int`, see `chunk_tokens`) by `chunk_fn(start, end, u)`: it gets the chunk's float32 `(C, V)`
    block `u` (which it may overwrite) and returns the chunk's loss sum and `d loss / d u` (`(C, V)`, usually `u`'s
    storage reused in place).

    The gradients with respect to the hidden states, weight and bias are computed in the forward pass, one chunk at a
    time, while the chunk's softmax is at hand (the loss is a scalar, so the backward only rescales them): peak extra
    memory is the chunk's `(chunk_size, V)` block(s) instead of `(N, V)`, and no logits are recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_fn, temperature, chunk_size, compute_grad):
        # hidden (N, H); weight (V, H); bias (V,) | None; forward() always runs under no_grad: `compute_grad` says
        # whether the caller's graph needs the gradients
        need_h, need_w, need_b = (compute_grad and needs for needs in ctx.needs_input_grad[:3])
        need_b = need_b and bias is not None
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_size):
            end = min(start + chunk_size, hidden.size(0))
            h = hidden[start:end]  # (C, H)
            loss, grad_logits = chunk_fn(start, end, _chunk_logits(h, weight, bias, temperature), need_h or need_w
                                         or need_b)  # grad_logits: d loss / d u, (C, V) float32
            total = total + loss
            if need_h or need_w or need_b:
                grad_logits.div_(temperature)  # d / d logits = (1 / T) d / d u
                if need_h:
                    grad_hidden[start:end] = _vocab_matmul(grad_logits.to(weight.dtype), weight).to(hidden.dtype)
                if need_w:
                    grad_weight.addmm_(grad_logits.t(), h.float())  # (V, H), no (V, H) temporary
                if need_b:
                    grad_bias += grad_logits.sum(0)  # (V,)
            del grad_logits  # freed before the next chunk's logits exist
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
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _vocab_matmul(grad_logits: torch.Tensor, weight: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """`grad_logits (C, V) @ weight (V, H)` summed over the vocabulary in blocks of `block` ids, the partial products
    added in float64: one float32 dot product over V = 248,320 terms is off by about 1e-4 relative."""
    out = torch.zeros(grad_logits.size(0), weight.size(1), dtype=torch.float64, device=weight.device)  # (C, H)
    for start in range(0, weight.size(0), block):
        out += (grad_logits[:, start:start + block] @ weight[start:start + block]).double()
    return out.to(weight.dtype)


def _chunked_head_loss(hidden, weight, bias, chunk_fn, temperature, chunk_size):
    return _ChunkedHeadLoss.apply(hidden, weight, bias, chunk_fn, temperature, chunk_size, torch.is_grad_enabled())


def _weighted_token_cross_entropy(hidden, weight, bias, ids, coef, const, token_weight, temperature, chunk_size):
    """
    `sum_n w_n * sum_k c_nk * (a_nk - log q_n[ids_nk])` with `q_n = softmax((h_n W^T + b) / T)`, `const_n =
    sum_k c_nk a_nk` and `w = token_weight`. With `c = p_teacher` and `a = log p_teacher` it is the top-k KL; with
    `c = 1 / S` and `a = 0` over `S` sampled ids the sampled KD loss (a repeated id counts once per draw); with `k = 1,
    c = 1, a = 0` the cross-entropy of a label.
    """
    coef_sum = coef.sum(-1)  # (N,)

    def chunk_fn(start, end, logits, need_grad):
        lse = torch.logsumexp(logits, dim=-1)  # (C,)
        picked = logits.gather(-1, ids[start:end]) - lse[:, None]  # (C, k) student log-probs at the ids
        per_token = const[start:end] - (coef[start:end] * picked).sum(-1)  # (C,)
        loss = (token_weight[start:end] * per_token).sum()
        if not need_grad:
            return loss, None
        # d loss / d u = w * (sum_k c * softmax - scatter(c)), built in place on the logits block
        grad = logits.sub_(lse[:, None]).exp_().mul_(coef_sum[start:end, None])  # (C, V)
        grad.scatter_add_(-1, ids[start:end], -coef[start:end])
        return loss, grad.mul_(token_weight[start:end, None])

    return _chunked_head_loss(hidden, weight, bias, chunk_fn, temperature, chunk_size)


def _topk_tail_chunks(ids, probs, rest, token_weight):
    """`chunk_fn` of the top-k + tail KL (see [`topk_tail_kl_loss`]): ids, probs `(N, k)`, rest `(N,)` = `p_rest`."""
    tiny = torch.finfo(torch.float32).tiny
    const = (probs * probs.clamp(min=tiny).log()).sum(-1) + rest * rest.clamp(min=tiny).log()  # (N,) sum p log p
    total = probs.sum(-1) + rest  # (N,) 1 up to rounding

    def chunk_fn(start, end, logits, need_grad):
        p, p_rest, w = probs[start:end], rest[start:end], token_weight[start:end]
        lse = torch.logsumexp(logits, dim=-1)  # (C,)
        log_q = logits.gather(-1, ids[start:end]) - lse[:, None]  # (C, k) student log-probs at the top-k
        logits.scatter_(-1, ids[start:end], float("-inf"))  # only the rest of the vocabulary is left
        rest_lse = torch.logsumexp(logits, dim=-1)  # (C,) -inf when the top-k is the whole vocabulary
        log_q_rest = (rest_lse - lse).clamp(min=math.log(tiny))  # (C,)
        per_token = const[start:end] - (p * log_q).sum(-1) - p_rest * log_q_rest
        loss = (w * per_token).sum()
        if not need_grad:
            return loss, None
        # d loss / d u_j = total * q_j - p_j on the top-k, total * q_j - p_rest * q_j / q_rest elsewhere; the latter
        # is (total * q_rest - p_rest) * softmax over the rest, which stays finite when q_rest underflows
        finite = torch.where(torch.isfinite(rest_lse), rest_lse, torch.zeros_like(rest_lse))
        scale = total[start:end] * (rest_lse - lse).exp() - p_rest  # (C,)
        grad = logits.sub_(finite[:, None]).exp_().mul_(scale[:, None])  # (C, V), 0 on the top-k
        grad.scatter_add_(-1, ids[start:end], total[start:end, None] * log_q.exp() - p)
        return loss, grad.mul_(w[:, None])

    return chunk_fn


def _full_kl_chunks(teacher_hidden, teacher_weight, teacher_bias, temperature, token_weight):
    """`chunk_fn` of the full-vocabulary KL (see [`full_kl_loss`]): the teacher's chunk is projected alongside."""

    def chunk_fn(start, end, logits, need_grad):
        teacher = _chunk_logits(teacher_hidden[start:end], teacher_weight, teacher_bias, temperature)  # (C, V)
        log_p = teacher.sub_(torch.logsumexp(teacher, dim=-1, keepdim=True))  # (C, V) in place
        p = log_p.exp()  # (C, V)
        log_q = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))  # (C, V) in place
        # (C,) sum_j p_j (log p_j - log q_j), in place on log_p; a float32 `sum` (pairwise), not a dot product, whose
        # float32 accumulation is off by 1e-3 at V = 248,320
        per_token = log_p.sub_(log_q).mul_(p).sum(-1)
        del log_p, teacher
        w = token_weight[start:end]
        loss = (w * per_token).sum()
        if not need_grad:
            return loss, None
        return loss, log_q.exp_().sub_(p).mul_(w[:, None])  # d loss / d u = q - p

    return chunk_fn


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


def _check_loss_args(student_hidden, lm_head_weight, temperature, reduction) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; use 'mean' or 'sum'.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive.")
    if student_hidden.size(-1) != lm_head_weight.size(1):
        raise ValueError(
            f"student_hidden has hidden size {student_hidden.size(-1)} but lm_head_weight is "
            f"{tuple(lm_head_weight.shape)}; pass the hidden states that feed this lm_head."
        )


def _check_ids(ids: torch.Tensor, vocab_size: int, name: str) -> torch.Tensor:
    ids = ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} hold ids outside [0, {vocab_size}) on counted tokens: the teacher's vocabulary does not match "
            "the student's, or the mask counts padding positions."
        )
    return ids


def _check_topk(teacher_topk_ids, teacher_topk_logprobs, vocab_size: int) -> None:
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape."
        )
    top_k = teacher_topk_ids.size(-1)
    if top_k > vocab_size:
        raise ValueError(f"The teacher top-k has k={top_k} entries, more than the student vocabulary ({vocab_size}).")


def _token_weight(num_tokens: int, reduction: str, device) -> torch.Tensor:
    """Per-token weight `(n,)`: `1 / n` for `"mean"`, `1` for `"sum"`."""
    scale = 1.0 / max(num_tokens, 1) if reduction == "mean" else 1.0
    return torch.full((num_tokens,), scale, dtype=torch.float32, device=device)


def topk_kl_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    renormalize: bool = False,
    chunk_size: int | None = None,
    reduction: str = "mean",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """
    KL divergence from the teacher's top-k distribution to the student's, from the student's hidden states
    (SlimMoE Eq. 3, `kd_loss="topk"`).

    Per token, with `p` the teacher's top-k probabilities (the rest of the vocabulary at probability 0) and
    `q = softmax((student_hidden @ lm_head_weight.T + lm_head_bias) / temperature)` over the full vocabulary:
    `KL = sum_k p_k * (log p_k - log q[id_k])`. With `renormalize=True`, `p` is first renormalized to sum to 1 over
    its k entries. With `k = V` this is the full-vocabulary KL. For `k < V` its minimizer is the *renormalized* top-k:
    it teaches the student to drop the teacher's tail (see [`topk_tail_kl_loss`] and [`sampled_kd_loss`]).

    Memory: tokens are projected to the vocabulary a chunk at a time and each chunk's gradient with respect to
    the hidden states, weight and bias is computed while its softmax is at hand, so only the chunk's `(chunk, V)`
    float blocks live at a time, never the `(tokens, V)` logits; masked tokens are dropped before projection. Chunks
    are sized from a byte budget (`chunk_bytes`), so the extra memory does not grow with the vocabulary.

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
        chunk_size (`int`, *optional*):
            Number of tokens projected to the vocabulary at a time; `None` (the default) takes as many as fit the
            chunk's float32 `(chunk, V)` blocks in `chunk_bytes`.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: sum of per-token KL over the counted tokens divided by their number (0 when there are none).
            `"sum"`: the plain sum. For gradient accumulation and multiple ranks use `"sum"` and divide by the
            number of counted tokens of the whole global batch (Trainer's `num_items_in_batch`), times the number
            of processes under DDP since DDP averages the gradients; then accumulated micro-batches give the same
            loss and gradients as one big batch.
        chunk_bytes (`int`, *optional*):
            Byte budget of a chunk's float32 `(chunk, V)` working blocks when `chunk_size` is `None` (default
            `hf_slimmoe.utils.CHUNK_BYTES`, 128 MiB).

    Returns:
        `torch.Tensor`: scalar float32 loss; gradients flow to `student_hidden`, `lm_head_weight` and `lm_head_bias`.
    """
    _check_loss_args(student_hidden, lm_head_weight, temperature, reduction)
    vocab_size = lm_head_weight.size(0)
    _check_topk(teacher_topk_ids, teacher_topk_logprobs, vocab_size)
    hidden, _, (ids, logprobs) = _flatten_valid(student_hidden, mask, teacher_topk_ids, teacher_topk_logprobs)
    ids = _check_ids(ids, vocab_size, "teacher_topk_ids")  # (n, k)
    logprobs = logprobs.float()  # (n, k)
    if renormalize:
        logprobs = logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)
    probs = logprobs.exp()  # (n, k)
    const = (probs * logprobs).sum(-1)  # (n,) teacher negative entropy over its top-k
    token_weight = _token_weight(hidden.size(0), reduction, hidden.device)
    chunk_size = chunk_tokens(vocab_size, _CE_BLOCKS, chunk_size, chunk_bytes)
    return _weighted_token_cross_entropy(
        hidden, lm_head_weight, lm_head_bias, ids, probs, const, token_weight, float(temperature), chunk_size
    )


def topk_tail_kl_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    reduction: str = "mean",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """
    KL divergence between teacher and student over `k + 1` outcomes: the teacher's top-k tokens and one "rest of the
    vocabulary" outcome (`kd_loss="topk_tail"`), the divergence the evaluation's `eval_kl` reports.

    Per token, with `p` the teacher's top-k probabilities (relative to its full vocabulary), `p_rest = 1 - sum_k p_k`,
    `q` the student's softmax over the full vocabulary and `q_rest = sum_{j not in top-k} q_j`:
    `KL = sum_k p_k (log p_k - log q[id_k]) + p_rest (log p_rest - log q_rest)`. Unlike [`topk_kl_loss`], it is a
    true divergence (>= 0, 0 exactly when the student matches every top-k probability and the tail's mass), so its
    minimizer keeps the teacher's tail mass; with `k = V` it is the full-vocabulary KL. `log q_rest` is the
    log-sum-exp of the student's logits outside the top-k minus the one over all of them, so it stays accurate when
    the top-k holds almost all of the mass; the gradient with respect to the logits is
    `q_j - p_j` on the top-k and `q_j - p_rest * q_j / q_rest` elsewhere.

    Memory: as [`topk_kl_loss`], one chunk's `(chunk, V)` float blocks at a time. The top-k ids of a token must be
    distinct (as [`teacher_topk`] returns them).

    Args:
        student_hidden, lm_head_weight, lm_head_bias: as in [`topk_kl_loss`]: `(N, H)` or `(B, T, H)`, `(V, H)`,
            `(V,)` or `None`.
        teacher_topk_ids (`torch.Tensor`): distinct teacher top-k token ids, integer, `(N, k)` or `(B, T, k)`.
        teacher_topk_logprobs (`torch.Tensor`): their teacher log-probabilities relative to the full vocabulary, at
            the same `temperature`, `(N, k)` or `(B, T, k)`.
        mask, temperature, chunk_size, reduction, chunk_bytes: as in [`topk_kl_loss`].

    Returns:
        `torch.Tensor`: scalar float32 loss; gradients flow to `student_hidden`, `lm_head_weight` and `lm_head_bias`.
    """
    _check_loss_args(student_hidden, lm_head_weight, temperature, reduction)
    vocab_size = lm_head_weight.size(0)
    _check_topk(teacher_topk_ids, teacher_topk_logprobs, vocab_size)
    hidden, _, (ids, logprobs) = _flatten_valid(student_hidden, mask, teacher_topk_ids, teacher_topk_logprobs)
    ids = _check_ids(ids, vocab_size, "teacher_topk_ids")  # (n, k)
    probs = logprobs.float().exp()  # (n, k)
    rest = (1.0 - probs.sum(-1)).clamp(min=0.0)  # (n,)
    token_weight = _token_weight(hidden.size(0), reduction, hidden.device)
    chunk_fn = _topk_tail_chunks(ids, probs, rest, token_weight)
    chunk_size = chunk_tokens(vocab_size, _TAIL_BLOCKS, chunk_size, chunk_bytes)
    return _chunked_head_loss(hidden, lm_head_weight, lm_head_bias, chunk_fn, float(temperature), chunk_size)


def sampled_kd_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_sample_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    reduction: str = "mean",
    chunk_bytes: int | None = None,
    teacher_sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Sampled knowledge distillation (`kd_loss="sampled"`): the student's cross-entropy on `S` tokens drawn from the
    teacher's distribution at every position, `-(1/S) sum_s log q(y_s)`; with `teacher_sample_weights` `w`,
    `-sum_s w_s log q(y_s)` (threshold samples, see [`threshold_samples_from_hidden`]: also unbiased).

    Its expectation over the draws is the full cross-entropy `-sum_j p_j log q_j = KL(p || q) + H(p)`, so its gradient
    is an unbiased estimate of the full-vocabulary KL gradient (`q - p` with respect to the logits), from `S` token
    ids per position (see "Sparse Logit Sampling", Anshumann et al., ACL 2025). A token drawn twice counts twice. The
    value is the cross-entropy estimate, not the KL: it does not go to 0, it goes to the teacher's entropy.

    Memory: as [`topk_kl_loss`] (it is the same chunked weighted cross-entropy with weight `1/S` per draw).

    Args:
        student_hidden, lm_head_weight, lm_head_bias: as in [`topk_kl_loss`]: `(N, H)` or `(B, T, H)`, `(V, H)`,
            `(V,)` or `None`.
        teacher_sample_ids (`torch.Tensor`): token ids drawn from the teacher's `softmax(logits / temperature)`,
            integer, `(N, S)` or `(B, T, S)` (see [`teacher_samples_from_hidden`] and `cache_teacher_samples`).
        mask, temperature, chunk_size, reduction, chunk_bytes: as in [`topk_kl_loss`]; `temperature` must be the one
            the samples were drawn at.
        teacher_sample_weights (`torch.Tensor`, *optional*): the draws' weights, the shape of `teacher_sample_ids`;
            `None`: `1/S` each.

    Returns:
        `torch.Tensor`: scalar float32 loss; gradients flow to `student_hidden`, `lm_head_weight` and `lm_head_bias`.
    """
    _check_loss_args(student_hidden, lm_head_weight, temperature, reduction)
    if teacher_sample_weights is not None and teacher_sample_weights.shape != teacher_sample_ids.shape:
        raise ValueError(f"teacher_sample_weights has shape {tuple(teacher_sample_weights.shape)}, the ids "
                         f"{tuple(teacher_sample_ids.shape)}: one weight per draw.")
    extra = () if teacher_sample_weights is None else (teacher_sample_weights,)
    hidden, _, (ids, *weights) = _flatten_valid(student_hidden, mask, teacher_sample_ids, *extra)
    ids = _check_ids(ids, lm_head_weight.size(0), "teacher_sample_ids")  # (n, S)
    num_samples = ids.size(-1)
    coef = (weights[0].to(device=hidden.device, dtype=torch.float32) if weights else  # (n, S)
            torch.full(ids.shape, 1.0 / num_samples, dtype=torch.float32, device=hidden.device))
    const = torch.zeros(ids.size(0), dtype=torch.float32, device=hidden.device)  # (n,)
    token_weight = _token_weight(hidden.size(0), reduction, hidden.device)
    chunk_size = chunk_tokens(lm_head_weight.size(0), _CE_BLOCKS, chunk_size, chunk_bytes)
    return _weighted_token_cross_entropy(
        hidden, lm_head_weight, lm_head_bias, ids, coef, const, token_weight, float(temperature), chunk_size
    )


def full_kl_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    teacher_lm_head_bias: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    reduction: str = "mean",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """
    Full-vocabulary KL(teacher || student) from both models' last hidden states (`kd_loss="full"`, online teacher).

    Per token: `sum_j p_j (log p_j - log q_j)` with `p = softmax(teacher_hidden @ teacher_lm_head_weight.T + b_t) / T)`
    and `q` the student's softmax; the gradient with respect to the student's logits is `(q - p) / T`.

    Memory: both sides are projected a chunk at a time, the teacher's chunk right next to the student's, so at most
    four `(chunk, V)` float blocks live at once (the student's log-probabilities, the teacher's log-probabilities and
    probabilities, a logsumexp temporary), never the `(tokens, V)` logits of either model; `chunk_bytes` bounds them.

    Args:
        student_hidden, lm_head_weight, lm_head_bias: as in [`topk_kl_loss`]: `(N, H)` or `(B, T, H)`, `(V, H)`,
            `(V,)` or `None`.
        teacher_hidden (`torch.Tensor`): teacher last hidden states `(N, H_t)` or `(B, T, H_t)`, same positions.
        teacher_lm_head_weight (`torch.Tensor`): teacher `lm_head` weight `(V, H_t)` (no gradient flows to it).
        teacher_lm_head_bias (`torch.Tensor` or `None`): teacher `lm_head` bias `(V,)`.
        mask, temperature, chunk_size, reduction, chunk_bytes: as in [`topk_kl_loss`].

    Returns:
        `torch.Tensor`: scalar float32 loss; gradients flow to `student_hidden`, `lm_head_weight` and `lm_head_bias`.
    """
    _check_loss_args(student_hidden, lm_head_weight, temperature, reduction)
    if teacher_lm_head_weight.size(0) != lm_head_weight.size(0):
        raise ValueError(f"The teacher's vocabulary ({teacher_lm_head_weight.size(0)}) differs from the student's "
                         f"({lm_head_weight.size(0)}): full KL needs the same tokenizer.")
    if teacher_hidden.size(-1) != teacher_lm_head_weight.size(1):
        raise ValueError(f"teacher_hidden has hidden size {teacher_hidden.size(-1)} but teacher_lm_head_weight is "
                         f"{tuple(teacher_lm_head_weight.shape)}.")
    hidden, _, (teacher,) = _flatten_valid(student_hidden, mask, teacher_hidden.detach())
    token_weight = _token_weight(hidden.size(0), reduction, hidden.device)
    chunk_fn = _full_kl_chunks(teacher.to(teacher_lm_head_weight.device), teacher_lm_head_weight.detach(),
                               None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach(),
                               float(temperature), token_weight)
    chunk_size = chunk_tokens(lm_head_weight.size(0), _FULL_BLOCKS, chunk_size, chunk_bytes)
    return _chunked_head_loss(hidden, lm_head_weight, lm_head_bias, chunk_fn, float(temperature), chunk_size)


@torch.no_grad()
def teacher_samples_from_hidden(
    hidden: torch.Tensor, lm_head: torch.nn.Module, uniforms: torch.Tensor, temperature: float = 1.0,
    chunk_size: int | None = None, chunk_bytes: int | None = None,
) -> torch.Tensor:
    """
    Token ids drawn from `softmax(lm_head(hidden) / temperature)` by inverting its CDF at the given uniforms, one
    chunk's `(chunk, V)` blocks at a time (a float64 CDF: 5 float32 blocks' worth of `chunk_bytes`).

    The randomness is all in `uniforms` (`(..., S)` in `[0, 1)`, e.g. from a per-row seeded generator, see
    `teacher_cache.sample_uniforms`), so the draws do not depend on the chunking, the batch or the device.

    Args:
        hidden (`torch.Tensor`): teacher hidden states `(..., H)`.
        lm_head (`torch.nn.Module`): the teacher's output embeddings.
        uniforms (`torch.Tensor`): `(..., S)` float uniforms, same leading shape as `hidden`.
        temperature (`float`, *optional*, defaults to `1.0`): softmax temperature.
        chunk_size (`int`, *optional*): tokens projected to the vocabulary at a time; `None`: from `chunk_bytes`.
        chunk_bytes (`int`, *optional*): byte budget of a chunk (default `CHUNK_BYTES`, see `chunk_tokens`).

    Returns:
        `torch.Tensor`: `(..., S)` int64 ids; a token of probability 0 is never drawn.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive.")
    flat = hidden.reshape(-1, hidden.size(-1))  # (N, H)
    u = uniforms.reshape(flat.size(0), -1).to(device=flat.device, dtype=torch.float64)  # (N, S)
    ids = torch.empty(u.shape, dtype=torch.long, device=flat.device)
    chunk_size = chunk_tokens(lm_head.weight.size(0), _SAMPLE_BLOCKS, chunk_size, chunk_bytes)
    for start in range(0, flat.size(0), chunk_size):
        logits = lm_head(flat[start:start + chunk_size]).float().div_(temperature)  # (C, V)
        cdf = torch.softmax(logits, dim=-1, dtype=torch.float64).cumsum_(-1)  # (C, V)
        del logits
        targets = u[start:start + chunk_size] * cdf[:, -1:]  # (C, S)
        ids[start:start + chunk_size] = torch.searchsorted(cdf, targets, right=True).clamp_(max=cdf.size(-1) - 1)
    return ids.view(*hidden.shape[:-1], u.size(-1))


@torch.no_grad()
def threshold_samples_from_hidden(
    hidden: torch.Tensor, lm_head: torch.nn.Module, uniforms: torch.Tensor, num_slots: int, temperature: float = 1.0,
    chunk_size: int | None = None, chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `num_slots` (K) weighted teacher tokens per position by threshold (priority) sampling, an unbiased estimate of the
    teacher's distribution `p = softmax(lm_head(hidden) / temperature)` with the least variance K weighted slots give.

    Per position, `tau` solves `sum_i min(1, p_i / tau) = K`: the `m` tokens with `p_i >= tau` are kept with their
    probability as weight; the other `K - m` slots are drawn systematically (one uniform `u`, points `u + j` on the
    cumulative `p_i / tau` of the remaining tokens, so each is drawn at most once and with probability `p_i / tau`),
    each weighted `tau`. `sum_s w_s f(y_s)` is then an unbiased estimate of `sum_i p_i f(i)`. A teacher with fewer
    than K tokens of nonzero probability keeps them all; the unused slots get weight 0.

    Args:
        hidden, lm_head, temperature, chunk_size, chunk_bytes: as in [`teacher_samples_from_hidden`].
        uniforms (`torch.Tensor`): `(..., 1)` (or more: the first is used) uniforms in `[0, 1)`.
        num_slots (`int`): K.

    Returns:
        `(ids, weights, kept)`: `(..., K)` int64 token ids (the kept tokens first, by decreasing probability), their
        float32 weights, and which slots hold kept tokens (bool; the others are draws of weight `tau`).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive.")
    flat = hidden.reshape(-1, hidden.size(-1))  # (N, H)
    u = uniforms.reshape(flat.size(0), -1)[:, :1].to(device=flat.device, dtype=torch.float64)  # (N, 1)
    ids = torch.empty(flat.size(0), num_slots, dtype=torch.long, device=flat.device)
    weights = torch.empty(flat.size(0), num_slots, dtype=torch.float32, device=flat.device)
    kept_slots = torch.empty(flat.size(0), num_slots, dtype=torch.bool, device=flat.device)
    slots = torch.arange(num_slots, device=flat.device)  # (K,)
    chunk_size = chunk_tokens(lm_head.weight.size(0), _SAMPLE_BLOCKS, chunk_size, chunk_bytes)
    for start in range(0, flat.size(0), chunk_size):
        end = min(start + chunk_size, flat.size(0))
        p = torch.softmax(lm_head(flat[start:end]).float().div_(temperature), dim=-1, dtype=torch.float64)  # (C, V)
        top, top_ids = p.topk(min(num_slots, p.size(-1)), dim=-1)  # (C, K') decreasing
        top = torch.nn.functional.pad(top, (0, num_slots - top.size(-1)))  # (C, K)
        top_ids = torch.nn.functional.pad(top_ids, (0, num_slots - top_ids.size(-1)))
        # kept count m: the first m whose tau_m = (1 - sum of the m largest) / (K - m) exceeds the (m+1)-th largest
        head = torch.cumsum(top, -1) - top  # (C, K) mass of the m largest, m = 0 .. K-1
        tau_m = (1 - head).clamp_(min=0) / (num_slots - slots)  # (C, K)
        small = top < tau_m  # (C, K)
        m = torch.where(small.any(-1), small.float().argmax(-1), num_slots)  # (C,) all kept when none is small
        tau = torch.where(m < num_slots, tau_m.gather(-1, m.clamp(max=num_slots - 1)[:, None])[:, 0], 0.0)  # (C,)
        rest = p.scatter(-1, top_ids, torch.where(slots < m[:, None], 0.0, top)) / tau.clamp(min=1e-300)[:, None]
        cdf = rest.cumsum_(-1)  # (C, V) sums to K - m
        points = u[start:end] + (slots - m[:, None]).clamp(min=0)  # (C, K) u + j for the drawn slots
        drawn = torch.searchsorted(cdf, points, right=True).clamp_(max=p.size(-1) - 1)  # (C, K)
        kept = slots < m[:, None]
        ids[start:end] = torch.where(kept, top_ids, drawn)
        weights[start:end] = torch.where(kept, top, tau[:, None] * (tau[:, None] > 0)).float()
        kept_slots[start:end] = kept
    shape = (*hidden.shape[:-1], num_slots)
    return ids.view(shape), weights.view(shape), kept_slots.view(shape)


def chunked_cross_entropy(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "mean",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """
    Next-token cross-entropy from hidden states, chunked like [`topk_kl_loss`] (it is its `k = 1`, one-hot case).

    Args:
        student_hidden (`torch.Tensor`): hidden states `(N, H)` or `(B, T, H)` aligned with `labels`.
        lm_head_weight (`torch.Tensor`): `(V, H)`.
        lm_head_bias (`torch.Tensor` or `None`): `(V,)`.
        labels (`torch.Tensor`): target ids `(N,)` or `(B, T)`; `ignore_index` positions are not counted.
        ignore_index (`int`, *optional*, defaults to `-100`): label value that is not counted.
        chunk_size (`int`, *optional*): tokens projected at a time; `None`: as many as fit `chunk_bytes`.
        reduction (`str`, *optional*, defaults to `"mean"`): `"mean"` over counted tokens or `"sum"`.
        chunk_bytes (`int`, *optional*): byte budget of a chunk, as in [`topk_kl_loss`].

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
    chunk_size = chunk_tokens(lm_head_weight.size(0), _CE_BLOCKS, chunk_size, chunk_bytes)
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
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For evaluation: the student's argmax token `(N,)` and its log-probabilities at the teacher's top-k ids
    `(N, k)` (relative to its full vocabulary, at `temperature`), for hidden `(N, H)`, one `(chunk, V)` block at a time
    (`chunk_size` tokens; `None`: as many as fit `chunk_bytes`).
    """
    chunk_size = chunk_tokens(lm_head_weight.size(0), _CE_BLOCKS, chunk_size, chunk_bytes)
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


__all__ = [
    "chunked_cross_entropy",
    "chunked_student_topk_stats",
    "full_kl_loss",
    "sampled_kd_loss",
    "teacher_samples_from_hidden",
    "threshold_samples_from_hidden",
    "topk_kl_loss",
    "topk_tail_kl",
    "topk_tail_kl_loss",
]
