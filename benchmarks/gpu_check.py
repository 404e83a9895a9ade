"""The prepared one-GPU check (issue 23): SlimMoE's steps on a real-shape slice of Phi-3.5-MoE, timed on one device.

Nothing is downloaded. The model is built in-process with random weights: Phi-3.5-MoE's real widths (hidden 4096,
16 experts x 6400, top-2, 32/8 heads of 128, vocabulary 32064, attention and `lm_head` biases) and two decoder layers
(`--layers 4` for four; positions up to 4096, no long-context rope scaling), in bfloat16 on one CUDA device, with SDPA
attention and transformers' `grouped_mm` experts kernel. The data are random token ids, no tokenizer: the cost of a
step does not depend on which ids it sees, only the routing does, and random ids through random weights stand in for
a real batch there.

Phases, each timed between `torch.cuda.synchronize()` calls, with the allocator's peak
(`torch.cuda.max_memory_allocated`) reset before each:

1. `scoring`: `compute_sensitivity(model, batches, teacher=model, criterion="kd")` (stage 1: the model is its own
   teacher) on `--calibration-batches` batches;
2. `prune`: `model.prune_to(model.config.slimmed(intermediate_size=2624, num_key_value_heads=6), scores)` on a copy
   of the model (Phi-tiny-MoE's stage-1 widths: experts 2624 wide, 24/6 heads); the unpruned model stays the teacher;
3. `cache`: `cache_teacher_samples(teacher, rows, num_samples=8)`, the unpruned teacher over the rows both training
   phases read (`--steps` x `--batch-size` rows of `--seq-len` tokens);
4. `kd_step`: `--steps` steps of `DistillationTrainer` (`kd_loss="sampled"` read from that cache, plus the
   load-balancing loss) with `bf16=True`: float32 master weights, bfloat16 autocast;
5. `plain_step`: the limit to compare against: the same steps as a plain causal-LM training step, transformers'
   `Trainer` on the same pruned student (float32 master weights, bfloat16 autocast), the same batches in the same
   order, the same optimizer and learning rate; the loss is the model's own (full-vocabulary cross-entropy plus its
   load-balancing loss).

A training phase's tokens/s counts the steps after the first (the first allocates the optimizer state and warms the
kernels up), timed from the Trainer's step-end callbacks; its peak memory covers the whole run (weights, gradients,
AdamW state, activations). The table ends with the KD / plain ratios of step time and peak memory, and states which
kernels ran: the attention implementation, the experts implementation and the dtype the experts' weights had when the
training step reached them.

If `vllm` is importable, the pruned student is exported as a stock `phimoe` checkpoint (`export_phimoe`) and a child
process serves a few token-id prompts with `vllm.LLM` (no tokenizer: `skip_tokenizer_init`), reporting whether it
loads; otherwise the check reports "vllm: not installed".

`--cpu` runs the same code on the CPU with a tiny shape (hidden 64, 4 experts x 96, 4/2 heads, vocabulary 128,
float32, eager experts, 2 steps), so that `tests/test_gpu_check.py` keeps this script from rotting; memory is then the
process's peak resident set (VmHWM, reset before each phase).

    python benchmarks/gpu_check.py                       # on a GPU machine; sized to finish in under 5 minutes
    python benchmarks/gpu_check.py --layers 4 --steps 20 --output gpu_check-4layers.json
    python benchmarks/gpu_check.py --cpu --output /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import reset_peak_rss, status_bytes  # noqa: E402

import hf_slimmoe  # noqa: E402
from hf_slimmoe import (  # noqa: E402
    DistillationConfig,
    DistillationTrainer,
    SlimMoeConfig,
    cache_teacher_samples,
    compute_sensitivity,
)
from hf_slimmoe.architectures import get_architecture  # noqa: E402
from hf_slimmoe.distillation.trainer import use_fp32_master_weights  # noqa: E402
from hf_slimmoe.utils.data import TokenCollator, batches  # noqa: E402

GIB = 2**30
PHASES = ("scoring", "prune", "cache", "kd_step", "plain_step")

# Per device: the teacher's widths, the pruned widths, dtype, experts kernel and the default batch / step counts.
SHAPES = {
    "cuda": {
        "config": dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, num_local_experts=16, num_experts_per_tok=2),
        "target": dict(intermediate_size=2624, num_key_value_heads=6),  # Phi-tiny-MoE stage 1: 24/6 heads
        "dtype": torch.bfloat16, "experts": "grouped_mm",
        "batch_size": 4, "seq_len": 1024, "steps": 10, "calibration_batches": 4,
    },
    "cpu": {
        "config": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
        "target": dict(intermediate_size=48, num_key_value_heads=1),
        "dtype": torch.float32, "experts": "eager",
        "batch_size": 2, "seq_len": 64, "steps": 2, "calibration_batches": 2,
    },
}


# ------------------------------------------------------------------------------------------------ measuring
class Meter:
    """Wall time and peak memory of one phase: the CUDA allocator's peak on a GPU, the process's peak RSS on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.exact, self.held, self.began = True, 0, 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.held = torch.cuda.memory_allocated()
        else:  # without the reset, ru_maxrss is the peak since start-up: exact only if this phase set it
            self.exact = reset_peak_rss()
            self.held = status_bytes("VmRSS")
        self.began = time.perf_counter()

    def stop(self, tokens: int | None = None) -> dict:
        self.sync()
        seconds = time.perf_counter() - self.began
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = status_bytes("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if tokens else None,
                "peak_memory_gib": peak / GIB, "memory_before_gib": self.held / GIB}


class StepClock(TrainerCallback):
    """Device-synchronized time stamps at the end of every optimizer step."""

    def __init__(self, sync):
        self.sync, self.ends = sync, []

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        """Mean time of the steps after the first (the first allocates the optimizer state, warms kernels up)."""
        return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)


def watch_experts(model, seen: dict):
    """Record, on every forward of the first MoE block's experts, the kernel and the dtypes it runs with."""
    arch = get_architecture(model)
    experts = arch.experts_of(next(iter(arch.moe_blocks(model).values())))

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.update(implementation=model.get_experts_implementation()[""], input_dtype=str(hidden.dtype),
                    weight_dtype=str(next(module.parameters()).dtype))

    return experts.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------------------ the pieces
def build_teacher(shape: dict, layers: int, device: torch.device):
    """The Phi-3.5-MoE slice, random weights, built directly on `device` in the shape's dtype."""
    config = SlimMoeConfig(**shape["config"], num_hidden_layers=layers, max_position_embeddings=4096,
                           attention_bias=True, lm_head_bias=True)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=shape["dtype"], attn_implementation="sdpa",
                                                 experts_implementation=shape["experts"])
    return model.eval()


def random_rows(num_rows: int, seq_len: int, vocab_size: int, seed: int) -> Dataset:
    """Rows of uniformly random token ids (no tokenizer): the synthetic data of every phase."""
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(0, vocab_size, (num_rows, seq_len),
                                                         generator=generator).tolist()})


def training_arguments(cls, args, cuda: bool, output_dir: str, **extra):
    """The arguments both training phases share: batch, steps, optimizer, schedule, precision, seed."""
    return cls(output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
               learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0, seed=0, bf16=cuda,
               use_cpu=not cuda, save_strategy="no", report_to=[], logging_steps=args.steps, **extra)


def train(trainer: Trainer, meter: Meter, clock: StepClock, tokens_per_step: int) -> dict:
    """Run `trainer`; its row times the steps after the first, its peak memory covers the whole run."""
    meter.start()
    trainer.train()
    row = meter.stop()
    seconds = clock.seconds_per_step()
    row.update(total_seconds=row["seconds"], seconds=seconds * (len(clock.ends) - 1),
               tokens=tokens_per_step * (len(clock.ends) - 1), tokens_per_s=tokens_per_step / seconds,
               step_seconds=seconds)
    return row


def serve_with_vllm(model_dir: str, vocab_size: int, timeout: int) -> dict:
    """Serve `model_dir` with vLLM in a child process (its own CUDA context, killed on timeout)."""
    command = [sys.executable, os.path.abspath(__file__), "--serve-vllm", model_dir, "--vocab", str(vocab_size)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"loaded": False, "error": f"no answer within {timeout} s"}
    answers = [line for line in result.stdout.splitlines() if line.startswith('{"loaded"')]
    if result.returncode == 0 and answers:
        return json.loads(answers[-1])
    return {"loaded": False, "error": "\n".join(result.stderr.strip().splitlines()[-15:])}


def vllm_child(model_dir: str, vocab_size: int) -> int:
    """The child of `serve_with_vllm`: load the export, greedily continue four token-id prompts, print JSON."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, skip_tokenizer_init=True, enforce_eager=True, max_model_len=1024,
              gpu_memory_utilization=0.5, dtype="bfloat16", seed=0)
    generator = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(0, vocab_size, (16,), generator=generator).tolist()}
               for _ in range(4)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, detokenize=False))
    generated = [list(output.outputs[0].token_ids) for output in outputs]
    print(json.dumps({"loaded": True, "prompts": len(prompts), "generated_token_ids": generated}))
    return 0


# ------------------------------------------------------------------------------------------------ report
def table(report: dict) -> str:
    memory = "peak GPU memory (GiB)" if report["device_type"] == "cuda" else "peak RSS (GiB)"
    lines = [f"| phase | tokens | time (s) | tokens/s | {memory} |", "|---|---:|---:|---:|---:|"]
    for name, row in report["phases"].items():
        tokens = f"{row['tokens']:,}" if row["tokens"] else "-"
        rate = f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-"
        lines.append(f"| {name} | {tokens} | {row['seconds']:.3f} | {rate} | {row['peak_memory_gib']:.2f} |")
    ratios, kernels = report["ratios"], report["kernels"]
    seen = kernels["kd_step"]
    vllm = report["vllm"] if isinstance(report["vllm"], str) else json.dumps(report["vllm"])
    text = "\n".join(lines) + (
        f"\n\nKD / plain: step time {ratios['kd_over_plain_step_time']:.2f}x, "
        f"peak memory {ratios['kd_over_plain_peak_memory']:.2f}x"
        f"\nkernels: attention {kernels['attention']}, experts {kernels['experts']} "
        f"(training step: inputs {seen.get('input_dtype')}, weights {seen.get('weight_dtype')})\nvllm: {vllm}"
    )
    # transformers casts the experts' input to their weights' dtype (grouped_mm is not autocast-enabled), and torch's
    # fast grouped kernel takes bfloat16 only: float32 master weights send the experts to torch's per-expert fallback
    slow_experts = kernels["experts"] == "grouped_mm" and seen.get("weight_dtype") != str(torch.bfloat16)
    if report["device_type"] == "cuda" and slow_experts:
        text += (f"\nnote: the experts multiplied in {seen.get('weight_dtype')} (float32 master weights): torch ran "
                 "its per-expert grouped_mm fallback, not its bf16 grouped kernel")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shape on the CPU, float32, eager experts")
    p.add_argument("--layers", type=int, choices=(2, 4), default=2, help="decoder layers of the slice")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: 4 on a GPU, 2 on --cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: 1024 on a GPU, 64 on --cpu)")
    p.add_argument("--steps", type=int, default=None, help="training steps per phase, at least 2 (default: 10 / 2)")
    p.add_argument("--calibration-batches", type=int, default=None, help="scoring batches (default: 4 / 2)")
    p.add_argument("--kd-samples", type=int, default=8, help="teacher samples per position (S)")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM export and serving")
    p.add_argument("--vllm-timeout", type=int, default=150, help="seconds the vLLM child may take")
    p.add_argument("--output", default="gpu_check.json", help="where the table is written as JSON")
    p.add_argument("--serve-vllm", help=argparse.SUPPRESS)  # internal: the vLLM child
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_vllm:
        return vllm_child(args.serve_vllm, args.vocab)

    device_type = "cpu" if args.cpu else "cuda"
    if device_type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run this on a GPU machine, or pass --cpu for the tiny CPU path")
    shape = SHAPES[device_type]
    for name in ("batch_size", "seq_len", "steps", "calibration_batches"):
        if getattr(args, name) is None:
            setattr(args, name, shape[name])
    if args.steps < 2:
        p.error("--steps must be at least 2: the first step is a warm-up and is not timed")
    if args.cpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(device_type)
    cuda = device_type == "cuda"
    meter = Meter(device)
    work_dir = tempfile.mkdtemp(prefix="gpu-check-")
    phases, seen_kd, seen_plain = {}, {}, {}
    tokens_per_step = args.batch_size * args.seq_len
    try:
        teacher = build_teacher(shape, args.layers, device)
        vocab = teacher.config.vocab_size

        # 1. sensitivity scores, stage 1: the model is its own teacher
        calibration = batches(random_rows(args.calibration_batches * args.batch_size, args.seq_len, vocab, seed=1),
                              args.batch_size)
        meter.start()
        scores = compute_sensitivity(teacher, calibration, teacher=teacher, criterion="kd")
        phases["scoring"] = meter.stop(tokens=args.calibration_batches * tokens_per_step)

        # 2. prune a copy to Phi-tiny-MoE's stage-1 widths; the unpruned model stays the teacher
        student = copy.deepcopy(teacher)
        meter.start()
        student.prune_to(student.config.slimmed(**shape["target"]), scores)
        phases["prune"] = meter.stop()
        plain_student = copy.deepcopy(student).to("cpu")  # the plain phase starts from the same pruned weights
        vllm_available = importlib.util.find_spec("vllm") is not None
        export_dir = os.path.join(work_dir, "export")
        if cuda and vllm_available and not args.no_vllm:
            student.export_phimoe(export_dir)

        # 3. teacher samples from the unpruned teacher over the rows both training phases read
        rows = random_rows(args.steps * args.batch_size, args.seq_len, vocab, seed=2)
        meter.start()
        cached = cache_teacher_samples(teacher, rows, num_samples=args.kd_samples, batch_size=args.batch_size)
        phases["cache"] = meter.stop(tokens=len(rows) * args.seq_len)
        del teacher

        # 4. distillation steps from the cache: float32 master weights, bf16 autocast on a GPU
        clock = StepClock(meter.sync)
        kd_args = training_arguments(DistillationConfig, args, cuda, os.path.join(work_dir, "kd"), kd_loss="sampled",
                                     kd_samples=args.kd_samples)
        trainer = DistillationTrainer(model=student, args=kd_args, train_dataset=cached, callbacks=[clock])
        hook = watch_experts(student, seen_kd)
        phases["kd_step"] = train(trainer, meter, clock, tokens_per_step)
        hook.remove()
        del trainer, student, cached

        # 5. the limit: the same steps as a plain causal-LM step (the model's own loss) on the same student
        student = plain_student.to(device)
        use_fp32_master_weights(student)  # as DistillationTrainer does: float32 master weights
        student.config.output_router_logits = True  # the model's own loss includes its load-balancing term
        clock = StepClock(meter.sync)
        trainer = Trainer(model=student, args=training_arguments(TrainingArguments, args, cuda,
                                                                 os.path.join(work_dir, "plain")),
                          train_dataset=rows, data_collator=TokenCollator(), callbacks=[clock])
        hook = watch_experts(student, seen_plain)
        phases["plain_step"] = train(trainer, meter, clock, tokens_per_step)
        hook.remove()
        student_config = student.config
        del trainer, student, plain_student
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

        if args.cpu:
            vllm = "skipped (--cpu)"
        elif not vllm_available:
            vllm = "not installed"
        elif args.no_vllm:
            vllm = "skipped (--no-vllm)"
        else:
            vllm = serve_with_vllm(export_dir, vocab, args.vllm_timeout)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    report = {
        "device_type": device_type,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "hf_slimmoe": hf_slimmoe.__version__},
        "memory": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (VmHWM)",
        "data": "random token ids (no tokenizer)",
        "shape": {"teacher": {**shape["config"], "num_hidden_layers": args.layers, "dtype": str(shape["dtype"])},
                  "student": {"intermediate_size": student_config.intermediate_size,
                              "num_attention_heads": student_config.num_attention_heads,
                              "num_key_value_heads": student_config.num_key_value_heads}},
        "run": {"batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
                "calibration_batches": args.calibration_batches, "kd_samples": args.kd_samples,
                "precision": "bf16 autocast, float32 master weights" if cuda else "float32"},
        "phases": {name: phases[name] for name in PHASES},
        "ratios": {
            "kd_over_plain_step_time": phases["kd_step"]["step_seconds"] / phases["plain_step"]["step_seconds"],
            "kd_over_plain_peak_memory": phases["kd_step"]["peak_memory_gib"]
            / phases["plain_step"]["peak_memory_gib"],
        },
        "kernels": {"attention": student_config._attn_implementation, "experts": seen_kd.get("implementation"),
                    "kd_step": seen_kd, "plain_step": seen_plain},
        "vllm": vllm,
    }
    print(table(report))
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
