"""Tests for distillation at large vocabularies (130k-250k tokens): KD-loss chunks sized in bytes, exact at V=248,320,
and the teacher samples cache packed in ceil(log2 V) bits (round trip, bytes per token, old unpacked caches)."""

import json

import pytest
import torch
from datasets import Dataset, List, Value

from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slimmoe.distillation import (
    DistillationCollator,
    DistillationConfig,
    DistillationTrainer,
    SamplePacking,
    cache_metadata,
    cache_teacher_samples,
    full_kl_loss,
    sample_packing,
    sampled_kd_loss,
    teacher_samples_from_model,
    teacher_topk,
    topk_kl_loss,
    topk_tail_kl_loss,
)
from hf_slimmoe.distillation.teacher_cache import METADATA_KEY
from hf_slimmoe.utils import CHUNK_BYTES
from hf_slimmoe.utils.modeling import chunk_tokens

QWEN35_VOCAB = 248_320


# ------------------------------------------------------------------------------------------ chunks sized in bytes
def test_chunks_are_sized_from_the_byte_budget_and_an_explicit_size_overrides_it():
    assert chunk_tokens(32_064, 2) == 520  # 128 MiB / (2 blocks * 4 bytes * 32,064), a multiple of 8
    assert chunk_tokens(QWEN35_VOCAB, 2) == 64 and chunk_tokens(QWEN35_VOCAB, 4) == 32
    assert chunk_tokens(QWEN35_VOCAB, 2) * 2 * 4 * QWEN35_VOCAB <= CHUNK_BYTES  # the same bytes at any vocabulary
    assert chunk_tokens(QWEN35_VOCAB, 2, chunk_bytes=5 * 8 * QWEN35_VOCAB) == 5  # under 8 tokens: not rounded
    assert chunk_tokens(10**9, 4) == 1 and chunk_tokens(QWEN35_VOCAB, 2, chunk_size=1024) == 1024
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunk_tokens(100, 2, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        chunk_tokens(100, 2, chunk_bytes=0)
    assert DistillationConfig(output_dir="unused", report_to=[]).kd_chunk_size is None
    with pytest.raises(ValueError, match="kd_chunk_bytes"):
        DistillationConfig(output_dir="unused", report_to=[], kd_chunk_bytes=0)


def _large_vocab_problem(n_tokens=7, hidden=4, vocab=QWEN35_VOCAB):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n_tokens, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 2).requires_grad_(True)
    b = torch.randn(vocab, generator=g).requires_grad_(True)
    teacher_h, teacher_w = torch.randn(n_tokens, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 2
    samples = torch.randint(0, vocab, (n_tokens, 8), generator=g)
    samples[0, :2] = torch.tensor([0, vocab - 1])  # the first and the last id of the vocabulary
    mask = torch.tensor([True, True, False, True, True, True, True])
    return h, w, b, teacher_h, teacher_w, samples, mask


def _reference(loss, h, w, b, teacher_h, teacher_w, samples, ids, logprobs):
    """The per-token loss from float64 `(tokens, V)` log-probabilities."""
    log_q = torch.log_softmax(h.double() @ w.double().t() + b.double(), -1)  # (N, V)
    if loss == "full":
        log_p = torch.log_softmax(teacher_h.double() @ teacher_w.double().t(), -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if loss == "sampled":
        return -log_q.gather(-1, samples).mean(-1)
    p, picked = logprobs.double().exp(), log_q.gather(-1, ids)
    head = (p * (logprobs.double() - picked)).sum(-1)
    if loss == "topk":
        return head
    p_rest, q_rest = 1 - p.sum(-1), 1 - picked.exp().sum(-1)
    return head + p_rest * (p_rest.log() - q_rest.log())


def _chunked(loss, h, w, b, teacher_h, teacher_w, samples, ids, logprobs, mask, **chunking):
    if loss == "full":
        return full_kl_loss(h, w, b, teacher_h, teacher_w, None, mask, **chunking)
    if loss == "sampled":
        return sampled_kd_loss(h, w, b, samples, mask, **chunking)
    return (topk_kl_loss if loss == "topk" else topk_tail_kl_loss)(h, w, b, ids, logprobs, mask, **chunking)


@pytest.mark.parametrize("loss", ["topk", "topk_tail", "sampled", "full"])
def test_every_loss_is_exact_at_a_large_vocabulary(loss):
    h, w, b, teacher_h, teacher_w, samples, mask = _large_vocab_problem()
    with torch.no_grad():
        ids, logprobs = teacher_topk(teacher_h @ teacher_w.t(), 8)  # (N, 8) distinct ids, full-vocabulary log-probs
    inputs = (h, w, b, teacher_h, teacher_w, samples, ids, logprobs)
    reference = _reference(loss, *inputs)[mask].mean()
    want = torch.autograd.grad(reference, (h, w, b))
    # the default budget (one chunk of these 6 tokens), and a budget of 2 tokens per chunk (3 chunks)
    for chunking in ({}, {"chunk_bytes": 2 * 4 * 4 * QWEN35_VOCAB}):
        value = _chunked(loss, *inputs, mask, **chunking)
        torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6)
        for got, expected in zip(torch.autograd.grad(value, (h, w, b)), want):
            assert (got.double() - expected).norm() <= 1e-4 * expected.norm(), (loss, chunking)


# ------------------------------------------------------------------------------------------ packed sample ids
@pytest.mark.parametrize("vocab", [2, 96, 32_064, 65_536, 151_936, QWEN35_VOCAB, 2**18, 2**18 + 1])
@pytest.mark.parametrize("num_samples", [1, 3, 8])
def test_packed_sample_ids_round_trip_exactly(vocab, num_samples):
    packing = SamplePacking.for_vocab(vocab, num_samples)
    assert packing.bits == max(1, (vocab - 1).bit_length()) and 2**packing.bits >= vocab
    g = torch.Generator().manual_seed(vocab)
    ids = torch.randint(0, vocab, (3, 5, num_samples), generator=g)  # (B, T, S)
    ids[0, 0], ids[0, 1] = vocab - 1, 0
    packed = packing.pack(ids)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, (num_samples * packing.bits + 7) // 8)
    assert torch.equal(packing.unpack(packed), ids) and torch.equal(packing.unpack(packed.long()), ids)
    if num_samples == 8:
        assert packing.width == packing.bits  # S=8: ceil(log2 V) bytes per token
    with pytest.raises(ValueError, match="cannot be packed"):
        packing.pack(torch.full((1, num_samples), 2**packing.bits))


def _teacher(vocab):
    config = SlimMoeConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                           max_position_embeddings=256, router_jitter_noise=0.0, input_jitter_noise=0.0)
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a spread-out but not uniform teacher
    return model


def _rows(vocab, num_rows=4, length=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(0, vocab, (num_rows, length), generator=g).tolist()})


def _bytes_per_token(dataset, columns):
    table = dataset.with_format("arrow")[:]
    return sum(table.column(c).nbytes for c in columns) / sum(len(r) for r in dataset["input_ids"])


@pytest.mark.parametrize("vocab, limit", [(32_064, 16.0), (QWEN35_VOCAB, 20.0), (2**18, 20.0)])
def test_a_packed_samples_cache_round_trips_through_the_collator_within_its_byte_budget(vocab, limit):
    teacher, rows = _teacher(vocab), _rows(vocab)
    cached = cache_teacher_samples(teacher, rows, num_samples=8, batch_size=4)
    record = cache_metadata(cached)["samples"]
    assert record["packing"] == {"column": "teacher_sample_packed", "bits": (vocab - 1).bit_length(),
                                 "width": (vocab - 1).bit_length(), "bit_order": "little"}
    columns = ["teacher_sample_packed", "teacher_sample_fingerprint"]  # values, offsets and fingerprints
    assert _bytes_per_token(cached, columns) <= limit
    batch = DistillationCollator(sample_packing=sample_packing(cached))([cached[i] for i in range(4)])
    assert "teacher_sample_packed" not in batch and batch["teacher_sample_ids"].dtype == torch.int64
    inputs = torch.tensor(rows["input_ids"])
    expected = teacher_samples_from_model(teacher, inputs, torch.ones_like(inputs), 8)  # (4, 128, 8)
    assert torch.equal(batch["teacher_sample_ids"], expected)
    assert int(expected.max()) >= 2 ** ((vocab - 1).bit_length() - 1)  # ids that need every bit were drawn


# ------------------------------------------------------------------------------------------ old caches
def _tiny_teacher_and_cache(num_rows=8):
    teacher = _teacher(96)
    rows = _rows(96, num_rows=num_rows, length=12)
    return teacher, rows, cache_teacher_samples(teacher, rows, num_samples=8, batch_size=num_rows)


def _unpacked(cache, dtype="uint16", keep_packing=False):
    """`cache` as a samples cache made before ids were packed: `teacher_sample_ids` of `dtype`, a record without
    packing (or, with `keep_packing`, the packed cache's record left as it was)."""
    packing = sample_packing(cache)
    ids = [packing.unpack(torch.tensor(row, dtype=torch.uint8)).tolist() for row in cache["teacher_sample_packed"]]
    old = cache.remove_columns(["teacher_sample_packed"]).add_column(
        "teacher_sample_ids", ids, feature=List(List(Value(dtype), length=8)))
    record = dict(cache_metadata(cache)["samples"])
    if not keep_packing:
        record.pop("packing")
    old.info.description = json.dumps({METADATA_KEY: {"samples": record}})
    return old


def _trainer(tmp_path, train, **overrides):
    student = _teacher(96).requires_grad_(True)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                              disable_tqdm=True, per_device_train_batch_size=4, kd_loss="sampled", kd_samples=8,
                              aux_loss_coef=0.0, **overrides)
    return DistillationTrainer(model=student, args=args, train_dataset=train)


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_an_old_unpacked_samples_cache_is_still_read_and_gives_the_same_loss(tmp_path, dtype):
    _, rows, cache = _tiny_teacher_and_cache()
    old = _unpacked(cache, dtype)
    assert sample_packing(old) is None
    packed_trainer, old_trainer = _trainer(tmp_path, cache), _trainer(tmp_path, old)
    packed_batch = packed_trainer.data_collator([cache[i] for i in range(8)])
    old_batch = old_trainer.data_collator([old[i] for i in range(8)])
    assert torch.equal(packed_batch["teacher_sample_ids"], old_batch["teacher_sample_ids"])
    model = packed_trainer.model
    torch.testing.assert_close(packed_trainer.compute_loss(model, packed_batch),
                               old_trainer.compute_loss(model, old_batch), rtol=0, atol=0)
    old.save_to_disk(str(tmp_path / "old-cache"))  # an old output_dir is reused as it is, not rebuilt
    teacher = _teacher(96)
    reused = cache_teacher_samples(teacher, rows, num_samples=8, output_dir=tmp_path / "old-cache")
    assert "teacher_sample_ids" in reused.column_names and "teacher_sample_packed" not in reused.column_names


def test_a_samples_cache_whose_layout_is_not_described_is_refused_never_misread(tmp_path):
    _, _, cache = _tiny_teacher_and_cache()
    lost = Dataset.from_dict(cache.to_dict(), features=cache.features)  # the record (info.description) is gone
    with pytest.raises(ValueError, match="says nothing of their packing.*bit width is unknown"):
        _trainer(tmp_path, lost)
    with pytest.raises(ValueError, match="record says the teacher samples are packed.*unpacked ids"):
        _trainer(tmp_path, _unpacked(cache, keep_packing=True))
    both = cache.add_column("teacher_sample_ids", _unpacked(cache)["teacher_sample_ids"])
    with pytest.raises(ValueError, match="both teacher_sample_packed.*and teacher_sample_ids"):
        _trainer(tmp_path, both)
    wrong = Dataset.from_dict(cache.to_dict(), features=cache.features)
    record = cache_metadata(cache)["samples"]
    record = dict(record, packing=dict(record["packing"], bits=6, width=6))  # 8 ids of 6 bits: 6 bytes, not 7
    wrong.info.description = json.dumps({METADATA_KEY: {"samples": record}})
    with pytest.raises(ValueError, match="hold 7 bytes per position but their record describes 8 ids of 6 bits"):
        _trainer(tmp_path, wrong)
    with pytest.raises(ValueError, match="collator was not given their packing"):
        DistillationCollator()([cache[0]])
    other = cache_teacher_samples(_teacher(96), _rows(96, num_rows=4, length=12), num_samples=4)  # 4 bytes
    with pytest.raises(ValueError, match="packed in different ways"):  # one collator would misread one of them
        DistillationTrainer(model=_teacher(96).requires_grad_(True), teacher_model=_teacher(96), train_dataset=cache,
                            eval_dataset=other, args=DistillationConfig(output_dir=str(tmp_path / "o"), report_to=[],
                                                                        use_cpu=True, kd_loss="sampled"))
