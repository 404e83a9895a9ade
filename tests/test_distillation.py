"""Tests for hf_slimmoe.distillation: exactness of the chunked top-k KL, the trainer, the teacher cache, the CLI."""

import pytest
import torch

from hf_slimmoe.distillation import chunked_cross_entropy, teacher_topk, topk_kl_loss


def _naive_topk_kl(hidden, weight, bias, ids, logprobs, mask, temperature=1.0, renormalize=False):
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    logq = torch.log_softmax(logits / temperature, dim=-1)
    if renormalize:
        logprobs = logprobs - torch.logsumexp(logprobs, -1, keepdim=True)
    p = logprobs.exp()
    per_token = (p * (logprobs - logq.gather(-1, ids))).sum(-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


def _problem(n_tokens=37, hidden=16, vocab=50, k=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tokens, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True)
    teacher_logits = torch.randn(n_tokens, vocab, generator=g, dtype=dtype) * 2
    mask = torch.rand(n_tokens, generator=g) > 0.3
    return h, w, b, teacher_logits, mask


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_matches_naive_values_and_gradients(renormalize, temperature):
    h, w, b, teacher_logits, mask = _problem(dtype=torch.float32)
    ids, logprobs = teacher_topk(teacher_logits, 8, temperature)
    loss = topk_kl_loss(h, w, b, ids, logprobs, mask, temperature=temperature, renormalize=renormalize, chunk_size=5)
    grads = torch.autograd.grad(loss, (h, w, b))
    ref = _naive_topk_kl(h, w, b, ids, logprobs, mask, temperature, renormalize)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_topk_kl_equals_full_kl_when_k_is_vocab():
    h, w, b, teacher_logits, mask = _problem(dtype=torch.float64)
    ids, logprobs = teacher_topk(teacher_logits, teacher_logits.size(-1))
    loss = topk_kl_loss(h, w, b, ids, logprobs.double(), mask, chunk_size=7)
    logq = torch.log_softmax(h @ w.t() + b, -1)
    logp = torch.log_softmax(teacher_logits, -1)
    full = torch.nn.functional.kl_div(logq[mask], logp[mask], log_target=True, reduction="batchmean")
    torch.testing.assert_close(loss.double(), full, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(loss, h)[0]
    want = torch.autograd.grad(full, h)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_topk_kl_batched_shapes_no_bias_and_sum_reduction():
    h, w, _, teacher_logits, mask = _problem(n_tokens=24, dtype=torch.float32)
    ids, logprobs = teacher_topk(teacher_logits, 4)
    loss_sum = topk_kl_loss(h.view(2, 12, -1), w, None, ids.view(2, 12, -1), logprobs.view(2, 12, -1),
                            mask.view(2, 12).long(), reduction="sum", chunk_size=1000)
    ref = _naive_topk_kl(h, w, None, ids, logprobs, mask) * mask.sum()
    torch.testing.assert_close(loss_sum, ref, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_matches_torch():
    h, w, b, _, mask = _problem(dtype=torch.float32)
    labels = torch.randint(0, w.size(0), (h.size(0),))
    labels[~mask] = -100
    loss = chunked_cross_entropy(h, w, b, labels, chunk_size=6)
    ref = torch.nn.functional.cross_entropy(h @ w.t() + b, labels)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(loss, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_topk_errors():
    h, w, b, teacher_logits, mask = _problem(dtype=torch.float32)
    with pytest.raises(ValueError, match="top_k"):
        teacher_topk(teacher_logits, teacher_logits.size(-1) + 1)
    ids, logprobs = teacher_topk(teacher_logits, 4)
    with pytest.raises(ValueError, match="vocabulary"):
        topk_kl_loss(h, w[:10], b[:10], ids, logprobs, mask)
