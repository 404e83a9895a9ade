"""When does multi-stage beat one-stage? A budget sweep on the demo teacher (issue 22).

At each total budget (default 250, 1,000 and 4,000 optimizer steps: 16x), the same target is reached by:

    one-stage                 prune straight to the target, distill the whole budget
    two-stage                 the recipe's two stages, 34% of the budget before the last (the paper's split), the
                              learning-rate schedule restarted (warmup + cosine) in each stage
    two-stage, one schedule   the same with `stages.lr_schedule: continue` (one warmup + cosine over both stages)
    two-stage, 50% split      half of the budget before the last stage
    two-stage, plateau rule   the paper's split with early stopping on the eval KL in the first stage (the recipe's
                              patience and min_delta); the steps it saves are not spent elsewhere
    three-stage               17% + 17% + 66%, restarted schedules (at budgets up to --three-stage-max)

Every run is a plain `compress()` of the demo recipe with only those fields changed, reading one teacher cache
(the recipe's `kd_loss`), evaluated 20 times over its budget (the trajectory: full-vocabulary KL with the teacher
online, and perplexity, over tokens) and once more at the end (full KL and perplexity of the saved last stage). Runs are
done smallest budget first and written to OUTPUT_DIR/results.json as they finish, so an interrupted sweep keeps what
it measured (`--from-results` reports it).

    python benchmarks/bench_budget_sweep.py                          # ~2 h on 1 thread
    python benchmarks/bench_budget_sweep.py --budgets 20 40 --quick  # smoke run (a few minutes)
    python benchmarks/bench_budget_sweep.py --from-results outputs/bench-budget-sweep/results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time

import torch
from bench_reproduction import base_recipe, full_eval, shared_data
from results import write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (method, number of stages, fraction of the budget in each stage, recipe overrides)
SCHEDULES = {
    "one-stage": ("one-stage", 2, (0.34, 0.66), {}),
    "two-stage": ("multi-stage", 2, (0.34, 0.66), {}),
    "two-stage, one schedule": ("multi-stage", 2, (0.34, 0.66), {"stages": {"lr_schedule": "continue"}}),
    "two-stage, 50% split": ("multi-stage", 2, (0.5, 0.5), {}),
    "two-stage, plateau rule": ("multi-stage", 2, (0.34, 0.66), {"early_stopping": {"enabled": True}}),
    "three-stage": ("multi-stage", 3, (0.17, 0.17, 0.66), {"stages": {"num_stages": 3}}),
}
logger = logging.getLogger("bench_budget_sweep")


def split(budget: int, fractions: tuple[float, ...]) -> list[int]:
    steps = [max(1, round(budget * f)) for f in fractions[:-1]]
    return steps + [budget - sum(steps)]


def sweep_recipe(base, to_dict, name: str, budget: int, output_dir: str, args):
    from hf_slimmoe.compression.recipe import recipe_from_dict

    method, _, fractions, overrides = SCHEDULES[name]
    values = to_dict(base)
    values.update(name="sweep", output_dir=output_dir, method=method)
    values["stages"]["budget"] = {"steps": split(budget, fractions), "tokens": None}
    values["early_stopping"]["enabled"] = False  # every schedule spends its budget, except the plateau rule's
    eval_steps = max(1, budget // 20)
    values["training"].update(learning_rate=args.learning_rate, eval_steps=eval_steps, save_steps=eval_steps,
                              logging_steps=eval_steps, disable_tqdm=True, use_cpu=True)
    for section, fields in overrides.items():
        values[section].update(fields)
    return recipe_from_dict(values, source=base.source)


def run_one(base, to_dict, data, name: str, budget: int, args) -> dict:
    from hf_slimmoe import SlimMoeForCausalLM
    from hf_slimmoe.compression.loop import compress

    out = os.path.join(args.output_dir, "runs", f"{budget}-{name.replace(' ', '').replace(',', '-')}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    os.symlink(os.path.abspath(data["cache"]), os.path.join(out, "teacher_cache"))  # one teacher cache for all
    recipe = sweep_recipe(base, to_dict, name, budget, out, args)
    start = time.perf_counter()
    compress(recipe)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "trajectory.json")) as f:
        points = json.load(f)["points"]
    stages = []
    for i in range(1, SCHEDULES[name][1] + 1):
        if os.path.isdir(os.path.join(out, f"stage-{i}")):
            with open(os.path.join(out, f"stage-{i}", "stage.json")) as f:
                training = json.load(f)["training"]
            stages.append({"dir": os.path.join(out, f"stage-{i}"), "steps": training["steps"],
                           "early_stopped": training["early_stopped"]})
    model = SlimMoeForCausalLM.from_pretrained(stages[-1]["dir"], dtype=torch.float32)
    row = {"schedule": name, "budget": budget, "steps": sum(s["steps"] for s in stages), "seconds": seconds,
           "points": points, "stages": [{k: s[k] for k in ("steps", "early_stopped")} for s in stages],
           **full_eval(model, data["teacher"], data["eval_blocks"], args.eval_batch)}
    shutil.rmtree(out, ignore_errors=True)
    return row


# ------------------------------------------------------------------------------------------------ report
def report(rows: list[dict], base, command: str, seconds: float, teacher_ppl: float, args) -> str:
    from hf_slimmoe.utils.outputs import human_count

    per_step = base.tokens_per_step()
    budgets = sorted({r["budget"] for r in rows})
    names = [n for n in SCHEDULES if any(r["schedule"] == n for r in rows)]
    cell = {(r["schedule"], r["budget"]): r for r in rows}
    lines = [
        "## Budget sweep: when does multi-stage beat one-stage? (issue 22)",
        "",
        f"Command: `{command}` ({seconds / 60:.0f} min, {args.threads} torch thread(s); {args.load_note}). "
        "Teacher: the demo's (`hf_slimmoe/recipes/demo.yaml`), "
        f"held-out perplexity {teacher_ppl:.2f}; target: d_expert 64 (25%), KV heads 2 of 4; "
        f"**kd_loss `{base.distillation.kd_loss}`** from the cached teacher, AdamW, peak learning rate "
        f"{args.learning_rate}, cosine with {base.training.get('warmup_steps', 0)} warmup steps, {per_step} tokens "
        "per step, one seed. Full KL = KL(teacher ‖ student) over the whole vocabulary on the 256 held-out blocks "
        "(lower is better); ppl = the student's held-out perplexity. Schedules: see the script's docstring.",
        "",
        "| schedule | " + " | ".join(f"{b:,} steps ({human_count(b * per_step)} tokens): full KL / ppl"
                                     for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for name in names:
        cells = []
        for b in budgets:
            r = cell.get((name, b))
            note = f" ({r['steps']} steps run)" if r is not None and r["steps"] != b else ""
            cells.append("not run" if r is None else f"{r['full_kl']:.4f} / {r['ppl']:.2f}{note}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Multi-stage against one-stage (full KL ratio, < 1: multi-stage better):", ""]
    for b in budgets:
        one = cell.get(("one-stage", b))
        if one is None:
            continue
        ratios = [f"{n} {cell[(n, b)]['full_kl'] / one['full_kl']:.3f}" for n in names
                  if n != "one-stage" and (n, b) in cell]
        lines.append(f"- {b:,} steps: " + ", ".join(ratios))
    lines += ["", f"![held-out full KL over training tokens]({os.path.relpath(args.plot, ROOT)})"]
    return "\n".join(lines)


def write_sweep_data(rows: list[dict], base, teacher, command: str) -> None:
    """The measured figures `slimmoe plan` cites (`hf_slimmoe.compression.plan.budget_note`), in the package's
    recipes/."""
    from hf_slimmoe.architectures import count_parameters
    from hf_slimmoe.compression.plan import BUDGET_SWEEP
    from hf_slimmoe.utils.outputs import human_count

    total, per_step = count_parameters(teacher.config)[0], base.tokens_per_step()
    data = {"command": command, "teacher": f"the demo teacher ({human_count(total)} parameters)",
            "teacher_parameters": total, "tokens_per_step": per_step,
            "budgets": [{"steps": b, "tokens": b * per_step, "tokens_per_parameter": b * per_step / total,
                         "full_kl": {r["schedule"]: round(r["full_kl"], 4) for r in rows if r["budget"] == b}}
                        for b in sorted({r["budget"] for r in rows})]}
    with open(os.path.join(ROOT, "hf_slimmoe", "recipes", BUDGET_SWEEP), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def plot(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.0 * len(budgets), 4.0), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for r in (r for r in rows if r["budget"] == b):
            points = r["points"][1:]  # [0] is the teacher itself
            ax.plot([p["tokens"] / 1e6 for p in points], [p["eval_full_kl"] for p in points], marker=".",
                    markersize=3, label=r["schedule"])
        ax.set(title=f"{b:,} steps", xlabel="distillation tokens (M)", ylabel="held-out full KL", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[250, 1000, 4000], help="total optimizer steps")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES), metavar="NAME",
                        help=f"which schedules to run (default: all of {list(SCHEDULES)})")
    parser.add_argument("--three-stage-max", type=int, default=1000, help="run three-stage up to this budget")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (as bench_reproduction)")
    parser.add_argument("--kd-loss", choices=["sampled", "topk_tail", "topk"], default=None,
                        help="default: the recipe's")
    parser.add_argument("--output-dir", default="outputs/bench-budget-sweep")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--load-note", default="alone on the machine",
                        help="what else ran on the machine, written beside the duration")
    parser.add_argument("--plot", default=os.path.join(ROOT, "benchmarks", "budget-sweep.png"))
    parser.add_argument("--quick", action="store_true", help="the demo's --fast teacher; writes nothing")
    parser.add_argument("--from-results", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="no training: report the rows of one or more runs' results.json (e.g. a sweep split over "
                             "two processes with --schedules / --budgets) together")
    args = parser.parse_args()
    args.recipe = None
    command = shlex.join(["python", "benchmarks/bench_budget_sweep.py", *sys.argv[1:]])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("hf_slimmoe", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.json")

    start = time.perf_counter()
    base, to_dict = base_recipe(args)
    data = shared_data(base, args)
    teacher_ppl = full_eval(data["teacher"], data["teacher"], data["eval_blocks"], args.eval_batch)["ppl"]
    if args.from_results:
        rows, seconds, commands, notes = [], 0.0, [], []
        for path in args.from_results:
            with open(path) as f:
                saved = json.load(f)
            rows, seconds = rows + saved["rows"], max(seconds, saved["seconds"])
            commands.append(saved["command"])
            notes.append(saved.get("load_note", ""))
        command, args.load_note = "` and `".join(commands), "; ".join(dict.fromkeys(notes))
    else:
        rows = []
        for budget in sorted(args.budgets):
            for name in args.schedules:
                if SCHEDULES[name][1] == 3 and budget > args.three_stage_max:
                    continue
                rows.append(run_one(base, to_dict, data, name, budget, args))
                row = rows[-1]
                logger.info("%s @ %d: full KL %.4f, ppl %.2f, %d steps, %.0f s", name, budget, row["full_kl"],
                            row["ppl"], row["steps"], row["seconds"])
                seconds = time.perf_counter() - start
                note = f"load average {os.getloadavg()[0]:.2f} when it ended, {args.load_note}"
                with open(results_path, "w") as f:
                    json.dump({"rows": rows, "seconds": seconds, "command": command, "load_note": note}, f, indent=1)
        args.load_note = note
    markdown = report(rows, base, command, seconds, teacher_ppl, args)
    print(markdown)
    if not args.quick:
        plot(rows, args)
        write_section("bench_budget_sweep", markdown)
        write_sweep_data(rows, base, data["teacher"], command)


if __name__ == "__main__":
    main()
