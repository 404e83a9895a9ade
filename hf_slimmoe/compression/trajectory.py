"""The compression trajectory: one point per evaluation of the run, from the teacher (stage 0) to the last stage.

A point records where the run is (stage, cumulative training tokens and optimizer steps), the model's size (total
and active parameters) and its held-out metrics against the teacher. The pipeline writes the points to
`OUTPUT_DIR/trajectory.json` after every evaluation (`TrajectoryLogger`) and into each stage directory, where
`hf_slimmoe.hub.plot_trajectory` draws them for the model card.
"""

from __future__ import annotations

from typing import Callable

from transformers import TrainerCallback

from ..architectures import count_parameters

METRICS = ("eval_kl", "eval_topk_kl", "eval_full_kl", "eval_perplexity", "eval_top1_agreement")


def point(stage: int, tokens: int, step: int, config, metrics: dict | None) -> dict:
    """One trajectory point: a model of configuration `config` at `tokens` / `step` of the run, with its `metrics`
    (the `eval_*` values of `Trainer.evaluate`; missing ones are None)."""
    metrics = metrics or {}
    total, active = count_parameters(config)  # any supported family
    return {"stage": stage, "tokens": int(tokens), "step": int(step), "num_parameters": total,
            "num_active_parameters": active,
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


__all__ = ["point", "stage_points", "TrajectoryLogger", "METRICS"]
