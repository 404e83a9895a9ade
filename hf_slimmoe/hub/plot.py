"""The trajectory plot of a model card: eval KL, perplexity and top-1 agreement against training tokens, with the
parameter count on a second axis and each stage shaded (`plot_trajectory`, matplotlib, optional).
"""

from __future__ import annotations

import os
from pathlib import Path


def trajectory_figure(trajectory: dict):
    """The trajectory as a matplotlib figure: model size (left) and evaluation (right) against cumulative training
    tokens. Each stage's span of tokens is shaded and named once, in a legend below the plots, outside the curves."""
    points = sorted(trajectory.get("points") or [], key=lambda p: (p.get("tokens") or 0, p.get("stage") or 0))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_params, ax_eval) = plt.subplots(1, 2, figsize=(10, 4.6))
    tokens = [p.get("tokens") or 0 for p in points]
    # A stage's size holds from the end of the previous stage (where it was pruned) to the end of its own training.
    handles = ax_params.plot(tokens, [p.get("num_parameters") for p in points], "o-", drawstyle="steps-pre",
                             label="total parameters")
    handles += ax_params.plot(tokens, [p.get("num_active_parameters") for p in points], "s--",
                              drawstyle="steps-pre", label="active parameters")
    ax_params.set(xlabel="training tokens", ylabel="parameters", title="Model size")
    handles += _plot_evaluation(ax_eval, points, tokens)
    handles += _shade_stages([ax_params, ax_eval], points, tokens)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    rows = -(-len(handles) // 6)
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    return fig


def _plot_evaluation(ax, points: list[dict], tokens: list[int]) -> list:
    def series(key):
        xs, ys = zip(*[(x, p[key]) for p, x in zip(points, tokens) if p.get(key) is not None] or [((), ())])
        return list(xs), list(ys)

    ax.set(xlabel="training tokens", ylabel="KL", title="Evaluation")
    handles = []
    xs, ys = series("eval_kl")
    if xs:
        handles += ax.plot(xs, ys, "o-", color="C2", label="eval KL to teacher")
    xs, ys = series("eval_perplexity")
    if xs:
        ax_ppl = ax.twinx()
        handles += ax_ppl.plot(xs, ys, "s--", color="C3", label="eval perplexity")
        ax_ppl.set_ylabel("perplexity")
    if not handles:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
    return handles


def _shade_stages(axes: list, points: list[dict], tokens: list[int]) -> list:
    """Shade each stage's span of tokens on every axis; returns one legend handle per stage (the teacher included)."""
    spans: dict[int, list[int]] = {}
    for p, x in zip(points, tokens):
        spans.setdefault(p.get("stage") or 0, []).append(x)
    handles = []
    for stage, xs in sorted(spans.items()):
        color = "0.4" if stage == 0 else f"C{(stage + 3) % 10}"
        label = "teacher" if stage == 0 else f"stage {stage}"
        for ax in axes:
            if stage == 0:
                handle = ax.axvline(min(xs), color=color, linestyle=":", linewidth=1, label=label)
            else:
                handle = ax.axvspan(min(xs), max(xs), color=color, alpha=0.15, linewidth=0, label=label)
        handles.append(handle)
    return handles


def plot_trajectory(trajectory: dict, path: str | os.PathLike) -> Path | None:
    """Write the compression trajectory (see `trajectory_figure`) to a PNG; returns its path, or `None` if there are
    no points."""
    if not trajectory.get("points"):
        return None
    import matplotlib.pyplot as plt

    fig = trajectory_figure(trajectory)
    path = Path(path)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same data, same bytes
    plt.close(fig)
    return path


__all__ = [
    "trajectory_figure",
    "plot_trajectory",
]
