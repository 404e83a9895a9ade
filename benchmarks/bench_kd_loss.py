"""Choosing the distillation loss: every `kd_loss` on the same pruned student, at equal steps, in one run.

The demo's teacher (`hf_slimmoe.compression.demo`) is pruned to 25% of its expert width with KD sensitivity scores
(attention untouched), then distilled for the same number of steps (same data order, optimizer and schedule) with
each loss:

- `topk`: the paper's Eq. 3 on the teacher's top-8 (cached), and `topk renormalized` (its ablation);
- `topk_tail`: top-8 + one "rest of the vocabulary" outcome (cached top-8);
- `sampled S=8` / `16` / `24` / `32`: teacher samples per token (cached, `cache_teacher_samples`);
- `full`: the full-vocabulary KL with the teacher online (the reference).

Reported on the held-out blocks: full-vocabulary KL(teacher || student) (the quality measure: what distillation is
meant to minimize), the top-8 + rest KL, perplexity; the cache's on-disk size per token (Arrow bytes of the cache
columns / tokens) and the median time of a training step (cached losses: no teacher forward; `full`: with it).
Quality ratios are against `full` in the same run.

    python benchmarks/bench_kd_loss.py            # writes the "bench_kd_loss" section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import write_section  # noqa: E402

LOSSES = (  # name, kd_loss, DistillationConfig overrides, cache
    ("topk", "topk", {}, "topk"),
    ("topk renormalized", "topk", {"renormalize": True}, "topk"),
    ("topk_tail", "topk_tail", {}, "topk"),
    ("sampled S=8", "sampled", {"kd_samples": 8}, "samples-8"),
    ("sampled S=16", "sampled", {"kd_samples": 16}, "samples-16"),
    ("sampled S=24", "sampled", {"kd_samples": 24}, "samples-24"),
    ("sampled S=32", "sampled", {"kd_samples": 32}, "samples-32"),
    ("full (online)", "full", {}, None),
)
SAMPLE_COUNTS = (8, 16, 24, 32)
logger = logging.getLogger("bench_kd_loss")


def arrow_bytes_per_token(dataset, columns: list[str]) -> float:
    """In-memory Arrow bytes of `columns` (what `save_to_disk` writes, uncompressed) per token of `input_ids`."""
    table = dataset.with_format("arrow")[:]
    tokens = sum(len(row) for row in dataset["input_ids"])
    return sum(table.column(c).nbytes for c in columns) / tokens


def disk_bytes_per_token(directory: str, dataset) -> float:
    """On-disk bytes of a saved cache (all Arrow files, `input_ids` included) per token."""
    size = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".arrow"))
    return size / sum(len(row) for row in dataset["input_ids"])


def setup(args):
    from transformers import AutoTokenizer

    from hf_slimmoe import SlimMoeForCausalLM, cache_teacher_samples, cache_teacher_topk, compute_sensitivity
    from hf_slimmoe.compression.demo import demo_recipe, ensure_teacher
    from hf_slimmoe.compression.sources import load_blocks
    from hf_slimmoe.utils.data import batches

    shared = os.path.join(args.output_dir, "shared")
    teacher_dir = ensure_teacher(shared)
    recipe = demo_recipe(shared)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = SlimMoeForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval().requires_grad_(False)
    blocks = load_blocks(recipe, tokenizer)
    if args.train_blocks:  # the first blocks only (enough for the steps: every cached draw is then used once)
        blocks["train"] = blocks["train"].select(range(min(args.train_blocks, len(blocks["train"]))))
    cache = os.path.join(shared, "teacher_cache")
    pad = tokenizer.pad_token_id or 0
    caches = {"topk": cache_teacher_topk(teacher, blocks["train"], top_k=8, pad_token_id=pad,
                                         output_dir=os.path.join(cache, "train-topk8"))}
    for s in SAMPLE_COUNTS:
        caches[f"samples-{s}"] = cache_teacher_samples(teacher, blocks["train"], num_samples=s, pad_token_id=pad,
                                                       output_dir=os.path.join(cache, f"train-samples{s}"))
    eval_set = cache_teacher_topk(teacher, blocks["eval"], top_k=8, pad_token_id=pad,
                                  output_dir=os.path.join(cache, "eval-topk8"))
    columns = {"topk": ["teacher_topk_ids", "teacher_topk_logprobs"]}
    fingerprint = {"topk": "teacher_topk_fingerprint"}
    directories = {"topk": "train-topk8"}
    for s in SAMPLE_COUNTS:
        ids_column = "teacher_sample_packed" if "teacher_sample_packed" in caches[f"samples-{s}"].column_names \
            else "teacher_sample_ids"  # a cache made before ids were packed, reused from an earlier run
        columns[f"samples-{s}"], fingerprint[f"samples-{s}"] = [ids_column], "teacher_sample_fingerprint"
        directories[f"samples-{s}"] = f"train-samples{s}"
    sizes = {name: {"values": arrow_bytes_per_token(caches[name], columns[name]),
                    "columns": arrow_bytes_per_token(caches[name], columns[name] + [fingerprint[name]]),
                    "disk": disk_bytes_per_token(os.path.join(cache, directories[name]), blocks["train"])}
             for name in columns}
    sizes["input_ids"] = arrow_bytes_per_token(blocks["train"], ["input_ids"])
    scores = compute_sensitivity(teacher, batches(blocks["calibration"], recipe.scoring.batch_size, pad),
                                 teacher=None, criterion="kd", top_k=8, show_progress=False)
    width = round(teacher.config.intermediate_size * args.expert_fraction)
    pruned_config = teacher.config.slimmed(intermediate_size=width)
    return {"recipe": recipe, "tokenizer": tokenizer, "teacher": teacher, "caches": caches, "eval": eval_set,
            "train_rows": len(blocks["train"]), "sizes": sizes, "scores": scores, "pruned_config": pruned_config,
            "teacher_dir": teacher_dir}


def pruned_student(data):
    from hf_slimmoe import SlimMoeForCausalLM

    model = SlimMoeForCausalLM.from_pretrained(data["teacher_dir"], dtype=torch.float32)
    return model.prune_to(data["pruned_config"], data["scores"])


def evaluate(model, data, args) -> dict:
    from hf_slimmoe.compression.evaluation import evaluate_model

    m = evaluate_model(model, data["eval"], teacher=data["teacher"], top_k=8, batch_size=args.eval_batch)
    return {"full_kl": m["full_kl"], "tail_kl": m["kl"], "ppl": m["perplexity"]}


class _StepTimer:
    """Trainer callback: wall time of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                timer.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                timer.times.append(time.perf_counter() - timer.start)

        self.times, self.start, self.callback = [], 0.0, Callback()


def run_loss(name, kd_loss, overrides, cache, seed, data, args) -> dict:
    from transformers import PrinterCallback, set_seed

    from hf_slimmoe import DistillationConfig, DistillationTrainer

    set_seed(seed)
    model = pruned_student(data)
    training = data["recipe"].training
    config = DistillationConfig(
        output_dir=os.path.join(args.output_dir, "runs", name.replace(" ", "-")), max_steps=args.steps, seed=seed,
        per_device_train_batch_size=training["per_device_train_batch_size"], learning_rate=args.learning_rate,
        weight_decay=training.get("weight_decay", 0.0), lr_scheduler_type="cosine", warmup_steps=args.warmup_steps,
        kd_loss=kd_loss, aux_loss_coef=data["recipe"].distillation.aux_loss_coef, top_k=8, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=args.steps,
        eval_full_kl=False, **overrides)
    timer = _StepTimer()
    trainer = DistillationTrainer(
        model=model, teacher_model=data["teacher"] if cache is None else None, args=config,
        train_dataset=data["caches"][cache] if cache else data["caches"]["topk"].select_columns(["input_ids"]),
        processing_class=data["tokenizer"], callbacks=[timer.callback])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    row = {"loss": name, "seed": seed, "step_seconds": statistics.median(timer.times[1:] or timer.times)}
    row.update(evaluate(trainer.model, data, args))
    logger.info("%s seed %d: %s", name, seed, row)
    return row


def report(rows, pruned, data, args, seconds) -> str:
    c, p = data["teacher"].config, data["pruned_config"]
    by_loss = {name: [r for r in rows if r["loss"] == name] for name, *_ in LOSSES}
    mean = {name: {k: statistics.mean(r[k] for r in rs) for k in ("full_kl", "tail_kl", "ppl", "step_seconds")}
            for name, rs in by_loss.items() if rs}
    ref = mean["full (online)"]
    size_of = data["sizes"]
    epochs = args.steps * data["recipe"].training["per_device_train_batch_size"] / data["train_rows"]
    lines = [
        "## Choosing the distillation loss",
        "",
        f"`{args.command}` ({seconds / 60:.1f} min, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU, on a 2-core machine shared with other jobs). Teacher: the demo's "
        f"({c.num_parameters() / 1e6:.2f}M parameters, vocabulary {c.vocab_size}); student: the teacher with "
        f"{args.expert_fraction:.0%} of its expert width kept by KD sensitivity (d_expert {c.intermediate_size} -> "
        f"{p.intermediate_size}, attention untouched). Each loss: {args.steps} steps of "
        f"{data['recipe'].training['per_device_train_batch_size']} x {data['recipe'].data.block_size} tokens "
        f"({epochs:.2f} epochs of the {data['train_rows']} train blocks), AdamW lr {args.learning_rate}, cosine, "
        f"{args.warmup_steps} warmup steps, aux loss {data['recipe'].distillation.aux_loss_coef}; the same data "
        f"order; seeds {args.seeds}. Held-out: {len(data['eval'])} blocks the teacher never trained on.",
        "",
        f"Right after pruning: full KL **{pruned['full_kl']:.3f}**, top-8 + rest KL {pruned['tail_kl']:.3f}, "
        f"perplexity {pruned['ppl']:.2f} (teacher: {data['teacher_ppl']:.2f}).",
        "",
        "| loss | held-out full KL | vs full | top-8 + rest KL | perplexity | cache bytes / token | step time (ms) "
        "| vs full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, kd_loss, _, cache in LOSSES:
        if name not in mean:
            continue
        m = mean[name]
        size = f"{size_of[cache]['columns']:.1f}" if cache else "online"
        spread = ""
        if len(by_loss[name]) > 1:
            spread = f" ± {statistics.stdev(r['full_kl'] for r in by_loss[name]):.3f}"
        lines.append(f"| `{kd_loss}`{' renormalized' if 'renorm' in name else ''}"
                     f"{' S=' + name.split('=')[1] if 'S=' in name else ''} | {m['full_kl']:.3f}{spread} | "
                     f"{m['full_kl'] / ref['full_kl']:.2f} | {m['tail_kl']:.3f} | {m['ppl']:.2f} | {size} | "
                     f"{m['step_seconds'] * 1e3:,.0f} | {m['step_seconds'] / ref['step_seconds']:.2f} |")
    s8 = mean.get("sampled S=8")
    goal = s8 is not None and s8["full_kl"] <= 1.1 * ref["full_kl"]
    bytes_goal = data["sizes"]["samples-8"]["values"] <= 16.0 + 4.0 / data["recipe"].data.block_size
    lines += [
        "",
        f"Cache bytes / token: the teacher columns' Arrow bytes (what `save_to_disk` writes for them: the values, "
        f"their per-row offsets and the row fingerprint) over the train tokens. The values alone (ids, + log-probs "
        f"for top-8): top-8 {data['sizes']['topk']['values']:.2f}, samples S=8 {data['sizes']['samples-8']['values']:.2f}"
        f", S=16 {data['sizes']['samples-16']['values']:.2f} B/token (a row's offset and fingerprint cost "
        f"{24 / data['recipe'].data.block_size:.2f} B/token at {data['recipe'].data.block_size}-token rows). The whole "
        f"saved dataset on disk, `input_ids` ({data['sizes']['input_ids']:.1f} B/token) included: top-8 "
        f"{data['sizes']['topk']['disk']:.1f}, samples S=8 {data['sizes']['samples-8']['disk']:.1f}, S=16 "
        f"{data['sizes']['samples-16']['disk']:.1f} B/token.",
        "",
        f"Goals: sampled S=8 within 10% of the full-KL quality: **{'met' if goal else 'not met'}** "
        f"({s8['full_kl'] / ref['full_kl']:.2f}x); sampled S=8 at <= 16 bytes/token of samples (8 ids of ceil(log2 V) "
        f"bits, plus the row's list offset): **{'met' if bytes_goal else 'not met'}** ({data['sizes']['samples-8']['values']:.2f})."
        if s8 else "",
    ]
    within = [(name, cache) for name, kd_loss, _, cache in LOSSES
              if kd_loss == "sampled" and name in mean and mean[name]["full_kl"] <= 1.1 * ref["full_kl"]]
    if within:
        name, cache = within[0]
        lines += ["", f"Fewest samples within 10% of `full` on this setting: {name.split()[-1]} "
                  f"({size_of[cache]['values']:.2f} B/token of samples)."]
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser, seeds: int) -> None:
    """The run's options shared with `bench_sample_schemes.py` (same teacher, data, steps and optimizer)."""
    parser.add_argument("--output-dir", default="outputs/bench-kd-loss")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--train-blocks", type=int, default=None,
                        help="cache and train on the first N train blocks (default: all)")
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")


def start_run(args, script: str) -> None:
    """Record the command line, quiet the libraries' logs and set the thread count."""
    args.command = " ".join([f"python benchmarks/{script}", *sys.argv[1:]])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("hf_slimmoe", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, seeds=1)
    parser.add_argument("--expert-fraction", type=float, default=0.25)
    parser.add_argument("--losses", nargs="+", default=[name for name, *_ in LOSSES])
    args = parser.parse_args()
    start_run(args, "bench_kd_loss.py")
    start = time.perf_counter()
    data = setup(args)
    data["teacher_ppl"] = evaluate(data["teacher"], data, args)["ppl"]
    pruned = evaluate(pruned_student(data), data, args)
    logger.info("pruned: %s", pruned)
    rows = []
    for seed in range(args.seeds):
        for name, kd_loss, overrides, cache in LOSSES:
            if name in args.losses:
                rows.append(run_loss(name, kd_loss, overrides, cache, seed, data, args))
    markdown = report(rows, pruned, data, args, time.perf_counter() - start)
    print(markdown)
    if not args.no_write:
        write_section("bench_kd_loss", markdown)


if __name__ == "__main__":
    main()
