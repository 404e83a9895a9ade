"""Tests for hf_slimmoe.distillation: exactness of the chunked top-k KL, the trainer, the teacher cache, the CLI."""

import pytest
import torch

from hf_slimmoe.distillation import chunked_cross_entropy, topk_kl_loss
from hf_slimmoe.utils.modeling import teacher_topk


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


def _naive_log_q(h, w, b, temperature):
    return torch.log_softmax((h.double() @ w.double().t() + (0 if b is None else b.double())) / temperature, -1)


def _naive_tail_kl(h, w, b, ids, logprobs, mask, temperature=1.0):
    logq = _naive_log_q(h, w, b, temperature)
    p_log = logprobs.double()
    p = p_log.exp()
    rest_mask = torch.ones_like(logq, dtype=torch.bool).scatter(-1, ids, False)
    log_q_rest = torch.logsumexp(logq.masked_fill(~rest_mask, float("-inf")), -1)
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    per_token = (p * (p_log - logq.gather(-1, ids))).sum(-1) + torch.where(
        p_rest > 0, p_rest * (p_rest.clamp(min=1e-300).log() - log_q_rest), torch.zeros_like(p_rest))
    return per_token[mask].mean()


def _assert_loss_and_grads(loss, ref, inputs, atol=1e-5):
    grads = torch.autograd.grad(loss, inputs, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, inputs, retain_graph=True)
    torch.testing.assert_close(loss.double(), ref.double(), atol=atol, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [1, 8])
def test_topk_tail_loss_matches_naive_values_and_gradients(temperature, top_k):
    from hf_slimmoe.distillation import topk_tail_kl_loss

    h, w, b, teacher_logits, mask = _problem(dtype=torch.float32)
    ids, logprobs = teacher_topk(teacher_logits, top_k, temperature)
    loss = topk_tail_kl_loss(h, w, b, ids, logprobs, mask, temperature=temperature, chunk_size=5)
    _assert_loss_and_grads(loss, _naive_tail_kl(h, w, b, ids, logprobs, mask, temperature), (h, w, b))


def test_topk_tail_loss_with_k_equal_to_the_vocabulary_is_the_full_kl():
    from hf_slimmoe.distillation import topk_tail_kl_loss

    h, w, b, teacher_logits, mask = _problem(dtype=torch.float32)
    ids, logprobs = teacher_topk(teacher_logits, teacher_logits.size(-1))
    loss = topk_tail_kl_loss(h, w, b, ids, logprobs, mask, chunk_size=7)
    logq, logp = _naive_log_q(h, w, b, 1.0), torch.log_softmax(teacher_logits.double(), -1)
    full = torch.nn.functional.kl_div(logq[mask], logp[mask], log_target=True, reduction="batchmean")
    _assert_loss_and_grads(loss, full, (h, w, b))


def test_topk_tail_loss_is_zero_with_zero_gradient_at_the_teacher():
    from hf_slimmoe.distillation import topk_tail_kl_loss

    h, w, b, _, mask = _problem(dtype=torch.float32)
    with torch.no_grad():
        ids, logprobs = teacher_topk(h @ w.t() + b, 4)  # the student itself is the teacher
    loss = topk_tail_kl_loss(h, w, b, ids, logprobs, mask)
    grad = torch.autograd.grad(loss, h)[0]
    assert abs(loss.item()) < 1e-5 and grad.abs().max() < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_loss_matches_naive_values_and_gradients_with_repeated_draws(temperature):
    from hf_slimmoe.distillation import sampled_kd_loss

    h, w, b, _, mask = _problem(dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 6, (h.size(0), 8), generator=g)  # a small range: most rows repeat some ids
    assert any(len(set(row.tolist())) < 8 for row in ids)
    loss = sampled_kd_loss(h, w, b, ids, mask, temperature=temperature, chunk_size=4)
    ref = -_naive_log_q(h, w, b, temperature).gather(-1, ids).mean(-1)[mask].mean()
    _assert_loss_and_grads(loss, ref, (h, w, b))


def test_weighted_sampled_loss_matches_naive_values_and_gradients():
    from hf_slimmoe.distillation import sampled_kd_loss

    h, w, b, _, mask = _problem(dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, w.size(0), (h.size(0), 5), generator=g)
    weights = torch.rand(h.size(0), 5, generator=g)
    loss = sampled_kd_loss(h, w, b, ids, mask, chunk_size=3, teacher_sample_weights=weights)
    ref = -(weights.double() * _naive_log_q(h, w, b, 1.0).gather(-1, ids)).sum(-1)[mask].mean()
    _assert_loss_and_grads(loss, ref, (h, w, b))
    with pytest.raises(ValueError, match="one weight per draw"):
        sampled_kd_loss(h, w, b, ids, mask, teacher_sample_weights=weights[:, :4])


@pytest.mark.parametrize("peaked", [False, True])
def test_threshold_samples_are_unbiased_and_closer_than_as_many_systematic_draws(peaked):
    """K threshold slots (kept tokens weighted by their probability, the rest drawn systematically at p / tau and
    weighted tau): over a fine grid of uniforms their weighted counts average to the teacher's distribution exactly,
    no token is drawn twice at a position, and the mean squared error of the estimate is below that of K systematic
    unweighted draws (the library's samples) on the same distributions."""
    from hf_slimmoe.distillation import teacher_samples_from_hidden, threshold_samples_from_hidden

    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(8, 40, bias=False).double()
    torch.nn.init.normal_(head.weight, std=1.5 if peaked else 0.4, generator=g)
    hidden = torch.randn(5, 8, generator=g, dtype=torch.float64)
    p = torch.softmax(head(hidden), -1).detach()  # (5, 40)
    grid, slots = 2000, 6
    mean, error, systematic_error = torch.zeros_like(p), 0.0, 0.0
    for u in (torch.arange(grid, dtype=torch.float64) + 0.5) / grid:
        ids, weights, _ = threshold_samples_from_hidden(hidden, head, torch.full((5, 1), u.item()), slots)
        assert all(len(set(row.tolist())) == slots for row in ids)  # each token at most once
        estimate = torch.zeros_like(p).scatter_add_(-1, ids, weights.double())
        mean += estimate / grid
        error += ((estimate - p) ** 2).sum(-1).mean().item() / grid
        draws = teacher_samples_from_hidden(hidden, head, (u + torch.arange(slots)).expand(5, -1) / slots)
        counts = torch.zeros_like(p).scatter_add_(-1, draws, torch.full(draws.shape, 1 / slots, dtype=p.dtype))
        systematic_error += ((counts - p) ** 2).sum(-1).mean().item() / grid
    torch.testing.assert_close(mean, p, rtol=0, atol=1e-3)
    assert error < systematic_error


def test_teacher_samples_follow_the_teacher_distribution_and_many_samples_give_the_full_gradient():
    from hf_slimmoe.distillation import sampled_kd_loss, teacher_samples_from_hidden

    h, w, b, _, _ = _problem(n_tokens=6, vocab=30, dtype=torch.float32)
    teacher_head = torch.nn.Linear(16, 30)
    torch.nn.init.normal_(teacher_head.weight, std=0.3)
    teacher_hidden = torch.randn(6, 16, generator=torch.Generator().manual_seed(7))
    uniforms = torch.rand(6, 20000, generator=torch.Generator().manual_seed(8))
    ids = teacher_samples_from_hidden(teacher_hidden, teacher_head, uniforms, chunk_size=4)  # (6, 20000)
    p = torch.softmax(teacher_head(teacher_hidden).detach().double(), -1)  # (6, 30)
    freq = torch.zeros_like(p).scatter_add_(-1, ids, torch.ones_like(ids, dtype=p.dtype)) / ids.size(-1)
    assert (freq - p).abs().max() < 0.015
    # the same uniforms in another chunking and batch give the same draws
    torch.testing.assert_close(teacher_samples_from_hidden(teacher_hidden[2:], teacher_head, uniforms[2:]), ids[2:])
    sampled = sampled_kd_loss(h, w, b, ids, chunk_size=4)
    full_ce = -(p * _naive_log_q(h, w, b, 1.0)).sum(-1).mean()
    got, want = torch.autograd.grad(sampled, (h, w)), torch.autograd.grad(full_ce, (h, w))
    for g_, w_ in zip(got, want):
        assert (g_.double() - w_).norm() < 0.05 * w_.norm()


def test_systematic_teacher_samples_draw_each_token_floor_or_ceil_of_its_expected_count():
    from hf_slimmoe.distillation import sample_uniforms, teacher_samples_from_hidden

    teacher_head = torch.nn.Linear(16, 30)
    torch.nn.init.normal_(teacher_head.weight, std=0.5)
    teacher_hidden = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(7))
    uniforms = sample_uniforms(torch.arange(5)[None], None, num_samples=1000, seed=3)  # (1, 5, S)
    assert torch.equal((uniforms * 1000).floor(), torch.arange(1000, dtype=torch.float64).expand(1, 5, -1))
    offsets = uniforms * 1000 - torch.arange(1000, dtype=torch.float64)  # one offset per position, shared by its S
    assert torch.allclose(offsets, offsets[..., :1].expand_as(offsets)) and offsets[0, :, 0].unique().numel() == 5
    ids = teacher_samples_from_hidden(teacher_hidden, teacher_head, uniforms)[0]  # (5, S)
    p = torch.softmax(teacher_head(teacher_hidden[0]).detach().double(), -1)  # (5, V)
    counts = torch.zeros_like(p).scatter_add_(-1, ids, torch.ones_like(ids, dtype=p.dtype))
    assert ((counts == (1000 * p).floor()) | (counts == (1000 * p).ceil())).all()  # i.i.d.: spread ~ sqrt(1000 p)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_kl_loss_matches_naive_values_and_gradients(temperature):
    from hf_slimmoe.distillation import full_kl_loss

    h, w, b, _, mask = _problem(dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    teacher_hidden = torch.randn(h.size(0), 12, generator=g)  # another hidden size than the student's
    teacher_w, teacher_b = torch.randn(w.size(0), 12, generator=g), torch.randn(w.size(0), generator=g)
    loss = full_kl_loss(h.view(1, -1, 16), w, b, teacher_hidden.view(1, -1, 12), teacher_w, teacher_b,
                        mask.view(1, -1), temperature=temperature, chunk_size=6)
    logp = torch.log_softmax((teacher_hidden.double() @ teacher_w.double().t() + teacher_b.double()) / temperature, -1)
    logq = _naive_log_q(h, w, b, temperature)
    ref = (logp.exp() * (logp - logq)).sum(-1)[mask].mean()
    _assert_loss_and_grads(loss, ref, (h, w, b))
    with pytest.raises(ValueError, match="vocabulary"):
        full_kl_loss(h, w, b, teacher_hidden, teacher_w[:10], teacher_b[:10], mask)


# ------------------------------------------------------------------------------------------ trainer and cache
import copy  # noqa: E402
import math  # noqa: E402

from datasets import Dataset  # noqa: E402

from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM  # noqa: E402
from hf_slimmoe.distillation import (  # noqa: E402
    DistillationCollator,
    DistillationConfig,
    DistillationTrainer,
    cache_metadata,
    cache_teacher_samples,
    cache_teacher_topk,
    sample_packing,
)

VOCAB = 96


def _tiny_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
                  lm_head_bias=True, max_position_embeddings=64, router_jitter_noise=0.0, input_jitter_noise=0.0)
    values.update(overrides)
    return SlimMoeConfig(**values)


def _teacher(seed=0):
    torch.manual_seed(seed)
    model = SlimMoeForCausalLM(_tiny_config())
    with torch.no_grad():  # a peaked next-token distribution, so there is something to distill
        model.lm_head.weight.mul_(40.0)
    return model.eval()


def _pruned_student(teacher):
    from hf_slimmoe.pruning import SensitivityScores

    student = copy.deepcopy(teacher).requires_grad_(True)  # a trainer freezes its teacher: the copy must not be
    cfg = teacher.config
    g = torch.Generator().manual_seed(3)
    scores = SensitivityScores(
        experts=[torch.rand(cfg.num_local_experts, cfg.intermediate_size, generator=g)
                 for _ in range(cfg.num_hidden_layers)],
        kv_groups=[torch.rand(cfg.num_key_value_heads, generator=g) for _ in range(cfg.num_hidden_layers)],
    )
    return student.prune_to(cfg.slimmed(intermediate_size=16, num_key_value_heads=1), scores).train()


def _token_dataset(num_rows=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, VOCAB, (int(torch.randint(6, 13, (1,), generator=g)),), generator=g).tolist()
            for _ in range(num_rows)]
    return Dataset.from_dict({"input_ids": rows})


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                  report_to=[], save_strategy="no", use_cpu=True, learning_rate=3e-3, logging_steps=5,
                  disable_tqdm=True, kd_loss="topk")  # the top-k caches below are read by kd_loss="topk"
    values.update(overrides)
    return DistillationConfig(**values)


def _cache(teacher, dataset, kd_loss, **kwargs):
    """The teacher cache `kd_loss` reads (`None` for "full": online only)."""
    if kd_loss == "full":
        return None
    if kd_loss == "sampled":
        return cache_teacher_samples(teacher, dataset, num_samples=8, **kwargs)
    return cache_teacher_topk(teacher, dataset, top_k=8, **kwargs)


def test_weighted_samples_in_the_cache_are_read_by_the_trainer(tmp_path):
    """A samples cache may carry `teacher_sample_weights` (threshold samples): weights of 1/S train exactly as the
    plain cache does, other weights train otherwise."""
    teacher = _teacher()
    plain = cache_teacher_samples(teacher, _token_dataset(8), num_samples=4)
    params = []
    for scale in (None, 1.0, 3.0):
        ds = plain if scale is None else plain.add_column(
            "teacher_sample_weights", [[[scale / 4] * 4 for _ in row] for row in plain["input_ids"]])
        ds.info.description = plain.info.description
        student = _pruned_student(teacher)
        args = _args(tmp_path, per_device_train_batch_size=8, max_steps=1, optim="sgd", learning_rate=1.0,
                     max_grad_norm=0.0, aux_loss_coef=0.0, lr_scheduler_type="constant", kd_loss="sampled",
                     kd_samples=4)
        DistillationTrainer(model=student, args=args, train_dataset=ds).train()
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(params[1], params[0]) and not torch.allclose(params[2], params[0])


def test_threshold_samples_cache_stores_what_the_sampler_draws_and_trains(tmp_path):
    """`cache_teacher_samples(sampling="threshold")`: the collated batch holds the sampler's ids and weights (kept
    tokens' probabilities to a 1/254 byte, stochastically rounded so the stored weight stays unbiased; draws at
    exactly tau), in ceil(S bits / 8) + S + 4 bytes a position; the trainer distills from it."""
    from hf_slimmoe.distillation import threshold_samples_from_hidden
    from hf_slimmoe.distillation.teacher_cache import (
        SAMPLE_WEIGHTS_COLUMN,
        decode_threshold_weights,
        encode_threshold_weights,
        sample_packing,
        sample_uniforms,
    )
    from hf_slimmoe.distillation.trainer import DistillationCollator
    from hf_slimmoe.utils.modeling import backbone

    teacher, dataset = _teacher(), _token_dataset(6)
    cache = cache_teacher_samples(teacher, dataset, num_samples=5, sampling="threshold", output_dir=tmp_path / "c")
    assert {"teacher_sample_weight_codes", "teacher_sample_tau"} <= set(cache.column_names)
    packing = sample_packing(cache)
    assert packing.width + 5 + 4 == (5 * (VOCAB - 1).bit_length() + 7) // 8 + 9
    batch = DistillationCollator(sample_packing=packing)([cache[i] for i in range(6)])
    ids = torch.tensor(dataset["input_ids"][0])[None]
    with torch.no_grad():
        hidden = backbone(teacher)(input_ids=ids).last_hidden_state
    want_ids, want, kept = threshold_samples_from_hidden(hidden, teacher.get_output_embeddings(),
                                                         sample_uniforms(ids, None, 1, 0), 5)
    n = ids.size(1)
    got = batch[SAMPLE_WEIGHTS_COLUMN][0, :n]
    assert torch.equal(batch["teacher_sample_ids"][0, :n], want_ids[0])
    torch.testing.assert_close(got[~kept[0]], want[0][~kept[0]])  # draws: tau (the batch's forward may round
    assert (got - want[0]).abs().max() <= 1 / 254 + 1e-6          # differently); kept: to the byte
    # the byte codes are unbiased: their mean over the rounding uniforms is the weight itself
    rounding = ((torch.arange(4000, dtype=torch.float64) + 0.5) / 4000)[:, None, None]  # (R, 1, 1)
    codes, tau = encode_threshold_weights(want.expand(4000, -1, -1), kept.expand(4000, -1, -1), rounding)
    torch.testing.assert_close(decode_threshold_weights(codes, tau).double().mean(0), want[0].double(), rtol=0,
                               atol=1e-6)
    student = _pruned_student(teacher)
    args = _args(tmp_path, per_device_train_batch_size=6, max_steps=2, kd_loss="sampled", kd_samples=5,
                 aux_loss_coef=0.0)
    assert math.isfinite(DistillationTrainer(model=student, args=args, train_dataset=cache).train().training_loss)
    with pytest.raises(ValueError, match="kd_samples"):
        DistillationTrainer(model=_pruned_student(teacher), args=_args(tmp_path, kd_loss="sampled", kd_samples=8),
                            train_dataset=cache)


def test_distilling_a_pruned_student_lowers_held_out_kl(tmp_path):
    teacher = _teacher()
    student = _pruned_student(teacher)
    train = cache_teacher_topk(teacher, _token_dataset(64, seed=1), top_k=8, batch_size=16)
    held_out = cache_teacher_topk(teacher, _token_dataset(16, seed=2), top_k=8, batch_size=16)
    args = _args(tmp_path, max_steps=40, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=10)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert {"eval_kl", "eval_top1_agreement", "eval_perplexity"} <= set(after)
    assert after["eval_kl"] < 0.85 * before["eval_kl"]
    assert after["eval_top1_agreement"] >= before["eval_top1_agreement"]
    logged = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert logged and all("aux_loss" in log for log in logged)


def test_tail_kl_is_a_true_divergence_where_the_topk_loss_is_not():
    from hf_slimmoe.distillation import topk_tail_kl

    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(5, 40), torch.randn(5, 40)
    # k = vocab: the full KL
    ids, teacher_lp = teacher_topk(teacher_logits, 40)
    student_lp = student_logits.log_softmax(-1).gather(-1, ids)
    full = (teacher_logits.softmax(-1) * (teacher_logits.log_softmax(-1) - student_logits.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(topk_tail_kl(teacher_lp, student_lp), full, atol=1e-5, rtol=1e-5)
    # a student that sharpens the teacher's top-4 (the minimizer of the top-k loss): loss < 0, tail KL > 0
    ids, teacher_lp = teacher_topk(teacher_logits, 4)
    sharpened = teacher_lp - teacher_lp.logsumexp(-1, keepdim=True)  # renormalized top-4, nothing elsewhere
    topk_loss = (teacher_lp.exp() * (teacher_lp - sharpened)).sum(-1)
    assert (topk_loss < 0).all() and (topk_tail_kl(teacher_lp, sharpened) > 0).all()
    # the teacher itself: 0
    assert torch.allclose(topk_tail_kl(teacher_lp, teacher_lp), torch.zeros(5), atol=1e-6)


def test_eval_kl_of_the_teacher_is_zero_and_topk_kl_is_reported(tmp_path):
    teacher = _teacher()
    held_out = cache_teacher_topk(teacher, _token_dataset(8, seed=2), top_k=8, batch_size=8)
    metrics = DistillationTrainer(model=copy.deepcopy(teacher), args=_args(tmp_path), eval_dataset=held_out).evaluate()
    assert abs(metrics["eval_kl"]) < 1e-5 and abs(metrics["eval_topk_kl"]) < 1e-5
    assert metrics["eval_top1_agreement"] == 1.0


def test_bad_inputs_fail_before_training(tmp_path):
    teacher = _teacher()
    student = _pruned_student(teacher)
    ds = _token_dataset(6)
    other_vocab = SlimMoeForCausalLM(_tiny_config(vocab_size=VOCAB + 4))
    with pytest.raises(ValueError, match="vocabulary"):
        DistillationTrainer(model=student, teacher_model=other_vocab, args=_args(tmp_path), train_dataset=ds)
    with pytest.raises(ValueError, match="top_k=200"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, top_k=200), train_dataset=ds)
    with pytest.raises(ValueError, match="no teacher top-k cache"):
        DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=ds)
    cached = cache_teacher_topk(teacher, ds, top_k=4)
    with pytest.raises(ValueError, match="k=4"):
        DistillationTrainer(model=student, args=_args(tmp_path, top_k=8), train_dataset=cached)
    tampered = cached.map(lambda row, i: {"input_ids": row["input_ids"][::-1] if i == 2 else row["input_ids"]},
                          with_indices=True)
    with pytest.raises(ValueError, match="does not match its dataset"):
        DistillationTrainer(model=student, args=_args(tmp_path, top_k=4), train_dataset=tampered)
    with pytest.raises(ValueError, match="top_k"):
        cache_teacher_topk(teacher, ds, top_k=VOCAB + 1)


@pytest.mark.parametrize("kd_loss", ["sampled", "full"])
def test_distilling_with_an_unbiased_loss_lowers_the_full_kl(tmp_path, kd_loss):
    teacher = _teacher()
    student = _pruned_student(teacher)
    train = _token_dataset(320, seed=5)  # 40 steps of 8 rows: one epoch, each cached draw is seen once
    cached = _cache(teacher, train, kd_loss, batch_size=16)
    held_out = cache_teacher_topk(teacher, _token_dataset(16, seed=2), top_k=8, batch_size=16)
    args = _args(tmp_path, max_steps=40, per_device_train_batch_size=8, learning_rate=1e-3, kd_loss=kd_loss)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=cached if cached is not None else train, eval_dataset=held_out)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_full_kl"] < 0.85 * before["eval_full_kl"]
    assert after["eval_kl"] < before["eval_kl"]


def test_eval_full_kl_equals_the_tail_kl_when_k_is_the_vocabulary(tmp_path):
    teacher = _teacher()
    student = _pruned_student(teacher)
    held_out = _token_dataset(8, seed=2)
    metrics = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, top_k=VOCAB),
                                  eval_dataset=held_out).evaluate()
    assert metrics["eval_full_kl"] > 0.01
    assert metrics["eval_full_kl"] == pytest.approx(metrics["eval_kl"], rel=1e-4)
    no_teacher = DistillationTrainer(model=student, args=_args(tmp_path),
                                     eval_dataset=cache_teacher_topk(teacher, held_out, top_k=8)).evaluate()
    assert "eval_full_kl" not in no_teacher


def _sample_ids(cache) -> list:
    """The teacher sample ids of every row of a (packed) samples cache, `(T, S)` lists."""
    packing = sample_packing(cache)
    return [packing.unpack(torch.tensor(row, dtype=torch.uint8).view(-1, packing.width)).tolist()
            for row in cache["teacher_sample_packed"]]


def test_teacher_samples_are_the_same_in_any_batch_shard_order_or_resume(tmp_path):
    teacher = _teacher()
    ds = _token_dataset(12)
    reference = cache_teacher_samples(teacher, ds, num_samples=4, batch_size=12)
    assert reference.features["teacher_sample_packed"].feature.feature.dtype == "uint8"
    ids = _sample_ids(reference)  # 4 ids of 7 bits (VOCAB 96) in 4 bytes per position
    assert all(len(row) == len(tokens) and all(len(s) == 4 for s in row) for row, tokens in zip(ids, ds["input_ids"]))
    assert max(i for row in ids for s in row for i in s) < VOCAB
    flaky = _FlakyTeacher(teacher, fail_on=3)  # shards of 4 rows = 2 batches: shard 0 is done
    with pytest.raises(KeyboardInterrupt):
        cache_teacher_samples(flaky, ds, num_samples=4, batch_size=2, shard_size=4, output_dir=tmp_path / "cache")
    resumed = _FlakyTeacher(teacher)
    result = cache_teacher_samples(resumed, ds, num_samples=4, batch_size=3, shard_size=4,
                                   output_dir=tmp_path / "cache")
    assert resumed.calls == 4 and _sample_ids(result) == ids  # 2 shards of 2 batches of 3 rows
    rows = [5, 1, 7]  # another rank's rows, in another order
    subset = cache_teacher_samples(teacher, ds.select(rows), num_samples=4, batch_size=2)
    assert _sample_ids(subset) == [ids[i] for i in rows]
    assert _sample_ids(cache_teacher_samples(teacher, ds, num_samples=4, seed=1)) != ids


def test_teacher_fingerprint_follows_the_weights_not_the_dtype_or_runtime_flags(tmp_path):
    from hf_slimmoe.distillation import teacher_fingerprint

    teacher = _teacher()
    before = teacher_fingerprint(teacher)
    held_out = cache_teacher_topk(teacher, _token_dataset(4), top_k=8)
    DistillationTrainer(model=teacher, teacher_model=teacher, args=_args(tmp_path), eval_dataset=held_out).evaluate()
    assert teacher_fingerprint(teacher) == before  # the Trainer sets config.use_cache = False
    assert teacher_fingerprint(copy.deepcopy(teacher).to(torch.bfloat16)) == before
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        changed.model.layers[0].mlp.experts.down_proj[0, 0, 0] += 0.5
    assert teacher_fingerprint(changed) != before and teacher_fingerprint(_teacher(seed=1)) != before


def test_teacher_samples_of_a_large_vocabulary_are_packed_in_17_bits():
    big = SlimMoeForCausalLM(_tiny_config(vocab_size=70_000, hidden_size=16, intermediate_size=16,
                                          num_hidden_layers=1)).eval()
    cached = cache_teacher_samples(big, _token_dataset(2), num_samples=2)
    assert cached.features["teacher_sample_packed"].feature.length == 5  # 2 ids of 17 bits: 34 bits in 5 bytes
    assert sample_packing(cached).bits == 17 and cache_metadata(cached)["samples"]["packing"]["bits"] == 17


def test_a_cache_is_refused_for_another_loss_teacher_s_or_temperature(tmp_path):
    teacher, other = _teacher(), _teacher(seed=1)
    student = _pruned_student(teacher)
    ds = _token_dataset(6)
    samples = cache_teacher_samples(teacher, ds, num_samples=4)
    topk = cache_teacher_topk(teacher, ds, top_k=4)

    def trainer(train, teacher_model=None, model=student, **overrides):
        return DistillationTrainer(model=model, teacher_model=teacher_model, args=_args(tmp_path, **overrides),
                                   train_dataset=train)

    with pytest.raises(ValueError, match="samples cache \\(made for kd_loss 'sampled'.*kd_loss='topk'"):
        trainer(samples, kd_loss="topk", top_k=4)
    with pytest.raises(ValueError, match="topk cache \\(made for kd_loss 'topk'.*kd_loss='sampled'"):
        trainer(topk, kd_loss="sampled", kd_samples=4)
    with pytest.raises(ValueError, match="S=4 draws per position but kd_samples=8"):
        trainer(samples, kd_loss="sampled", kd_samples=8)
    with pytest.raises(ValueError, match="temperature=1.0 but temperature=2.0"):
        trainer(samples, kd_loss="sampled", kd_samples=4, temperature=2.0)
    with pytest.raises(ValueError, match="made by [0-9a-f]{16}, not by this teacher [0-9a-f]{16}"):
        trainer(samples, teacher_model=other, kd_loss="sampled", kd_samples=4)
    trainer(samples, teacher_model=teacher, kd_loss="sampled", kd_samples=4)  # its own teacher: accepted
    bigger = SlimMoeForCausalLM(_tiny_config(vocab_size=VOCAB + 4))  # issue 15: a student of a larger vocabulary
    with pytest.raises(ValueError, match=f"vocabulary of {VOCAB} tokens but the student's has {VOCAB + 4}"):
        trainer(samples, model=bigger, kd_loss="sampled", kd_samples=4)
    with pytest.raises(ValueError, match="kd_loss='full'.*online"):
        trainer(topk, kd_loss="full")
    with pytest.raises(ValueError, match="renormalize=True applies to kd_loss='topk' only"):
        trainer(topk, kd_loss="topk_tail", renormalize=True)
    cache_teacher_samples(teacher, ds, num_samples=4, output_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="made by [0-9a-f]{16}, not by this teacher [0-9a-f]{16}"):
        cache_teacher_samples(other, ds, num_samples=4, output_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="num_samples=4, not num_samples=8"):
        cache_teacher_samples(teacher, ds, num_samples=8, output_dir=tmp_path / "cache")
    cache_teacher_topk(teacher, ds, top_k=4, output_dir=tmp_path / "topk")
    with pytest.raises(ValueError, match="top_k=4, not top_k=8"):
        cache_teacher_topk(teacher, ds, top_k=8, output_dir=tmp_path / "topk")


@pytest.mark.parametrize("bf16_autocast", [False, True])
def test_a_bf16_student_trains_fp32_master_weights_and_is_saved_in_bf16(tmp_path, bf16_autocast):
    import json

    teacher = _teacher()
    student = _pruned_student(teacher).to(torch.bfloat16)
    initial = {name: p.detach().clone() for name, p in student.named_parameters()}
    train = cache_teacher_samples(teacher, _token_dataset(64), num_samples=8)
    # Adam moves every weight by about lr = 2e-5 per step: below half of bf16's spacing (>= 3e-5) for |w| >= 2**-7,
    # so bf16 parameters would never move there (0 of them do); float32 master weights accumulate the steps
    args = _args(tmp_path, kd_loss="sampled", max_steps=15, learning_rate=2e-5, lr_scheduler_type="constant",
                 weight_decay=0.0, bf16=bf16_autocast, logging_steps=15)
    bf16_teacher = copy.deepcopy(teacher).to(torch.bfloat16)  # evaluation only (the pipeline's teacher point): as is
    DistillationTrainer(model=bf16_teacher, teacher_model=bf16_teacher, args=args, eval_dataset=train)
    assert {p.dtype for p in bf16_teacher.parameters()} == {torch.bfloat16}
    trainer = DistillationTrainer(model=student, args=args, train_dataset=train)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "bfloat16"
    saved = SlimMoeForCausalLM.from_pretrained(tmp_path / "saved", dtype="auto")
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}
    moved, coarse = 0, 0
    for name, p in saved.named_parameters():
        large = initial[name].float().abs() >= 2**-7  # where one bf16 step rounds away
        coarse += int(large.sum())
        moved += int((p[large] != initial[name][large]).sum())
    assert coarse > 1000 and moved > 0.1 * coarse


class _FlakyTeacher(torch.nn.Module):
    """Counts forwards of the wrapped teacher's backbone and fails on the chosen call."""

    def __init__(self, teacher, fail_on=None):
        super().__init__()
        self.inner, self.calls, self.fail_on = teacher, 0, fail_on
        self.base_model_prefix = "model"

    def model(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("interrupted")
        return self.inner.model(**kwargs)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_teacher_cache_resumes_after_interruption(tmp_path):
    teacher = _teacher()
    ds = _token_dataset(12)
    reference = cache_teacher_topk(teacher, ds, top_k=4, batch_size=2)
    flaky = _FlakyTeacher(teacher, fail_on=5)  # shards of 4 rows = 2 batches: shards 0 and 1 are done
    with pytest.raises(KeyboardInterrupt):
        cache_teacher_topk(flaky, ds, top_k=4, batch_size=2, shard_size=4, output_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and len(list((tmp_path / "cache.partial").iterdir())) == 2
    resumed = _FlakyTeacher(teacher)
    result = cache_teacher_topk(resumed, ds, top_k=4, batch_size=2, shard_size=4, output_dir=tmp_path / "cache")
    assert resumed.calls == 2  # only the last shard was computed
    assert result["teacher_topk_ids"] == reference["teacher_topk_ids"]
    assert result["teacher_topk_fingerprint"] == reference["teacher_topk_fingerprint"]
    again = cache_teacher_topk(resumed, ds, top_k=4, output_dir=tmp_path / "cache")  # reused, no teacher pass
    assert resumed.calls == 2 and len(again) == len(ds)


# ------------------------------------------------------------------------------------------ command line
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from hf_slimmoe.cli import main as slimmoe_main  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cache_teacher_and_distill_commands_under_torchrun(tmp_path):
    teacher = _teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    _pruned_student(teacher).save_pretrained(tmp_path / "student")
    _token_dataset(32, seed=1).save_to_disk(str(tmp_path / "train"))
    _token_dataset(8, seed=2).save_to_disk(str(tmp_path / "held_out"))
    for split, kind in (("train", ["--kd-loss", "sampled", "--num-samples", "8"]), ("held_out", [])):
        assert slimmoe_main(["cache-teacher", str(tmp_path / "teacher"), str(tmp_path / split),
                             str(tmp_path / f"{split}_cache"), "--top-k", "8", "--shard-size", "16"] + kind) == 0
    (tmp_path / "distill.yaml").write_text(
        f"student: {tmp_path / 'student'}\ndataset: {tmp_path / 'train_cache'}\n"
        f"eval_dataset: {tmp_path / 'held_out_cache'}\noutput_dir: {tmp_path / 'distilled'}\n"
        "max_steps: 100\nper_device_train_batch_size: 4\nlearning_rate: 0.001\nuse_cpu: true\nreport_to: none\n"
        "save_strategy: steps\nsave_steps: 3\nlogging_steps: 1\ndisable_tqdm: true\naux_loss_coef: 0.01\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "hf_slimmoe.cli", "distill", "--config", str(tmp_path / "distill.yaml"),
               "--max_steps", "3"]  # the flag overrides the YAML's max_steps
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "distilled" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["max_steps"] == 3
    assert any("kd_loss" in log and "aux_loss" in log for log in state["log_history"])
    assert (tmp_path / "distilled" / "model.safetensors").exists()
    assert '"eval_kl"' in result.stdout and '"eval_top1_agreement"' in result.stdout


def test_cache_teacher_command_makes_threshold_samples(tmp_path, capsys):
    from datasets import load_from_disk

    from hf_slimmoe.distillation import cache_metadata

    _teacher().save_pretrained(tmp_path / "teacher")
    _token_dataset(6).save_to_disk(str(tmp_path / "train"))
    command = ["cache-teacher", str(tmp_path / "teacher"), str(tmp_path / "train"), str(tmp_path / "cache"),
               "--kd-loss", "sampled", "--sampling", "threshold", "--num-samples", "3"]
    assert slimmoe_main(command) == 0
    assert "3 threshold teacher samples per token" in capsys.readouterr().out
    cached = load_from_disk(str(tmp_path / "cache"))
    assert {"teacher_sample_weight_codes", "teacher_sample_tau"} <= set(cached.column_names)
    assert cache_metadata(cached)["samples"]["sampling"] == "threshold"
    assert slimmoe_main(command[:4] + ["--sampling", "threshold"]) == 2  # a top-k cache has no sampling
    assert "--sampling threshold: sampling applies to --kd-loss sampled" in capsys.readouterr().err


def test_collator_pads_and_keeps_row_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}]
    batch = DistillationCollator(pad_token_id=1)([rows[1] | {"labels": [8, 9]}, rows[0]])
    assert batch["input_ids"].tolist() == [[8, 9, 1], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[8, 9, -100], [-100, 6, 7]]
    assert DistillationCollator()([rows[1]])["labels"].tolist() == [[8, 9]]


def test_empty_mask_gives_zero_loss_and_gradients():
    h, w, b, teacher_logits, _ = _problem(dtype=torch.float32)
    ids, logprobs = teacher_topk(teacher_logits, 8)
    loss = topk_kl_loss(h, w, b, ids, logprobs, torch.zeros(h.size(0), dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


_DDP_WORKER = """
import os, sys, torch
sys.path.insert(0, {tests_dir!r})
from test_distillation import _args, _pruned_student, _teacher, _token_dataset
from hf_slimmoe.distillation import DistillationTrainer, cache_teacher_samples, cache_teacher_topk
from hf_slimmoe.utils.distributed import destroy_process_group
import pathlib
teacher = _teacher()
train = cache_teacher_topk(teacher, _token_dataset(32), top_k=8)
samples = cache_teacher_samples(teacher, _token_dataset(32), num_samples=8)
results = {{}}
# (kd_loss, teacher, data): top-k losses read the top-k cache, "sampled" draws online, "sampled-cached" reads the
# samples cache without a teacher, "full" runs the teacher online
for name, kd_loss, online, data in (("topk", "topk", teacher, train), ("topk_tail", "topk_tail", teacher, train),
                                    ("sampled", "sampled", teacher, train),
                                    ("sampled-cached", "sampled", None, samples), ("full", "full", teacher, train)):
    student = _pruned_student(teacher)
    initial = torch.cat([p.detach().flatten() for p in student.parameters()]).clone()
    args = _args(pathlib.Path({out!r}) / name, max_steps=3, aux_loss_coef=0.01, logging_steps=1, kd_loss=kd_loss)
    trainer = DistillationTrainer(model=student, teacher_model=online, args=args, train_dataset=data)
    trainer.train()
    final = torch.cat([p.detach().flatten() for p in student.parameters()])
    results[name] = {{"wrapper": type(trainer.model_wrapped).__name__, "initial": initial, "final": final}}
torch.save(results, os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
del trainer, student  # the DDP-wrapped model holds the process group
destroy_process_group()  # its gloo threads must not outlive the interpreter (exit status 0)
"""


def test_ddp_ranks_stay_in_sync(tmp_path):
    """Each rank sees different rows; identical weights afterwards prove the gradients went through DDP's sync."""
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER.format(tests_dir=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(script)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert set(ranks[0]) == {"topk", "topk_tail", "sampled", "sampled-cached", "full"}
    for name, rank0 in ranks[0].items():
        assert rank0["wrapper"] == "DistributedDataParallel", name
        assert not torch.equal(rank0["final"], rank0["initial"]), name
        torch.testing.assert_close(rank0["final"], ranks[1][name]["final"], atol=0, rtol=0, msg=name)


def test_online_samples_are_drawn_afresh_every_epoch(tmp_path):
    teacher = _teacher()
    ds = _token_dataset(4)
    trainer = DistillationTrainer(model=_pruned_student(teacher), teacher_model=teacher,
                                  args=_args(tmp_path, kd_loss="sampled"), train_dataset=ds)
    batch = DistillationCollator()([ds[i] for i in range(4)])
    first, _ = trainer._teacher_targets(batch)["samples"]  # (ids, weights: None for systematic draws)
    cached = cache_teacher_samples(teacher, ds, num_samples=8, batch_size=4)
    collator = DistillationCollator(sample_packing=sample_packing(cached))
    assert first.tolist() == collator([cached[i] for i in range(4)])["teacher_sample_ids"].tolist()
    trainer.state.epoch = 1.0
    assert not torch.equal(trainer._teacher_targets(batch)["samples"][0], first)


def test_distill_command_with_online_teacher_and_bad_yaml(tmp_path, capsys):
    teacher = _teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    _pruned_student(teacher).save_pretrained(tmp_path / "student")
    _token_dataset(8).save_to_disk(str(tmp_path / "train"))
    common = ["distill", "--student", str(tmp_path / "student"), "--dataset", str(tmp_path / "train"),
              "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none", "--kd_loss", "topk",
              "--save_strategy", "no", "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]
    assert slimmoe_main(common + ["--max_steps", "2", "--teacher_model_name_or_path", str(tmp_path / "teacher")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert slimmoe_main(common + ["--max_steps", "2"]) == 2  # no teacher and no cache
    assert "no teacher top-k cache" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("top_kk: 8\n")
    assert slimmoe_main(["distill", "--config", str(tmp_path / "bad.yaml")] + common[1:]) == 2
    assert "top_kk" in capsys.readouterr().err


def test_kd_defaults_are_the_same_in_a_recipe_slimmoe_distill_and_slimmoe_sft(tmp_path):
    """The KD fields are declared once (`hf_slimmoe.distillation.settings`): a recipe without a `distillation:`
    section, the options `slimmoe distill` and `slimmoe sft` parse with no flags, and the stage arguments the pipeline builds all
    have the same value for every one of them (the aux coefficient too: compress and distill trained with 0.0 and
    0.01 before)."""
    import dataclasses

    from test_pipeline import tiny_recipe

    from hf_slimmoe.cli.commands.distill import DistillCommand
    from hf_slimmoe.cli.commands.sft import SFTCommand
    from hf_slimmoe.compression.plan import training_args
    from hf_slimmoe.compression.recipe import recipe_from_dict
    from hf_slimmoe.distillation.settings import DistillationSettings, KDSettings

    values = tiny_recipe(tmp_path)
    del values["distillation"]
    recipe = recipe_from_dict(values)
    (_, distill), _ = DistillCommand().parse(["--student", "s", "--dataset", "d", "--output_dir", str(tmp_path / "d")])
    (_, _, sft), _ = SFTCommand().parse(["--output_dir", str(tmp_path / "s"), "--bf16", "false"])
    stage = training_args(recipe, str(tmp_path / "stage"), max_steps=1, early_stopping=False)
    for f in dataclasses.fields(DistillationSettings):
        assert getattr(recipe.distillation, f.name) == getattr(distill, f.name) == getattr(stage, f.name) == f.default
    for f in dataclasses.fields(KDSettings):
        assert getattr(sft, f.name) == f.default, f.name
    assert DistillationSettings().aux_loss_coef == 0.01


def test_a_run_can_continue_one_learning_rate_schedule_from_a_given_step(tmp_path):
    """`lr_schedule_steps` / `lr_schedule_start` (a multi-stage run's `stages.lr_schedule: continue`): a run of 3
    steps starting at step 5 of an 8-step cosine follows steps 5-7 of the whole 8-step run."""
    teacher = _teacher()
    ds = _token_dataset(32)

    def rates(**overrides):
        values = dict(max_steps=3, lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1, kd_loss="full")
        args = _args(tmp_path, **{**values, **overrides})
        trainer = DistillationTrainer(model=_pruned_student(teacher), teacher_model=teacher, args=args,
                                      train_dataset=ds)
        trainer.train()
        return [log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log]

    whole = rates(max_steps=8)
    assert rates(lr_schedule_steps=8, lr_schedule_start=5) == pytest.approx(whole[5:])
    # resumed from a checkpoint after 1 of its 3 steps, the run follows the same part of the schedule
    resumed = rates(lr_schedule_steps=8, lr_schedule_start=5, save_strategy="steps", save_steps=1,
                    output_dir=str(tmp_path / "resume"))
    args = _args(tmp_path, max_steps=3, lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1, kd_loss="full",
                 lr_schedule_steps=8, lr_schedule_start=5, output_dir=str(tmp_path / "resume"))
    trainer = DistillationTrainer(model=_pruned_student(teacher), teacher_model=teacher, args=args, train_dataset=ds)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resume" / "checkpoint-1"))
    after = [log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log]
    assert after[-2:] == pytest.approx(resumed[1:]) and resumed == pytest.approx(whole[5:])
    assert rates(lr_schedule_steps=8) == pytest.approx(whole[:3])
    assert rates() != pytest.approx(whole[:3])  # its own 3-step schedule decays faster
    with pytest.raises(ValueError, match="lr_schedule_start must be in"):
        _args(tmp_path, lr_schedule_steps=8, lr_schedule_start=8)
    with pytest.raises(ValueError, match="needs lr_schedule_steps"):
        _args(tmp_path, lr_schedule_start=2)
