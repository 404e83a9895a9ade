"""Distillation benchmarks, each a ratio measured in one run.

(a) `loss`: the KD loss (forward + backward) on 4096 tokens at vocabulary 32064, three ways:

- `naive`: full logits `h @ W.T + b` for all tokens, `log_softmax`, top-k KL, autograd (the baseline);
- `chunked_topk`: `hf_slimmoe.topk_kl_loss` with the library's default chunking: chunks sized from a byte budget
  (`kd_chunk_bytes`, 128 MiB for a chunk's float32 `(chunk, vocab)` blocks: 520 tokens at 32,064), gradients computed
  per chunk. Until issue #21 this row used chunks of 1,024 tokens;
- `trl_chunked`: TRL's `_chunked_divergence_loss` (full-vocabulary forward KL, `beta=0`), which also projects the
  teacher's hidden states through the teacher's `lm_head`, as TRL's online distillation does.

Goals: peak extra memory of `chunked_topk` at most 1/4 of `naive` (issue #4; 1/8 since issue #21), time no worse than
`naive`.

(b) `step`: one training step of the same student on the same batch (8 x 256 tokens, vocabulary 32064, hidden 256),
as the training loop takes it: the collator builds the batch from the dataset's rows, then `training_step` (forward
+ backward). Three ways, all with the same `TrainingArguments` fields:

- `plain`: the limit: a plain causal-LM step, transformers' `Trainer.training_step` with the model's own loss
  (full-vocabulary cross-entropy plus its load-balancing loss); `TokenCollator` (labels = input_ids);
- `cached`: `DistillationTrainer.training_step` with the library's default loss (`DistillationConfig()`'s `kd_loss`,
  `"sampled"`: `kd_samples` = 8 systematic teacher samples per position) read from a dataset made by
  `cache_teacher_samples` (ids packed in `ceil(log2 V)` bits), collated and unpacked by the trainer's
  `DistillationCollator`;
- `online`: the same loss with the teacher (about 4x the student) run inside the step.

Goals: cached at most 1.15x the time and 1.1x the extra memory of plain (issue #21: the student does its forward and
backward either way); cached at least 1.5x faster than online (issue #4).

Time: modes interleave over rounds in one process (machine load hits all alike); medians are reported.
Memory: each mode runs again in a fresh subprocess that builds everything first (inputs; for (b) models, cache,
trainer and the batch's rows); the kernel's peak-RSS mark (VmHWM) is reset right before the work (one loss, or one
step), and the figure is the peak minus the resident set just before it: the memory the work itself needed (logits,
activations, gradients), allocator included.

    OMP_NUM_THREADS=1 python benchmarks/bench_distillation.py   # writes the "Distillation" section of RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
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

from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM  # noqa: E402
from hf_slimmoe.distillation import (  # noqa: E402
    DistillationConfig,
    DistillationTrainer,
    cache_teacher_samples,
    teacher_topk,
    topk_kl_loss,
)
from hf_slimmoe.utils.data import TokenCollator  # noqa: E402
from hf_slimmoe.utils.modeling import chunk_tokens  # noqa: E402

LOSS_MODES = ("naive", "chunked_topk", "trl_chunked")
STEP_MODES = ("plain", "cached", "online")


# ------------------------------------------------------------------------------------------------ (a) the loss
def loss_inputs(args):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden, generator=g) * 0.5).requires_grad_(True)  # (N, H)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).requires_grad_(True)  # (V, H)
    bias = torch.zeros(args.vocab).requires_grad_(True)  # (V,)
    teacher_hidden = torch.randn(args.tokens, args.hidden, generator=g) * 0.5
    teacher_weight = torch.randn(args.vocab, args.hidden, generator=g) * 0.05
    with torch.no_grad():
        ids, logprobs = teacher_topk(teacher_hidden[:1024] @ teacher_weight.t(), 8)  # (1024, 8)
    ids, logprobs = ids.repeat(args.tokens // 1024, 1), logprobs.repeat(args.tokens // 1024, 1)  # (N, 8)
    mask = torch.ones(args.tokens, dtype=torch.bool)
    return hidden, weight, bias, teacher_hidden, teacher_weight, ids, logprobs, mask


def loss_runner(mode, inputs):
    hidden, weight, bias, teacher_hidden, teacher_weight, ids, logprobs, mask = inputs

    def naive():
        logits = hidden @ weight.t() + bias  # (N, V)
        logq = torch.log_softmax(logits.float(), dim=-1)
        loss = (logprobs.exp() * (logprobs - logq.gather(-1, ids))).sum(-1).mean()
        loss.backward()

    def chunked():
        topk_kl_loss(hidden, weight, bias, ids, logprobs, mask).backward()  # default chunks

    def trl():
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        loss, _, _ = _chunked_divergence_loss(hidden[None], teacher_hidden[None], weight, teacher_weight,
                                              mask[None].long(), beta=0.0, student_lm_head_bias=bias)
        loss.backward()

    def run():
        {"naive": naive, "chunked_topk": chunked, "trl_chunked": trl}[mode]()
        for tensor in (hidden, weight, bias):
            tensor.grad = None

    return run


def measure_loss_memory(args) -> dict:
    """In a fresh process: peak RSS of one loss forward + backward above the RSS right before it."""
    run = loss_runner(args.memory, loss_inputs(args))
    extra, exact = extra_peak_rss(run)
    return {"mode": args.memory, "extra_peak_bytes": extra, "valid": exact}


def measure_loss_time(args) -> dict[str, list[float]]:
    inputs = loss_inputs(args)
    runs = {mode: loss_runner(mode, inputs) for mode in LOSS_MODES}
    for run in runs.values():  # warm-up
        run()
    times = {mode: [] for mode in LOSS_MODES}
    for _ in range(args.rounds):
        for mode, run in runs.items():
            start = time.perf_counter()
            run()
            times[mode].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------- (b) training step
def step_models(args):
    """A teacher and the student pruned from its shape (widths only; weights random): about 4x fewer parameters."""
    teacher_config = SlimMoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2048,
                                   num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                                   num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
                                   attention_bias=True, lm_head_bias=True)
    student_config = teacher_config.slimmed(intermediate_size=192, num_key_value_heads=2)
    torch.manual_seed(0)
    return SlimMoeForCausalLM(teacher_config).eval(), SlimMoeForCausalLM(student_config)


def step_setup(args, modes):
    """For each of `modes`: its trainer (optimizer made, as `train()` leaves it) and the batch's rows as the
    dataloader hands them to the collator; and the models' parameter counts."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    teacher, student = step_models(args)
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_dict(
        {"input_ids": torch.randint(0, args.vocab, (args.step_batch, args.seq_len), generator=g).tolist()})
    common = {"output_dir": tempfile.mkdtemp(prefix="bench-distill-"), "report_to": [], "use_cpu": True,
              "per_device_train_batch_size": args.step_batch, "max_steps": 1, "save_strategy": "no",
              "disable_tqdm": True, "remove_unused_columns": False, "logging_steps": 10}
    kd_args = DistillationConfig(**common)  # the library's default loss and chunking
    trainers, rows = {}, {}
    for mode in modes:
        model = copy.deepcopy(student)
        if mode == "plain":
            model.config.output_router_logits = True  # the model's own loss includes its load-balancing term
            trainers[mode] = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data,
                                     data_collator=TokenCollator())
            dataset = data
        elif mode == "cached":
            dataset = cache_teacher_samples(teacher, data, num_samples=kd_args.kd_samples,
                                            temperature=kd_args.temperature, seed=kd_args.kd_samples_seed,
                                            batch_size=args.step_batch)
            trainers[mode] = DistillationTrainer(model=model, args=kd_args, train_dataset=dataset)
        else:
            trainers[mode] = DistillationTrainer(model=model, teacher_model=teacher, args=kd_args,
                                                 train_dataset=data)
            dataset = data
        trainers[mode].create_optimizer_and_scheduler(num_training_steps=1)
        trainers[mode].current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
        rows[mode] = [dataset[i] for i in range(len(dataset))]
    sizes = {"teacher": sum(p.numel() for p in teacher.parameters()),
             "student": sum(p.numel() for p in student.parameters()),
             "kd_loss": kd_args.kd_loss, "kd_samples": kd_args.kd_samples}
    return trainers, rows, sizes


def run_step(trainer, rows) -> tuple[float, float]:
    """One step as the training loop takes it: collate, count the batch's tokens, `training_step`. Returns the
    seconds of the collate and of the whole step."""
    start = time.perf_counter()
    batch = trainer.data_collator(rows)
    collated = time.perf_counter()
    num_items_in_batch = trainer._get_num_items_in_batch([batch], trainer.args.device)
    trainer.training_step(trainer.model, batch, num_items_in_batch)
    return collated - start, time.perf_counter() - start


def measure_step_memory(args) -> dict:
    """In a fresh process: peak RSS of one step above the RSS right before it (everything built)."""
    trainers, rows, _ = step_setup(args, [args.step_memory])
    extra, exact = extra_peak_rss(lambda: run_step(trainers[args.step_memory], rows[args.step_memory]))
    return {"mode": args.step_memory, "extra_peak_bytes": extra, "valid": exact}


def measure_step_time(args):
    trainers, rows, sizes = step_setup(args, STEP_MODES)
    times = {mode: {"collate": [], "step": []} for mode in STEP_MODES}
    for round_index in range(args.rounds + 1):  # round 0 is the warm-up
        for mode, trainer in trainers.items():
            collate, step = run_step(trainer, rows[mode])
            trainer.model.zero_grad(set_to_none=True)
            if round_index:
                times[mode]["collate"].append(collate)
                times[mode]["step"].append(step)
    return times, sizes


# ------------------------------------------------------------------------------------------------------ main
def memory_in_subprocess(flag: str, mode: str, args) -> int:
    command = [sys.executable, os.path.abspath(__file__), flag, mode, "--tokens", str(args.tokens), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--seq-len", str(args.seq_len), "--step-batch",
               str(args.step_batch)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    result = json.loads(out)
    if not result["valid"]:
        print(f"warning: the peak-RSS mark could not be reset; {mode}'s figure may be low", file=sys.stderr)
    return result["extra_peak_bytes"]


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the loss benchmark")
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row of the training-step benchmark")
    p.add_argument("--step-batch", type=int, default=8, help="rows per training step")
    p.add_argument("--output", default=None, help="RESULTS.md to write (default: benchmarks/RESULTS.md)")
    p.add_argument("--memory", choices=LOSS_MODES, help=argparse.SUPPRESS)  # internal: one loss's memory
    p.add_argument("--step-memory", choices=STEP_MODES, help=argparse.SUPPRESS)  # internal: one step's memory
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.memory:
        print(json.dumps(measure_loss_memory(args)))
        return 0
    if args.step_memory:
        print(json.dumps(measure_step_memory(args)))
        return 0

    started, load_before = time.time(), os.getloadavg()
    memory = {mode: memory_in_subprocess("--memory", mode, args) for mode in LOSS_MODES}
    step_memory = {mode: memory_in_subprocess("--step-memory", mode, args) for mode in STEP_MODES}
    loss_times = {mode: statistics.median(t) for mode, t in measure_loss_time(args).items()}
    step_times, sizes = measure_step_time(args)
    collate_times = {mode: statistics.median(t["collate"]) for mode, t in step_times.items()}
    step_times = {mode: statistics.median(t["step"]) for mode, t in step_times.items()}
    minutes, load_after = (time.time() - started) / 60, os.getloadavg()

    mib = 2**20
    naive_memory, naive_time = memory["naive"], loss_times["naive"]
    loss_rows = "\n".join(
        f"| `{mode}` | {memory[mode] / mib:,.0f} | {memory[mode] / naive_memory:.2f} | {loss_times[mode] * 1e3:,.0f} "
        f"| {loss_times[mode] / naive_time:.2f} |"
        for mode in LOSS_MODES
    )
    chunk = chunk_tokens(args.vocab, 2)  # topk_kl_loss's default: 2 float32 (chunk, V) blocks in CHUNK_BYTES
    memory_ratio, time_ratio = memory["chunked_topk"] / naive_memory, loss_times["chunked_topk"] / naive_time

    tokens_per_step = args.step_batch * args.seq_len
    plain_time, plain_memory = step_times["plain"], step_memory["plain"]
    step_rows = "\n".join(
        f"| {mode} | {step_times[mode] * 1e3:,.0f} | {collate_times[mode] * 1e3:,.1f} "
        f"| {tokens_per_step / step_times[mode]:,.0f} | {step_times[mode] / plain_time:.2f} "
        f"| {step_memory[mode] / mib:,.0f} | {step_memory[mode] / plain_memory:.2f} |"
        for mode in STEP_MODES
    )
    cached_time, cached_memory = step_times["cached"] / plain_time, step_memory["cached"] / plain_memory
    speedup = step_times["online"] / step_times["cached"]
    text = f"""## Distillation

`OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")} python benchmarks/bench_distillation.py`
({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU): {minutes:.1f} min on a
2-core machine shared with other jobs; load average (1, 5, 15 min; this benchmark's own thread adds about 1)
{", ".join(f"{x:.2f}" for x in load_before)} at the start, {", ".join(f"{x:.2f}" for x in load_after)} at the end.

**(a) KD loss, forward + backward**, {args.tokens} tokens, vocabulary {args.vocab}, hidden {args.hidden}, teacher
top-8; `chunked_topk` with the default chunks ({chunk} tokens: two float32 `(chunk, vocab)` blocks in
`kd_chunk_bytes` = 128 MiB). Memory: peak extra RSS of the loss in a fresh process; time: median of {args.rounds}
interleaved rounds.

| loss | peak extra memory (MiB) | vs naive | time (ms) | vs naive |
|---|---:|---:|---:|---:|
{loss_rows}

Goals: `chunked_topk` memory <= 1/4 of naive (issue #4): **{met(memory_ratio <= 1 / 4)}**, <= 1/8 (issue #21):
**{met(memory_ratio <= 1 / 8)}** ({memory_ratio:.2f}); time no worse than naive: **{met(time_ratio <= 1)}**
({time_ratio:.2f}x). `trl_chunked` computes the full-vocabulary KL and projects the teacher too, so it does more work
than a top-k loss by design.

**(b) Training step**, the same student on the same batch of {args.step_batch} x {args.seq_len} tokens (vocabulary
{args.vocab}, hidden {args.hidden}): collate + `training_step` (forward + backward). `plain`: transformers'
`Trainer` with the model's own loss (cross-entropy + load balancing); `cached`: `DistillationTrainer` with the default
`kd_loss="{sizes["kd_loss"]}"` (S={sizes["kd_samples"]}) read from a `cache_teacher_samples` dataset, its packed ids
unpacked by the collator; `online`: the same loss with the teacher run in the step. Student
{sizes["student"] / 1e6:.1f}M parameters, teacher {sizes["teacher"] / 1e6:.1f}M
({sizes["teacher"] / sizes["student"]:.1f}x). Time: median of {args.rounds} interleaved rounds; memory: peak extra
RSS of one step in a fresh process.

| step | time per step (ms) | of it, collate (ms) | tokens/s | time vs plain | extra peak memory (MiB) | vs plain |
|---|---:|---:|---:|---:|---:|---:|
{step_rows}

Goals: cached <= 1.15x plain's time: **{met(cached_time <= 1.15)}** ({cached_time:.2f}x); cached <= 1.1x plain's
extra memory: **{met(cached_memory <= 1.1)}** ({cached_memory:.2f}x); cached >= 1.5x faster than online:
**{met(speedup >= 1.5)}** ({speedup:.2f}x).
"""
    write_section("bench_distillation", text, **({"path": args.output} if args.output else {}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
