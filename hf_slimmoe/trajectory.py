"""The compression trajectory: one point per evaluation of the run, from the teacher (stage 0) to the last stage.

A point records where the run is (stage, cumulative training tokens and optimizer steps), the model's size (total
and active parameters) and its held-out metrics against the teacher. The pipeline writes the points to
`OUTPUT_DIR/trajectory.json` after every evaluation (`TrajectoryLogger`) and into each stage directory, where
`plot_trajectory` draws them for the model card.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

METRICS = ("eval_kl", "eval_topk_kl", "eval_full_kl", "eval_perplexity", "eval_top1_agreement")


def point(stage: int, tokens: int, step: int, config, metrics: dict | None) -> dict:
    """One trajectory point: a model of configuration `config` at `tokens` / `step` of the run, with its `metrics`
    (the `eval_*` values of `Trainer.evaluate`; missing ones are None)."""
    metrics = metrics or {}
    return {"stage": stage, "tokens": int(tokens), "step": int(step), "num_parameters": config.num_parameters(),
            "num_active_parameters": config.num_active_parameters(),
            **{name: metrics.get(name) for name in METRICS}}


def stage_points(base: list[dict], log_history: list[dict], stage: int, tokens0: int, step0: int, per_step: int,
                 config_at: Callable[[int], object]) -> list[dict]:
    """`base` followed by one point per evaluation in a stage's `log_history` (each step once).

    `tokens0` / `step0` are the run's tokens and steps before the stage, `per_step` its tokens per optimizer step and
    `config_at(step)` the model's configuration at a step of the stage (it changes inside the iterative baseline).
    """
    points, seen = list(base), set()
    for entry in log_history:
        if "eval_kl" in entry and entry["step"] not in seen:
            seen.add(entry["step"])
            points.append(point(stage, tokens0 + entry["step"] * per_step, step0 + entry["step"],
                                config_at(entry["step"]), entry))
    return points


class TrajectoryLogger(TrainerCallback):
    """Calls `write(state)` after every evaluation on the main process, so the run's progress is on disk while it
    trains."""

    def __init__(self, write: Callable):
        self.write = write

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero:
            self.write(state)


def plot_trajectory(trajectory: dict, path: str | os.PathLike) -> Path | None:
    """Write the compression trajectory (parameters and eval KL / perplexity against cumulative training tokens,
    one point per stage, stage 0 the teacher) to a PNG; returns its path, or `None` if there are no points."""
    points = sorted(trajectory.get("points") or [], key=lambda p: (p.get("tokens") or 0, p.get("stage") or 0))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [p.get("tokens") or 0 for p in points]
    fig, (ax_params, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
    # A stage's size holds from the end of the previous stage (where it was pruned) to the end of its own training.
    ax_params.plot(tokens, [p.get("num_parameters") for p in points], "o-", drawstyle="steps-pre", label="total")
    ax_params.plot(tokens, [p.get("num_active_parameters") for p in points], "s--", drawstyle="steps-pre",
                   label="active")
    for p, x in zip(points, tokens):
        ax_params.annotate(f"stage {p.get('stage')}" if p.get("stage") else "teacher", (x, p.get("num_parameters")),
                           textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_params.set(xlabel="training tokens", ylabel="parameters", title="Model size")
    ax_params.legend()

    def series(key):
        xs, ys = zip(*[(x, p[key]) for p, x in zip(points, tokens) if p.get(key) is not None] or [((), ())])
        return list(xs), list(ys)

    xs, ys = series("eval_kl")
    handles = []
    if xs:
        handles += ax_eval.plot(xs, ys, "o-", color="C2", label="eval KL to teacher")
    ax_eval.set(xlabel="training tokens", ylabel="KL", title="Evaluation")
    xs, ys = series("eval_perplexity")
    if xs:
        ax_ppl = ax_eval.twinx()
        handles += ax_ppl.plot(xs, ys, "s--", color="C3", label="eval perplexity")
        ax_ppl.set_ylabel("perplexity")
    if handles:
        ax_eval.legend(handles=handles, loc="best")
    else:
        ax_eval.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax_eval.transAxes)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same data, same bytes
    plt.close(fig)
    return path


__all__ = ["point", "stage_points", "TrajectoryLogger", "plot_trajectory", "METRICS"]
