"""Distillation at large vocabularies: chunks sized in bytes, and the packed teacher sample cache, measured in one run.

(a) `loss`: every `kd_loss` (`topk`, `topk_tail`, `sampled` S=8, `full`), forward + backward on 4,096 tokens at
vocabularies 32,064 (Phi), 151,936 (Qwen3-MoE) and 248,320 (Qwen3.5-MoE), hidden 64 (the `(tokens, V)` blocks, not
the hidden size, are what grows with the vocabulary), three ways:

- `naive`: the `(tokens, V)` logits of all tokens, `log_softmax`, the loss, autograd (the baseline);
- `chunked`: the library's loss with `chunk_size=None`, chunks sized from the byte budget (128 MiB by default);
- `1024 tokens`: the same loss with the fixed 1,024-token chunks it used before (for reference).

Each mode runs in a fresh process: a warm-up on 64 tokens (kernels initialized, no large allocation), then the
kernel's peak-RSS mark is reset and one forward + backward is measured, peak extra memory (peak minus the resident set
right before it: inputs already built) and wall time. Where the naive loss would not fit the memory at hand
(`--memory-limit-gib`), it is measured at 1/2 and 1/4 of the tokens and both figures are extrapolated linearly to
4,096 tokens (the naive loss is `a + b * tokens` in memory and in time; the row says so).

(b) `cache`: a packed S=8 teacher sample cache (`cache_teacher_samples` packs ids in `ceil(log2 V)` bits) at each
vocabulary: Arrow bytes per token of its columns, bookkeeping included, against the old layout (`uint16` ids below
65,536, `int32` above); and the time `DistillationCollator` takes to pad and unpack a batch, against a
`DistillationTrainer.training_step` of a small MoE student on the same batch.

    python benchmarks/bench_large_vocab.py      # writes the "bench_large_vocab_loss" and "bench_large_vocab_cache"
                                                # sections of benchmarks/RESULTS.md (--parts loss / cache: one)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import extra_peak_rss  # noqa: E402
from results import write_section  # noqa: E402

VOCABS = (32064, 151936, 248320)
LOSSES = ("topk", "topk_tail", "sampled", "full")
MODES = ("naive", "chunked", "1024 tokens")
NAIVE_BLOCKS = {"topk": 3, "topk_tail": 3, "sampled": 3, "full": 5}  # (tokens, V) float32 blocks (measured at 32,064)
MIB = 2**20


# ------------------------------------------------------------------------------------------------ (a) the loss
def loss_inputs(tokens: int, vocab: int, hidden: int) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden": (torch.randn(tokens, hidden, generator=g) * 0.5).requires_grad_(True),  # (N, H)
        "weight": (torch.randn(vocab, hidden, generator=g) * 0.05).requires_grad_(True),  # (V, H)
        "bias": torch.zeros(vocab).requires_grad_(True),  # (V,)
        "teacher_hidden": torch.randn(tokens, hidden, generator=g) * 0.5,  # (N, H)
        "teacher_weight": torch.randn(vocab, hidden, generator=g) * 0.05,  # (V, H)
        "samples": torch.randint(0, vocab, (tokens, 8), generator=g),  # (N, S)
    }
    from hf_slimmoe.distillation import teacher_topk

    with torch.no_grad():  # the teacher's top-8 of 256 positions, repeated: (N, 8) each
        ids, logprobs = teacher_topk(inputs["teacher_hidden"][:256] @ inputs["teacher_weight"].t(), 8)
    repeats = -(-tokens // 256)
    inputs["ids"], inputs["logprobs"] = ids.repeat(repeats, 1)[:tokens], logprobs.repeat(repeats, 1)[:tokens]
    return inputs


def _naive_loss(loss: str, x: dict, n: int) -> torch.Tensor:
    """The loss from the `(n, V)` log-probabilities of the first `n` tokens, by autograd."""
    log_q = torch.log_softmax(torch.addmm(x["bias"], x["hidden"][:n], x["weight"].t()), dim=-1)  # (n, V)
    if loss == "full":
        with torch.no_grad():
            log_p = torch.log_softmax(x["teacher_hidden"][:n] @ x["teacher_weight"].t(), dim=-1)  # (n, V)
        return torch.nn.functional.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    if loss == "sampled":
        return -log_q.gather(-1, x["samples"][:n]).mean()
    ids, logprobs = x["ids"][:n], x["logprobs"][:n]
    head = log_q.gather(-1, ids)  # (n, k)
    p = logprobs.exp()
    value = (p * (logprobs - head)).sum(-1)  # (n,)
    if loss == "topk_tail":
        tiny = torch.finfo(torch.float32).tiny
        p_rest = (1 - p.sum(-1)).clamp(min=0)
        q_rest = (1 - head.exp().sum(-1)).clamp(min=tiny)
        value = value + p_rest * (p_rest.clamp(min=tiny).log() - q_rest.log())
    return value.mean()


def _chunked_loss(loss: str, x: dict, n: int, chunk_size: int | None) -> torch.Tensor:
    from hf_slimmoe.distillation import full_kl_loss, sampled_kd_loss, topk_kl_loss, topk_tail_kl_loss

    head = (x["hidden"][:n], x["weight"], x["bias"])
    if loss == "full":
        return full_kl_loss(*head, x["teacher_hidden"][:n], x["teacher_weight"], None, chunk_size=chunk_size)
    if loss == "sampled":
        return sampled_kd_loss(*head, x["samples"][:n], chunk_size=chunk_size)
    function = topk_kl_loss if loss == "topk" else topk_tail_kl_loss
    return function(*head, x["ids"][:n], x["logprobs"][:n], chunk_size=chunk_size)


def loss_runner(loss: str, mode: str, x: dict):
    def run(n: int) -> None:
        value = _naive_loss(loss, x, n) if mode == "naive" else _chunked_loss(
            loss, x, n, None if mode == "chunked" else 1024)
        value.backward()
        for name in ("hidden", "weight", "bias"):
            x[name].grad = None

    return run


def measure_one(args) -> dict:
    """In a fresh process: warm-up on 64 tokens, then peak extra RSS and wall time of one forward + backward."""
    torch.set_num_threads(args.threads)
    run = loss_runner(args.loss, args.mode, loss_inputs(args.tokens, args.vocab, args.hidden))
    run(64)
    timing = {}

    def work():
        start = time.perf_counter()
        run(args.tokens)
        timing["seconds"] = time.perf_counter() - start

    extra, exact = extra_peak_rss(work)
    return {"extra_peak_bytes": extra, "valid": exact, "seconds": timing["seconds"]}


def run_subprocess(args, loss: str, mode: str, vocab: int, tokens: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--measure", "--loss", loss, "--mode", mode, "--vocab",
               str(vocab), "--tokens", str(tokens), "--hidden", str(args.hidden), "--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def naive_figures(args, loss: str, vocab: int) -> dict:
    """The naive loss at `args.tokens`, measured there when it fits `--memory-limit-gib`, else fitted from half and a
    quarter of the tokens (`a + b * tokens`)."""
    estimate = NAIVE_BLOCKS[loss] * args.tokens * vocab * 4
    if estimate <= args.memory_limit_gib * 2**30:
        return run_subprocess(args, loss, "naive", vocab, args.tokens) | {"measured_at": None}
    low, high = args.tokens // 4, args.tokens // 2
    at_low = run_subprocess(args, loss, "naive", vocab, low)
    at_high = run_subprocess(args, loss, "naive", vocab, high)
    scale = (args.tokens - high) / (high - low)
    fitted = {key: at_high[key] + (at_high[key] - at_low[key]) * scale for key in ("extra_peak_bytes", "seconds")}
    return fitted | {"valid": at_low["valid"] and at_high["valid"], "measured_at": (low, high)}


def measure_losses(args) -> list[dict]:
    rows = []
    for vocab in args.vocabs:
        for loss in args.losses:
            row = {"vocab": vocab, "loss": loss, "naive": naive_figures(args, loss, vocab)}
            for mode in MODES[1:]:
                row[mode] = run_subprocess(args, loss, mode, vocab, args.tokens)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def loss_table(rows: list[dict], args) -> str:
    from hf_slimmoe.utils import CHUNK_BYTES

    lines = ["| V | `kd_loss` | naive (MiB) | chunked (MiB) | vs naive | 1024 tokens (MiB) | vs naive "
             "| naive time (s) | chunked time (s) | vs naive |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        naive, chunked, fixed = row["naive"], row["chunked"], row["1024 tokens"]
        fitted = "" if naive["measured_at"] is None else " *"
        lines.append(
            f"| {row['vocab']:,} | `{row['loss']}` | {naive['extra_peak_bytes'] / MIB:,.0f}{fitted} | "
            f"{chunked['extra_peak_bytes'] / MIB:,.0f} | "
            f"{chunked['extra_peak_bytes'] / naive['extra_peak_bytes']:.3f} | "
            f"{fixed['extra_peak_bytes'] / MIB:,.0f} | {fixed['extra_peak_bytes'] / naive['extra_peak_bytes']:.2f} | "
            f"{naive['seconds']:.2f}{fitted} | {chunked['seconds']:.2f} | "
            f"{chunked['seconds'] / naive['seconds']:.2f} |")
    worst_memory = max(r["chunked"]["extra_peak_bytes"] / r["naive"]["extra_peak_bytes"] for r in rows)
    worst_time = max(r["chunked"]["seconds"] / r["naive"]["seconds"] for r in rows)
    fitted_rows = sorted({tuple(r["naive"]["measured_at"]) for r in rows if r["naive"]["measured_at"]})
    note = ""
    if fitted_rows:
        note = (f" `*`: the naive loss did not fit {args.memory_limit_gib:g} GiB at {args.tokens:,} tokens; measured "
                f"at {' and '.join(f'{t:,}' for t in fitted_rows[0])} tokens and extrapolated linearly.")
    return "\n".join(lines) + f"""

Chunk budget {CHUNK_BYTES / MIB:.0f} MiB (`hf_slimmoe.utils.CHUNK_BYTES`).{note} Goal: chunked peak extra
memory <= 1/8 of naive at every vocabulary and loss: **{"met" if worst_memory <= 1 / 8 else "not met"}** (worst
{worst_memory:.3f}); time no worse than naive: **{"met" if worst_time <= 1.0 else "not met"}** (worst
{worst_time:.2f}x)."""


def loss_part(args) -> str:
    rows = measure_losses(args)
    return (f"**KD loss, forward + backward**, {args.tokens:,} tokens, hidden {args.hidden}: peak extra RSS and wall "
            f"time of one run, each in a fresh process.\n\n{loss_table(rows, args)}")


# ------------------------------------------------------------------------------------------------ (b) the cache
def _model(vocab: int, hidden: int, layers: int, experts: int):
    from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM

    config = SlimMoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    return SlimMoeForCausalLM(config)


def _unpacked_copy(cache, vocab: int):
    """The same cache in the layout made before ids were packed: `uint16` ids below 65,537 tokens, else `int32`."""
    from datasets import List, Value

    from hf_slimmoe.distillation import cache_metadata, sample_packing
    from hf_slimmoe.distillation.teacher_cache import METADATA_KEY

    packing = sample_packing(cache)
    ids = [packing.unpack(torch.tensor(row, dtype=torch.uint8)).tolist() for row in cache["teacher_sample_packed"]]
    dtype = "uint16" if vocab <= 2**16 else "int32"
    old = cache.remove_columns(["teacher_sample_packed"]).add_column(
        "teacher_sample_ids", ids, feature=List(List(Value(dtype), length=8)))
    record = {key: value for key, value in cache_metadata(cache)["samples"].items() if key != "packing"}
    old.info.description = json.dumps({METADATA_KEY: {"samples": record}})  # as such a cache recorded itself
    return old


def _bytes_per_token(dataset, columns: list[str]) -> float:
    table = dataset.with_format("arrow")[:]
    return sum(table.column(c).nbytes for c in columns) / sum(len(r) for r in dataset["input_ids"])


def _collate_seconds(collator, dataset, rounds: int) -> float:
    """Median time to fetch every row of `dataset` (one batch) and collate it, after one warm-up."""
    collator([dataset[i] for i in range(len(dataset))])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        collator([dataset[i] for i in range(len(dataset))])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _step_seconds(trainer, batch: dict, rounds: int) -> float:
    """Median time of a `training_step` (forward + backward, KD from the batch's samples), after one warm-up."""
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
    times = []
    for index in range(rounds + 1):
        start = time.perf_counter()
        trainer.training_step(trainer.model, dict(batch), None)
        trainer.model.zero_grad(set_to_none=True)
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_cache(args, vocab: int) -> dict:
    from datasets import Dataset

    from hf_slimmoe.distillation import (
        DistillationCollator,
        DistillationConfig,
        DistillationTrainer,
        cache_teacher_samples,
    )

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.rows, args.row_tokens), generator=g)  # (rows, T)
    rows = Dataset.from_dict({"input_ids": ids.tolist()})
    start = time.perf_counter()
    packed = cache_teacher_samples(_model(vocab, 8, 1, 2).eval(), rows, num_samples=8, batch_size=args.rows)
    build = time.perf_counter() - start
    old = _unpacked_copy(packed, vocab)
    config = DistillationConfig(output_dir=tempfile.mkdtemp(prefix="bench-large-vocab-"), report_to=[], use_cpu=True,
                                save_strategy="no", disable_tqdm=True, per_device_train_batch_size=args.rows,
                                kd_loss="sampled", kd_samples=8, aux_loss_coef=0.01)
    trainer = DistillationTrainer(model=_model(vocab, args.student_hidden, 2, 4), args=config, train_dataset=packed)
    collate = {"packed": _collate_seconds(trainer.data_collator, packed, args.collate_rounds),
               "old": _collate_seconds(DistillationCollator(), old, args.collate_rounds)}
    batch = trainer.data_collator([packed[i] for i in range(len(packed))])
    return {"vocab": vocab, "bits": trainer.sample_packing.bits, "build_seconds": build,
            "packed_values": _bytes_per_token(packed, ["teacher_sample_packed"]),
            "packed_all": _bytes_per_token(packed, ["teacher_sample_packed", "teacher_sample_fingerprint"]),
            "old_values": _bytes_per_token(old, ["teacher_sample_ids"]),
            "old_all": _bytes_per_token(old, ["teacher_sample_ids", "teacher_sample_fingerprint"]),
            "collate": collate, "step": _step_seconds(trainer, batch, args.step_rounds),
            "student": sum(p.numel() for p in trainer.model.parameters())}


def cache_table(rows: list[dict], args) -> str:
    lines = ["| V | bits / id | S=8 bytes / token, packed (ids; all) | before (ids; all) | collate packed (ms) | "
             "collate before (ms) | training step (ms) | collate / step |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['vocab']:,} | {r['bits']} | {r['packed_values']:.2f}; **{r['packed_all']:.2f}** | "
                     f"{r['old_values']:.2f}; {r['old_all']:.2f} | {r['collate']['packed'] * 1e3:.1f} | "
                     f"{r['collate']['old'] * 1e3:.1f} | {r['step'] * 1e3:,.0f} | "
                     f"{r['collate']['packed'] / r['step']:.3f} |")
    small = [r for r in rows if r["vocab"] < 2**16]
    large = [r for r in rows if r["vocab"] <= 2**18]
    met_20 = all(r["packed_all"] <= 20 for r in large)
    met_16 = all(r["packed_values"] <= 16 for r in small)
    worst = max(r["collate"]["packed"] / r["step"] for r in rows)
    tokens = args.rows * args.row_tokens
    return "\n".join(lines) + f"""

{args.rows} rows of {args.row_tokens:,} tokens ({tokens:,} tokens, one batch) per vocabulary, 8 teacher samples per
token. Bytes per token: Arrow bytes of the cache columns over the tokens; "ids" is the ids column alone (the values
and each row's list offset), "all" adds the row fingerprint (16-character digest + offset: 20 bytes a row). Collate:
median of {args.collate_rounds} rounds of fetching the batch's rows from the dataset and collating them
(`DistillationCollator`: padding, and for the packed cache unpacking the bytes, vectorized). Training step: median of
{args.step_rounds} `DistillationTrainer.training_step` calls (KD `sampled` from the batch + aux) of a
{rows[0]['student'] / 1e6:.1f}M-parameter student at the first vocabulary (hidden {args.student_hidden}, 2 layers, 4
experts; larger at larger vocabularies: its `lm_head` grows). Goals: S=8 at most 20 B/token, bookkeeping included, for
V <= 262,144: **{"met" if met_20 else "not met"}**; at most 16 B/token of ids below 65,536: **{"met" if met_16 else
"not met"}**; collate cost against a training step: at most {worst:.3f} of it (with
`dataloader_num_workers=0` it runs in the training loop's process, between steps)."""


def cache_part(args) -> str:
    rows = []
    for vocab in args.vocabs:
        rows.append(measure_cache(args, vocab))
        print(json.dumps(rows[-1]), flush=True)
    return f"**Packed teacher samples, S=8**\n\n{cache_table(rows, args)}"


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the loss benchmark")
    p.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-limit-gib", type=float, default=12.0,
                   help="largest naive loss (estimated) measured at full size; above it, fitted from smaller runs")
    p.add_argument("--parts", nargs="+", default=["loss", "cache"], choices=["loss", "cache"])
    p.add_argument("--rows", type=int, default=8, help="rows of the cache benchmark's batch")
    p.add_argument("--row-tokens", type=int, default=512, help="tokens per row of the cache benchmark")
    p.add_argument("--student-hidden", type=int, default=64, help="hidden size of the cache benchmark's student")
    p.add_argument("--collate-rounds", type=int, default=20)
    p.add_argument("--step-rounds", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--output", default=None, help="RESULTS.md to write (default: benchmarks/RESULTS.md)")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # internal: one fresh-process run
    p.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure_one(args)))
        return 0
    torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else argv
    shown = [a for i, a in enumerate(argv) if a != "--output" and (i == 0 or argv[i - 1] != "--output")]
    command = " ".join(["python benchmarks/bench_large_vocab.py", *shown])
    parts = {"loss": ("Large vocabularies (a): KD losses with chunks sized in bytes", loss_part),
             "cache": ("Large vocabularies (b): the packed teacher sample cache", cache_part)}
    for part in args.parts:
        title, function = parts[part]
        start, load_before = time.perf_counter(), os.getloadavg()
        body = function(args)
        minutes, load_after = (time.perf_counter() - start) / 60, os.getloadavg()
        text = (f"## {title}\n\n`{command}` ({minutes:.1f} min, {platform.machine()}, torch {torch.__version__}, "
                f"CPU, {args.threads} thread(s); load average {load_before[0]:.2f} at the start, {load_after[0]:.2f} "
                f"at the end, on a 2-core machine shared with other jobs).\n\n{body}")
        print(text)
        if not args.no_write:
            write_section(f"bench_large_vocab_{part}", text, **({"path": args.output} if args.output else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
