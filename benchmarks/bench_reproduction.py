"""Micro-scale reproduction of the SlimMoE paper's ablations on a tiny teacher, on CPU, in one run.

(1) Table 2 / Figure 1(b): multi-stage vs one-stage vs iterative pruning at the same total distillation steps
    (= tokens). Each schedule is a plain `compress()` of the same recipe with only `method:` switched and early
    stopping off (so every schedule spends exactly the budget); the curves are the runs' `trajectory.json`.
(2) Table 3: what to remove from the MoE layers at 50% and 25% of the expert parameters, attention untouched:
    expert slimming with KD scores, slimming with CLM scores, dropping whole experts by KD sensitivity, dropping
    experts by activation frequency (Seer-MoE). Each variant: one-shot surgery on the teacher, then the same
    `DistillationTrainer` run (same steps, data order, cached teacher); only the surgery differs.

Every distillation run uses `--kd-loss` (default: the recipe's, i.e. the library default `sampled`; `topk` is the
paper's Eq. 3), read from a teacher cache made once (samples or top-k; the eval cache is always the top-k).

    python benchmarks/bench_reproduction.py              # the demo's teacher (compression.demo), ~25 min, 1 thread
    python benchmarks/bench_reproduction.py --kd-loss topk   # the same with the paper's top-8 KD loss
    python benchmarks/bench_reproduction.py --quick      # smoke run: one seed, few steps (a few minutes)
    python benchmarks/bench_reproduction.py --recipe recipes/tiny-cpu.yaml --seeds 1

Metrics, all on the held-out eval blocks: `top-8+rest KL` is the pipeline's `eval_kl`, KL(teacher || student) over
the teacher's top-8 tokens plus one "any other token" outcome (>= 0; the top-8 training loss itself goes negative
once the student is sharper than the teacher on the teacher's top-8); `full KL` is KL(teacher || student) over the whole vocabulary, computed by this
script from both models' logits (always >= 0); `ppl` is the student's perplexity on the held-out text.
Seeds change the training data order (the teacher, the calibration data and hence the scores are fixed).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import sys
import time

import torch

try:
    from results import write_section
except ImportError:  # run as a module from the repository root
    from benchmarks.results import write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KD_LOSS_LABELS = {"sampled": "{s} teacher samples per token, unbiased", "topk_tail": "top-{k} + rest of vocabulary",
                  "topk": "top-{k} KD, the paper's Eq. 3"}
SCHEDULES = ("multi-stage", "one-stage", "iterative")
VARIANTS = (("slim-kd", "Slim experts, KD scores (SlimMoE)"), ("slim-clm", "Slim experts, CLM scores"),
            ("drop-kd", "Drop experts, KD sensitivity"), ("drop-freq", "Drop experts, activation frequency"))
logger = logging.getLogger("bench_reproduction")


# ------------------------------------------------------------------------------------------------ setup
def base_recipe(args):
    """The recipe every run derives from, with a local teacher path (built / trained once, then reused)."""
    from hf_slimmoe.compression.recipe import BUILD_TEACHER, load_recipe, recipe_from_dict, recipe_to_dict
    from hf_slimmoe.compression.teacher import build_teacher

    shared = os.path.join(args.output_dir, "shared")
    if args.recipe:
        recipe = load_recipe(args.recipe)
        teacher_path = None
        if recipe.teacher.model == BUILD_TEACHER:
            teacher_path = build_teacher(recipe, os.path.join(shared, "teacher"))
    else:
        from hf_slimmoe.compression.demo import demo_recipe, ensure_teacher

        teacher_path = ensure_teacher(shared, fast=args.quick)
        recipe = demo_recipe(shared, fast=args.quick)
    values = recipe_to_dict(recipe)
    if teacher_path is not None:
        values["teacher"].update(model=os.path.abspath(teacher_path), build=None)
    values["hub"] = {**values.get("hub", {}), "push_to_hub": False}
    if args.kd_loss:
        values["distillation"]["kd_loss"] = args.kd_loss
    args.kd_loss = values["distillation"]["kd_loss"]
    return recipe_from_dict(values, source=recipe.source), recipe_to_dict


def derive(base, to_dict, *, name: str, output_dir: str, seed: int, method: str, steps: list[int], args):
    from hf_slimmoe.compression.recipe import recipe_from_dict

    values = copy.deepcopy(to_dict(base))
    values.update(name=name, output_dir=output_dir, seed=seed, method=method)
    values["stages"]["budget"] = {"steps": list(steps), "tokens": None}
    values["early_stopping"]["enabled"] = False  # every schedule spends exactly its budget
    values["iterative"]["mask_every_steps"] = args.mask_every_steps
    values["training"].update(eval_steps=args.eval_steps, save_steps=args.eval_steps, logging_steps=args.eval_steps,
                              disable_tqdm=True, use_cpu=True)
    if args.learning_rate:
        values["training"]["learning_rate"] = args.learning_rate
    return recipe_from_dict(values, source=base.source)


def shared_data(recipe, args):
    """Teacher, tokenizer, packed blocks and the teacher cache (train: what the loss reads; eval: top-k), once."""
    from transformers import AutoTokenizer

    from hf_slimmoe import SlimMoeForCausalLM, cache_teacher_topk
    from hf_slimmoe.compression.run import cache_train_set
    from hf_slimmoe.compression.sources import load_blocks

    tokenizer = AutoTokenizer.from_pretrained(recipe.teacher.tokenizer or recipe.teacher.model)
    teacher = SlimMoeForCausalLM.from_pretrained(recipe.teacher.model, dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    blocks = load_blocks(recipe, tokenizer)
    cache = os.path.join(args.output_dir, "shared", "teacher_cache")
    k, pad = recipe.distillation.top_k, tokenizer.pad_token_id or 0
    train = cache_train_set(teacher, blocks["train"], recipe.distillation, cache, pad_token_id=pad)
    eval_set = cache_teacher_topk(teacher, blocks["eval"], top_k=k, output_dir=os.path.join(cache, "eval"),
                                  pad_token_id=pad)
    return {"teacher": teacher, "tokenizer": tokenizer, "train": train, "eval": eval_set, "cache": cache,
            "eval_blocks": blocks["eval"],
            "calibration": blocks["calibration"]}


def full_eval(model, teacher, eval_blocks, batch_size: int) -> dict:
    """Full-vocabulary KL(teacher || student) and the student's perplexity on the held-out blocks: the library's
    `evaluate_model` with the teacher online and top-k = the whole vocabulary."""
    from hf_slimmoe.compression.evaluation import evaluate_model

    metrics = evaluate_model(model, eval_blocks, teacher=teacher, top_k=teacher.config.vocab_size,
                             batch_size=batch_size)
    return {"full_kl": metrics["kl"], "ppl": metrics["perplexity"]}


# ------------------------------------------------------------------------------------------------ (1) schedules
def run_schedules(base, to_dict, data, args) -> dict:
    from hf_slimmoe import SlimMoeForCausalLM
    from hf_slimmoe.compression.loop import compress

    results = {m: [] for m in SCHEDULES}
    for seed in range(args.seeds):
        for method in SCHEDULES:
            out = os.path.join(args.output_dir, "schedules", f"{method}-seed{seed}")
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            os.symlink(os.path.abspath(data["cache"]), os.path.join(out, "teacher_cache"))  # same teacher cache
            recipe = derive(base, to_dict, name=f"repro-{method}", output_dir=out, seed=base.seed + seed,
                            method=method, steps=args.stage_steps, args=args)
            start = time.perf_counter()
            compress(recipe)
            seconds = time.perf_counter() - start
            with open(os.path.join(out, "trajectory.json")) as f:
                points = json.load(f)["points"]
            final = f"stage-{len(recipe.stage_configs(data['teacher'].config))}"
            model = SlimMoeForCausalLM.from_pretrained(os.path.join(out, final), dtype=torch.float32)
            row = {"seed": seed, "seconds": seconds, "points": points, "top8_kl": points[-1]["eval_kl"],
                   "num_parameters": model.config.num_parameters(), **full_eval(model, data["teacher"],
                                                                                data["eval_blocks"], args.eval_batch)}
            results[method].append(row)
            logger.info("schedule %s seed %d: %s", method, seed,
                        {k: v for k, v in row.items() if k != "points"})
            if not args.keep_runs:
                shutil.rmtree(out, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------------------ (2) Table 3
def surgery(variant: str, fraction: float, data, recipe, args):
    """The teacher with `fraction` of its expert parameters kept by `variant`, or None when impossible."""
    from hf_slimmoe import SlimMoeForCausalLM, compute_sensitivity
    from hf_slimmoe.pruning import drop_experts, expert_activation_frequency, expert_scores_from_sensitivity
    from hf_slimmoe.utils.data import batches

    model = SlimMoeForCausalLM.from_pretrained(recipe.teacher.model, dtype=torch.float32)
    config = model.config
    calibration = batches(data["calibration"], recipe.scoring.batch_size)
    if variant.startswith("slim"):
        width = round(config.intermediate_size * fraction)
        scores = compute_sensitivity(model, calibration, teacher=None, criterion=variant.split("-")[1],
                                     top_k=recipe.scoring.top_k, show_progress=False)
        return model.prune_to(config.slimmed(intermediate_size=width), scores)
    experts = round(config.num_local_experts * fraction)
    if experts < config.num_experts_per_tok:
        return None  # fewer experts than the router picks per token
    if variant == "drop-kd":
        scores = expert_scores_from_sensitivity(compute_sensitivity(
            model, calibration, teacher=None, criterion="kd", top_k=recipe.scoring.top_k, show_progress=False))
    else:
        scores = expert_activation_frequency(model, calibration, show_progress=False)
    return drop_experts(model, experts, scores)


def distill(model, recipe, data, out: str, steps: int) -> dict:
    """Pruned metrics, then `steps` of KD (the recipe's kd_loss) from the cached teacher, then final metrics."""
    from transformers import set_seed

    from hf_slimmoe import DistillationTrainer
    from hf_slimmoe.compression.plan import training_args

    set_seed(recipe.seed)
    args = training_args(recipe, out, max_steps=steps, early_stopping=False)
    args.save_strategy = args.eval_strategy = "no"  # only the evaluations below
    trainer = DistillationTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"],
                                  processing_class=data["tokenizer"])
    pruned = trainer.evaluate()
    trainer.train()
    final = trainer.evaluate()
    return {"pruned_top8_kl": pruned["eval_kl"], "pruned_ppl": pruned["eval_perplexity"],
            "top8_kl": final["eval_kl"]}


def run_ablations(base, to_dict, data, args) -> dict:
    results = {}
    for fraction in args.expert_fractions:
        for variant, _ in VARIANTS:
            if variant not in args.variants:
                continue
            rows = []
            for seed in range(args.seeds):
                out = os.path.join(args.output_dir, "ablations", f"{variant}-{fraction}-seed{seed}")
                stages = base.planned_num_stages()  # the recipe wants one budget entry per stage; only the sum counts
                steps = [args.ablation_steps // stages] * (stages - 1)
                recipe = derive(base, to_dict, name=f"repro-{variant}", output_dir=out, seed=base.seed + seed,
                                method="one-stage", steps=steps + [args.ablation_steps - sum(steps)], args=args)
                model = surgery(variant, fraction, data, recipe, args)
                if model is None:
                    break
                row = {"seed": seed, "num_parameters": model.config.num_parameters(),
                       "num_active_parameters": model.config.num_active_parameters(),
                       **full_eval(model, data["teacher"], data["eval_blocks"], args.eval_batch)}
                row = {**row, "pruned_full_kl": row.pop("full_kl"), "pruned_ppl": row.pop("ppl")}
                row.update(distill(model, recipe, data, out, args.ablation_steps))
                row.update(full_eval(model, data["teacher"], data["eval_blocks"], args.eval_batch))
                shutil.rmtree(out, ignore_errors=True)
                logger.info("ablation %s @ %s seed %d: %s", variant, fraction, seed, row)
                rows.append(row)
            results[(variant, fraction)] = rows
    return results


# ------------------------------------------------------------------------------------------------ report
def stat(rows: list[dict], key: str, digits: int = 3) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def plot(schedules: dict, ablations: dict, teacher_ppl: float, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if ablations else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0))
    colors = {"multi-stage": "tab:blue", "one-stage": "tab:red", "iterative": "tab:green"}
    for method, rows in schedules.items():
        if not rows:
            continue
        kl_key = "eval_full_kl" if rows[0]["points"][-1].get("eval_full_kl") is not None else "eval_kl"
        for ax, key in ((axes[0], kl_key), (axes[1], "eval_perplexity")):
            # Same points in every seed's run (fixed steps); a stage boundary has two points at one token count:
            # the end of a stage, then the freshly pruned model of the next one (the drop of Figure 1(b)).
            count = min(len(row["points"]) for row in rows)
            xs = [p["tokens"] / 1e3 for p in rows[0]["points"][1:count]]  # [0] is the teacher itself
            values = [[row["points"][i][key] for row in rows] for i in range(1, count)]
            ax.plot(xs, [statistics.mean(v) for v in values], marker=".", color=colors[method], label=method)
            if len(rows) > 1:
                ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=colors[method],
                                alpha=0.15)
    full = any(rows and rows[0]["points"][-1].get("eval_full_kl") is not None for rows in schedules.values())
    label = "full-vocabulary KL" if full else "top-8+rest KL"
    axes[0].set(title=f"(1) held-out {label} to the teacher", xlabel="distillation tokens (K)", ylabel=label)
    axes[1].set(title="(1) held-out perplexity", xlabel="distillation tokens (K)", ylabel="perplexity",
                yscale="log")
    axes[1].axhline(teacher_ppl, color="gray", linestyle="--", label="teacher")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend()
    if ablations:
        ax = axes[2]
        width = 0.8 / len(VARIANTS)
        fractions = list(args.expert_fractions)
        for j, (variant, label) in enumerate(VARIANTS):
            means, errs = [], []
            for fraction in fractions:
                values = [r["full_kl"] for r in ablations.get((variant, fraction), [])]
                means.append(statistics.mean(values) if values else float("nan"))
                errs.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            ax.bar([i + (j - 1.5) * width for i in range(len(fractions))], means, width, yerr=errs, label=label)
        ax.set_xticks(range(len(fractions)), [f"{f:.0%} of expert params" for f in fractions])
        ax.set(title="(2) after distillation: held-out full KL", ylabel="full-vocabulary KL (lower is better)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def report(schedules: dict, ablations: dict, teacher, teacher_ppl: float, base, command: str, seconds: float,
           args, data_eval) -> str:
    from hf_slimmoe.utils.outputs import human_count

    c = teacher.config
    teacher_label = f"`{args.recipe}`" if args.recipe else "the demo's (`hf_slimmoe/recipes/demo.yaml`" + (
        ", `fast` variant)" if args.quick else ")")
    per_step = base.tokens_per_step()
    budget = sum(args.stage_steps)
    lines = [
        f"## Micro-scale reproduction of the paper's Table 2 / Figure 1(b) and Table 3, kd_loss `{args.kd_loss}`",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min, {args.threads} torch thread(s), on a 2-core machine shared with other jobs). Teacher: "
        f"{teacher_label} — {human_count(c.num_parameters())} parameters, "
        f"{c.num_hidden_layers} layers, {c.num_local_experts} experts (top-{c.num_experts_per_tok}), d_expert "
        f"{c.intermediate_size}, heads {c.num_attention_heads}/{c.num_key_value_heads}, vocabulary {c.vocab_size}; "
        f"held-out perplexity {teacher_ppl:.2f}. Held-out data: {len(data_eval)} blocks of {base.data.block_size} "
        f"tokens the teacher never trained on. Every distillation run: **kd_loss `{base.distillation.kd_loss}`** "
        f"({KD_LOSS_LABELS[base.distillation.kd_loss].format(k=base.distillation.top_k, s=base.distillation.kd_samples)})"
        f" from the cached teacher (+ {base.distillation.aux_loss_coef} x aux loss), AdamW, peak learning rate "
        f"{args.learning_rate or base.training.get('learning_rate')}, cosine with "
        f"{base.training.get('warmup_steps', 0)} warmup steps (restarted per stage), {per_step} tokens per step. "
        f"Seeds: {args.seeds} (data order; the teacher, the calibration data and so the scores are fixed).",
        "",
        "Metrics on the held-out blocks: **top-8+rest KL** = `eval_kl`, KL(teacher ‖ student) over the teacher's "
        "top-8 tokens plus one 'any other token' outcome (>= 0; the top-8 training loss itself goes negative once "
        "the student is sharper than the teacher on the teacher's top-8); **full KL** = KL(teacher ‖ student) over the whole vocabulary, computed by the "
        "benchmark from both models' logits (>= 0); **ppl** = the student's perplexity. Mean ± standard deviation "
        "over seeds.",
        "",
        f"### (1) One-stage vs multi-stage vs iterative, same budget ({budget} steps = "
        f"{human_count(budget * per_step)} tokens)",
        "",
        f"Target: the recipe's final stage size; multi-stage spends {args.stage_steps} steps on its stages, "
        f"one-stage prunes straight to the target and distills {budget} steps, iterative distills the full model "
        f"for {budget} steps while masks (re-scored every {args.mask_every_steps} steps) reach the target after "
        f"{sum(args.stage_steps[:-1])} steps. Early stopping off, evaluation every {args.eval_steps} steps.",
        "",
        "| schedule | params | top-8+rest KL | full KL | ppl | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    if schedules.get("one-stage"):
        pruned = [{"top8_kl": r["points"][1]["eval_kl"], "ppl": r["points"][1]["eval_perplexity"]}
                  for r in schedules["one-stage"]]  # [1]: the freshly pruned model, before any distillation
        lines.append(f"| target size, one-shot pruned, no distillation | "
                     f"{human_count(schedules['one-stage'][0]['num_parameters'])} | {stat(pruned, 'top8_kl')} | n/a | "
                     f"{stat(pruned, 'ppl', 2)} | |")
    for method, rows in schedules.items():
        if rows:
            lines.append(f"| {method} | {human_count(rows[0]['num_parameters'])} | {stat(rows, 'top8_kl')} | "
                         f"{stat(rows, 'full_kl')} | {stat(rows, 'ppl', 2)} | {stat(rows, 'seconds', 0)} |")
    if ablations:
        lines += [
            "",
            f"### (2) What to remove from the MoE layers ({args.ablation_steps} distillation steps = "
            f"{human_count(args.ablation_steps * per_step)} tokens each)",
            "",
            "One-shot surgery on the teacher's experts only (attention untouched), then the same distillation run. "
            "Slimming keeps every expert at a fraction of its width (scores: KD = top-8 KD + aux sensitivity, CLM "
            "= next-token loss sensitivity); dropping keeps that fraction of whole experts per layer, ranked by the "
            "l2 norm of their KD sensitivity or by how often the router picks them on the calibration data. "
            "'n/a': fewer experts than the router's top-k.",
            "",
            "| expert params | method | params (total / active) | after pruning: full KL | ppl | "
            "after distillation: top-8+rest KL | full KL | ppl |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for fraction in args.expert_fractions:
            for variant, label in VARIANTS:
                rows = ablations.get((variant, fraction), [])
                if not rows:
                    lines.append(f"| {fraction:.0%} | {label} | n/a | | | | | |")
                    continue
                lines.append(
                    f"| {fraction:.0%} | {label} | {human_count(rows[0]['num_parameters'])} / "
                    f"{human_count(rows[0]['num_active_parameters'])} | {stat(rows, 'pruned_full_kl')} | "
                    f"{stat(rows, 'pruned_ppl', 1)} | {stat(rows, 'top8_kl')} | {stat(rows, 'full_kl')} | "
                    f"{stat(rows, 'ppl', 2)} |")
    lines += ["", f"![held-out KL over training tokens; Table-3 ablations]({os.path.relpath(args.plot, ROOT)})"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None,
                        help="a compress recipe to take the teacher and data from (default: the demo's, "
                             "hf_slimmoe.compression.demo.demo_recipe / ensure_teacher)")
    parser.add_argument("--kd-loss", choices=["sampled", "topk_tail", "topk"], default=None,
                        help="distillation loss of every run (default: the recipe's, `sampled`); each loss writes its "
                             "own RESULTS.md section and plot")
    parser.add_argument("--output-dir", default=None, help="default: outputs/bench-reproduction-<kd-loss>")
    parser.add_argument("--seeds", type=int, default=3, help="runs per setting (seed = recipe seed + i)")
    parser.add_argument("--stage-steps", type=int, nargs="+", default=[100, 150],
                        help="(1) multi-stage steps per stage; one-stage and iterative get their sum")
    parser.add_argument("--mask-every-steps", type=int, default=10, help="(1) iterative: re-score every N steps")
    parser.add_argument("--eval-steps", type=int, default=25, help="(1) evaluate every N steps")
    parser.add_argument("--ablation-steps", type=int, default=100, help="(2) distillation steps per variant")
    parser.add_argument("--expert-fractions", type=float, nargs="+", default=[0.5, 0.25],
                        help="(2) fraction of expert parameters kept")
    parser.add_argument("--variants", nargs="+", default=[v for v, _ in VARIANTS], choices=[v for v, _ in VARIANTS],
                        help="(2) which Table-3 variants to run")
    parser.add_argument("--learning-rate", type=float, default=1e-4,
                        help="peak learning rate of every distillation run (the paper's; with the demo recipe's 2e-3, "
                             "and still with 3e-4, distillation left the pruned models worse than before it at these "
                             "budgets); 0: the recipe's")
    parser.add_argument("--eval-batch", type=int, default=16, help="batch size of the full-KL evaluation")
    parser.add_argument("--only", choices=["schedules", "ablations"], default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: no oversubscription when another job shares the cores)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the schedule runs' directories")
    parser.add_argument("--plot", default=None, help="default: benchmarks/reproduction-<kd-loss>.png")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, --stage-steps 10 10, --ablation-steps 10, --eval-steps 10, "
                             "fraction 0.5; writes nothing unless --write")
    parser.add_argument("--write", action="store_true", help="with --quick: write RESULTS.md and the plot anyway")
    parser.add_argument("--from-results", default=None, metavar="RESULTS_JSON",
                        help="no training: write the report and plot again from a finished run's results.json")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md / the plot")
    args = parser.parse_args()
    loss_name = args.kd_loss or "sampled"  # the recipes' default; checked against the recipe below
    args.output_dir = args.output_dir or f"outputs/bench-reproduction-{loss_name}"
    args.plot = args.plot or os.path.join(ROOT, "benchmarks", f"reproduction-{loss_name}.png")
    if args.quick:
        args.seeds, args.stage_steps, args.ablation_steps, args.eval_steps = 1, [10, 10], 10, 10
        args.expert_fractions = [0.5]
        args.output_dir = args.output_dir.rstrip("/") + "-quick"
        args.no_write = args.no_write or not args.write
    command = " ".join(["python benchmarks/bench_reproduction.py", *sys.argv[1:]])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("hf_slimmoe", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)

    start = time.perf_counter()
    saved = None
    if args.from_results:  # report again from a finished run's results.json (its settings), no training
        with open(args.from_results) as f:
            saved = json.load(f)
        command = saved["command"].strip()
        for key, value in saved.get("args", {}).items():
            if key not in ("from_results", "no_write", "plot"):
                setattr(args, key, value)
    base, to_dict = base_recipe(args)
    if args.kd_loss != loss_name:
        raise SystemExit(f"The recipe's kd_loss is {args.kd_loss}: pass --kd-loss {args.kd_loss} explicitly.")
    data = shared_data(base, args)
    teacher_ppl = full_eval(data["teacher"], data["teacher"], data["eval_blocks"], args.eval_batch)["ppl"]
    if saved is not None:
        schedules, seconds = saved["schedules"], saved["seconds"]
        ablations = {(k.rsplit("@", 1)[0], float(k.rsplit("@", 1)[1])): rows for k, rows in saved["ablations"].items()}
    else:
        schedules = run_schedules(base, to_dict, data, args) if args.only != "ablations" else {}
        ablations = run_ablations(base, to_dict, data, args) if args.only != "schedules" else {}
        seconds = time.perf_counter() - start
    markdown = report(schedules, ablations, data["teacher"], teacher_ppl, base, command, seconds, args,
                      data["eval_blocks"])
    print(markdown)
    with open(args.from_results or os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"schedules": schedules, "ablations": {f"{v}@{fr}": rows for (v, fr), rows in ablations.items()},
                   "seconds": seconds, "command": command, "args": vars(args)}, f, indent=1)
    if not args.no_write:
        plot(schedules, ablations, teacher_ppl, args)
        write_section(f"bench_reproduction-{args.kd_loss}", markdown)


if __name__ == "__main__":
    main()
