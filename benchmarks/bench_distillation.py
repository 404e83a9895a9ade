"""Distillation benchmarks, each a ratio measured in one run.

(a) `loss`: the KD loss (forward + backward) on 4096 tokens at vocabulary 32064, three ways:

- `naive`: full logits `h @ W.T + b` for all tokens, `log_softmax`, top-k KL, autograd (the baseline);
- `chunked_topk`: `hf_slimmoe.topk_kl_loss` (chunks of 1024 tokens, gradients computed per chunk);
- `trl_chunked`: TRL's `_chunked_divergence_loss` (full-vocabulary forward KL, `beta=0`), which also projects the
  teacher's hidden states through the teacher's `lm_head`, as TRL's online distillation does.

Goal (issue #4): peak extra memory of `chunked_topk` at most 1/4 of `naive`, time no worse than `naive`.

(b) `step`: a `DistillationTrainer.training_step` (student forward + backward) with the teacher's top-8 read from
the batch (`cached`) vs computed by an online teacher about 4x the student's size (`online`). Goal: cached at
least 1.5x faster.

Time: modes interleave over rounds in one process (machine load hits all alike); medians are reported.
Memory: each loss mode runs again in a fresh subprocess; the kernel's peak-RSS mark (VmHWM) is reset right before the
work, and the figure is the peak minus the resident set just before it (inputs already built): the memory the loss
itself needed (logits, softmax, gradients), allocator included.

    python benchmarks/bench_distillation.py     # writes the "Distillation" section of benchmarks/RESULTS.md
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
    DistillationCollator,
    DistillationConfig,
    DistillationTrainer,
    teacher_topk,
    topk_kl_loss,
)

LOSS_MODES = ("naive", "chunked_topk", "trl_chunked")


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
        topk_kl_loss(hidden, weight, bias, ids, logprobs, mask, chunk_size=1024).backward()

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
def step_setup(args):
    teacher_config = SlimMoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                   num_experts_per_tok=2, max_position_embeddings=1024, attention_bias=True,
                                   lm_head_bias=True)
    student_config = teacher_config.slimmed(intermediate_size=192, num_key_value_heads=2)
    torch.manual_seed(0)
    teacher, student = SlimMoeForCausalLM(teacher_config).eval(), SlimMoeForCausalLM(student_config)
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 4096, (args.seq_len,), generator=g).tolist()}
            for _ in range(args.step_batch)]
    online_batch = DistillationCollator()(rows)
    cached_batch = dict(online_batch)
    from hf_slimmoe.distillation import teacher_topk_from_model

    cached_batch["teacher_topk_ids"], cached_batch["teacher_topk_logprobs"] = teacher_topk_from_model(
        teacher, online_batch["input_ids"], online_batch["attention_mask"], 8
    )
    output_dir = tempfile.mkdtemp(prefix="bench-distill-")
    args_ = DistillationConfig(output_dir=output_dir, report_to=[], use_cpu=True, per_device_train_batch_size=8,
                               max_steps=1, save_strategy="no", disable_tqdm=True, kd_loss="topk")
    trainers = {
        "cached": DistillationTrainer(model=copy.deepcopy(student), args=args_, train_dataset=None),
        "online": DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args_,
                                      train_dataset=None),
    }
    batches = {"cached": cached_batch, "online": online_batch}
    sizes = {"teacher": sum(p.numel() for p in teacher.parameters()),
             "student": sum(p.numel() for p in student.parameters())}
    return trainers, batches, sizes


def measure_step_time(args):
    trainers, batches, sizes = step_setup(args)
    for trainer in trainers.values():
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
    times = {mode: [] for mode in trainers}
    for round_index in range(args.rounds + 1):  # round 0 is the warm-up
        for mode, trainer in trainers.items():
            start = time.perf_counter()
            trainer.training_step(trainer.model, dict(batches[mode]), None)
            elapsed = time.perf_counter() - start
            trainer.model.zero_grad(set_to_none=True)
            if round_index:
                times[mode].append(elapsed)
    return times, sizes


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the loss benchmark")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row of the training-step benchmark")
    p.add_argument("--step-batch", type=int, default=8, help="rows per training step")
    p.add_argument("--output", default=None, help="RESULTS.md to write (default: benchmarks/RESULTS.md)")
    p.add_argument("--memory", choices=LOSS_MODES, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.memory:
        print(json.dumps(measure_loss_memory(args)))
        return 0

    memory = {}
    for mode in LOSS_MODES:
        command = [sys.executable, os.path.abspath(__file__), "--memory", mode, "--tokens", str(args.tokens),
                   "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        memory[mode] = json.loads(out)["extra_peak_bytes"]
    loss_times = {mode: statistics.median(t) for mode, t in measure_loss_time(args).items()}
    step_times, sizes = measure_step_time(args)
    step_times = {mode: statistics.median(t) for mode, t in step_times.items()}

    mib = 2**20
    naive_memory, naive_time = memory["naive"], loss_times["naive"]
    rows = "\n".join(
        f"| `{mode}` | {memory[mode] / mib:,.0f} | {memory[mode] / naive_memory:.2f} | {loss_times[mode] * 1e3:,.0f} "
        f"| {loss_times[mode] / naive_time:.2f} |"
        for mode in LOSS_MODES
    )
    tokens_per_step = args.step_batch * args.seq_len
    speedup = step_times["online"] / step_times["cached"]
    memory_ok = memory["chunked_topk"] <= naive_memory / 4
    time_ok = loss_times["chunked_topk"] <= naive_time
    text = f"""## Distillation

`python benchmarks/bench_distillation.py` ({platform.machine()}, torch {torch.__version__},
{torch.get_num_threads()} thread(s), CPU).

**(a) KD loss, forward + backward**, {args.tokens} tokens, vocabulary {args.vocab}, hidden {args.hidden}, teacher
top-8. Memory: peak extra RSS of the loss in a fresh process; time: median of {args.rounds} interleaved rounds.

| loss | peak extra memory (MiB) | vs naive | time (ms) | vs naive |
|---|---:|---:|---:|---:|
{rows}

Goal: `chunked_topk` memory <= 1/4 of naive: **{"met" if memory_ok else "not met"}**
({memory["chunked_topk"] / naive_memory:.2f}); time no worse than naive: **{"met" if time_ok else "not met"}**
({loss_times["chunked_topk"] / naive_time:.2f}x). `trl_chunked` computes the full-vocabulary KL and projects the
teacher too, so it does more work than a top-k loss by design.

**(b) Training step** (`DistillationTrainer.training_step`, student forward + backward), {args.step_batch} x
{args.seq_len} tokens; student {sizes["student"] / 1e6:.1f}M parameters, teacher {sizes["teacher"] / 1e6:.1f}M
({sizes["teacher"] / sizes["student"]:.1f}x), median of {args.rounds} interleaved rounds.

| teacher | time per step (ms) | tokens/s | speed-up |
|---|---:|---:|---:|
| online | {step_times["online"] * 1e3:,.0f} | {tokens_per_step / step_times["online"]:,.0f} | 1.00 |
| cached | {step_times["cached"] * 1e3:,.0f} | {tokens_per_step / step_times["cached"]:,.0f} | {speedup:.2f} |

Goal: cached >= 1.5x faster: **{"met" if speedup >= 1.5 else "not met"}** ({speedup:.2f}x).
"""
    write_section("bench_distillation", text, **({"path": args.output} if args.output else {}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
