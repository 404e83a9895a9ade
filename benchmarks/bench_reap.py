"""Expert slimming (SlimMoE) vs whole-expert dropping (REAP, frequency) at equal total parameters, on a tiny Qwen3-MoE.

One run, one thread, a few minutes. A byte-level tiny Qwen3-MoE teacher (stock `Qwen3MoeForCausalLM`, not PhiMoE) is
trained briefly on the Python standard library's source; then, at 50% and 25% of the expert parameters (attention
untouched), each variant is applied to a copy of the teacher:

- `slim-kd`: SlimMoE expert slimming, every expert keeps its highest KD-sensitivity neurons (`compute_sensitivity`,
  stage-1 self teacher, `slim_config` + `prune_to`);
- `drop-reap`: drop whole experts by REAP saliency (router-weighted expert output norm, Cerebras 2025, `reap_scores`);
- `drop-freq`: drop whole experts by routing frequency (Seer-MoE, `expert_activation_frequency`).

Slimming by a factor f and dropping by the same factor remove the same expert parameters; dropping also removes the
router rows of the dropped experts, so its total is a little smaller (both totals are reported). Dropping keeps the
active parameters of the teacher (every token still uses top-2 full-width experts); slimming shrinks them.

Each variant is measured right after surgery ("no distillation") and after the same number of distillation steps
(full-vocabulary KL to the teacher, online; same data order and learning rate for every variant). Metrics on
held-out standard-library files the teacher never trained on: full-vocabulary KL(teacher || student) and perplexity.

    python benchmarks/bench_reap.py              # writes the "bench_reap" section of benchmarks/RESULTS.md
    python benchmarks/bench_reap.py --quick      # smoke run (seconds), does not write RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import write_section  # noqa: E402

from hf_slimmoe import compute_sensitivity, count_parameters, prune_to, slim_config  # noqa: E402
from hf_slimmoe.pruning import drop_experts, expert_activation_frequency, reap_scores  # noqa: E402

VARIANTS = (("slim-kd", "Slim experts, KD scores (SlimMoE)"), ("drop-reap", "Drop experts, REAP"),
            ("drop-freq", "Drop experts, activation frequency"))
STDLIB = sysconfig.get_paths()["stdlib"]
TRAIN_GLOBS = ("json/*.py", "email/*.py", "http/*.py", "logging/*.py", "unittest/*.py", "asyncio/*.py")
EVAL_FILES = ("textwrap.py", "difflib.py", "argparse.py")


def blocks_from(paths: list[str], length: int) -> torch.Tensor:
    """Byte-level token blocks `[N, length]` (vocabulary 256) from the concatenated files."""
    data = b"\n".join(open(p, "rb").read() for p in paths)
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    count = ids.numel() // length
    return ids[: count * length].view(count, length)


def data(args) -> dict[str, torch.Tensor]:
    train = sorted(p for pattern in TRAIN_GLOBS for p in glob.glob(os.path.join(STDLIB, pattern)))
    generator = torch.Generator().manual_seed(0)
    train_blocks = blocks_from(train, args.block)
    train_blocks = train_blocks[torch.randperm(len(train_blocks), generator=generator)]
    eval_blocks = blocks_from([os.path.join(STDLIB, f) for f in EVAL_FILES], args.block)[: args.eval_blocks]
    return {"train": train_blocks, "eval": eval_blocks, "calibration": train_blocks[-args.calibration_blocks:]}


def build_teacher(args, blocks: torch.Tensor):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                            moe_intermediate_size=args.expert_width, num_hidden_layers=args.layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                            num_experts=args.experts, num_experts_per_tok=2, norm_topk_prob=True,
                            max_position_embeddings=args.block, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for step in range(args.teacher_steps):
        batch = blocks[(step * args.batch) % (len(blocks) - args.batch):][: args.batch]
        loss = model(input_ids=batch, labels=batch, output_router_logits=True).loss  # CE + aux, as it trains
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def evaluate(student, teacher, blocks: torch.Tensor, batch: int) -> dict[str, float]:
    """Full-vocabulary KL(teacher || student) per token and the student's perplexity on `blocks`."""
    student.eval()
    kl = nll = tokens = 0.0
    for i in range(0, len(blocks), batch):
        ids = blocks[i:i + batch]
        logq = torch.log_softmax(student(input_ids=ids).logits.float(), -1)
        logp = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        kl += float((logp.exp() * (logp - logq)).sum())
        nll -= float(logq[:, :-1].gather(-1, ids[:, 1:, None]).sum())
        tokens += ids.numel()
    return {"kl": kl / tokens, "ppl": math.exp(nll / (tokens - len(blocks)))}


def distill(student, teacher, blocks: torch.Tensor, args) -> None:
    """`args.distill_steps` of full-vocabulary KL to the teacher (AdamW, cosine, same data order for every run)."""
    torch.manual_seed(1)
    student.requires_grad_(True).train()  # a copy of the frozen teacher
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.distill_steps)))
    for step in range(args.distill_steps):
        ids = blocks[(step * args.batch) % (len(blocks) - args.batch):][: args.batch]
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        logq = torch.log_softmax(student(input_ids=ids).logits.float(), -1)
        loss = (logp.exp() * (logp - logq)).sum(-1).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    student.eval()


def surgery(variant: str, fraction: float, teacher, calibration: list[dict]):
    model = copy.deepcopy(teacher)
    config = model.config
    if variant == "slim-kd":
        scores = compute_sensitivity(model, calibration, criterion="kd", show_progress=False)
        return prune_to(model, slim_config(config, expert_width=round(config.moe_intermediate_size * fraction)),
                        scores)
    experts = round(config.num_experts * fraction)
    scores = (reap_scores if variant == "drop-reap" else expert_activation_frequency)(
        model, calibration, show_progress=False)
    return drop_experts(model, experts, scores)


def run(args) -> tuple[list[dict], dict]:
    blocks = data(args)
    start = time.perf_counter()
    teacher = build_teacher(args, blocks["train"])
    teacher_seconds = time.perf_counter() - start
    calibration = [{"input_ids": blocks["calibration"][i:i + args.batch]}
                   for i in range(0, len(blocks["calibration"]), args.batch)]
    teacher_eval = evaluate(teacher, teacher, blocks["eval"], args.batch)
    info = {"teacher": teacher, "teacher_ppl": teacher_eval["ppl"], "teacher_seconds": teacher_seconds,
            "train_blocks": len(blocks["train"]), "eval_blocks": len(blocks["eval"])}
    rows = []
    for fraction in args.fractions:
        for variant, label in VARIANTS:
            start = time.perf_counter()
            model = surgery(variant, fraction, teacher, calibration)
            total, active = count_parameters(model.config)
            pruned = evaluate(model, teacher, blocks["eval"], args.batch)
            distill(model, teacher, blocks["train"], args)
            final = evaluate(model, teacher, blocks["eval"], args.batch)
            rows.append({"fraction": fraction, "variant": variant, "label": label, "total": total, "active": active,
                         "pruned": pruned, "final": final, "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    return rows, info


def report(rows: list[dict], info: dict, args, command: str, seconds: float) -> str:
    from hf_slimmoe.utils.outputs import human_count

    teacher = info["teacher"]
    c = teacher.config
    total, active = count_parameters(c)
    lines = [
        "## Expert slimming vs REAP expert dropping at equal total parameters (`benchmarks/bench_reap.py`)",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min in all, {torch.get_num_threads()} torch thread, on a 2-core "
        f"machine shared with other jobs). Teacher: a stock `Qwen3MoeForCausalLM` (byte-level, vocabulary 256; "
        f"{c.num_hidden_layers} layers, {c.num_experts} experts top-{c.num_experts_per_tok}, expert width "
        f"{c.moe_intermediate_size}, hidden {c.hidden_size}, heads {c.num_attention_heads}/{c.num_key_value_heads}; "
        f"{human_count(total)} parameters, {human_count(active)} active) trained {args.teacher_steps} steps of "
        f"{args.batch}x{args.block} tokens on {info['train_blocks']} blocks of standard-library source "
        f"({info['teacher_seconds']:.0f} s); held-out perplexity {info['teacher_ppl']:.2f} on {info['eval_blocks']} "
        f"blocks of {', '.join(EVAL_FILES)}. Calibration: {args.calibration_blocks} training blocks. Distillation: "
        f"{args.distill_steps} steps of full-vocabulary KL to the online teacher, AdamW, learning rate "
        f"{args.learning_rate}, cosine, the same data order for every variant. One seed.",
        "",
        "| expert params kept | variant | total | active | KL, no distillation | ppl, no distillation | "
        "KL, distilled | ppl, distilled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['fraction']:.0%} | {row['label']} | {human_count(row['total'])} | {human_count(row['active'])} | "
            f"{row['pruned']['kl']:.3f} | {row['pruned']['ppl']:.2f} | {row['final']['kl']:.3f} | "
            f"{row['final']['ppl']:.2f} |")
    lines += [
        "",
        "KL is the held-out full-vocabulary KL(teacher ‖ student) per token (lower is better); ppl is the student's "
        f"held-out perplexity (the teacher's: {info['teacher_ppl']:.2f}). Totals differ only by the dropped experts' "
        "router rows; dropping keeps the teacher's active parameters, slimming reduces them by the same factor as "
        "the total expert parameters.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, RESULTS.md untouched")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--calibration-blocks", type=int, default=64)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.distill_steps, args.eval_blocks, args.calibration_blocks = 20, 5, 8, 16
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, info = run(args)
    command = "python benchmarks/bench_reap.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = report(rows, info, args, command.strip(), time.perf_counter() - start)
    print(text)
    if not args.quick:
        write_section("bench_reap", text, path=args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
