"""Where a compression run keeps its state and how a killed run finds it again: the disk is the truth.

`RunPaths` names every file and directory of OUTPUT_DIR (see `hf_slimmoe.compression.loop`); `is_finished_stage`
says whether a stage directory is complete; `last_checkpoint` finds the newest Trainer checkpoint that can be resumed
from (removing damaged ones, see `checkpoint_problem`), and `stopped_early` whether early stopping had already ended
the stage when it was saved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..utils.outputs import check_weights, read_json

logger = logging.getLogger(__name__)


@dataclass
class RunPaths:
    """Where a run keeps its state (the layout is drawn in `hf_slimmoe.compression.loop`'s docstring)."""

    output_dir: str

    def stage(self, i: int) -> str:
        return os.path.join(self.output_dir, f"stage-{i}")

    def tmp(self, i: int) -> str:
        return os.path.join(self.output_dir, f".stage-{i}.tmp")

    def work(self, i: int) -> str:
        return os.path.join(self.output_dir, f".stage-{i}.work")

    @property
    def teacher(self) -> str:
        return os.path.join(self.output_dir, "teacher")

    @property
    def teacher_cache(self) -> str:
        return os.path.join(self.output_dir, "teacher_cache")

    @property
    def trajectory(self) -> str:
        return os.path.join(self.output_dir, "trajectory.json")

    @property
    def recipe(self) -> str:
        return os.path.join(self.output_dir, "recipe.yaml")

    @property
    def teacher_eval(self) -> str:
        return os.path.join(self.output_dir, "teacher_eval.json")


def is_finished_stage(directory: str) -> bool:
    """A stage directory is finished when it exists under its final name with stage.json, config.json and weights
    (one model.safetensors or a sharded index; stage directories are only ever renamed into place once complete)."""
    return (os.path.isfile(os.path.join(directory, "stage.json"))
            and os.path.isfile(os.path.join(directory, "config.json"))
            and (os.path.isfile(os.path.join(directory, "model.safetensors"))
                 or os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))))


def last_checkpoint(directory: str) -> str | None:
    """The newest checkpoint-N that is complete and readable (see `checkpoint_problem`). Damaged ones are removed
    with a warning, so a process killed while saving resumes from the previous checkpoint."""
    if not os.path.isdir(directory):
        return None
    found = sorted((int(n.split("-")[-1]), n) for n in os.listdir(directory)
                   if n.startswith(PREFIX_CHECKPOINT_DIR + "-") and n.split("-")[-1].isdigit())
    for _, name in reversed(found):
        path = os.path.join(directory, name)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping the damaged checkpoint %s (%s); resuming from the previous one.", path, problem)
        shutil.rmtree(path, ignore_errors=True)
    return None


def checkpoint_problem(path: str) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from (None when it can): its trainer_state.json must be readable
    JSON (the Trainer writes it last, and not atomically) and its weights whole (safetensors), or saved by FSDP or
    DeepSpeed."""
    state = os.path.join(path, "trainer_state.json")
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)["global_step"]
    except FileNotFoundError:
        return "no trainer_state.json"
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is empty or cut short"
    if os.path.isdir(os.path.join(path, "pytorch_model_fsdp_0")) or any(n.startswith("global_step")
                                                                       for n in os.listdir(path)):
        return None
    try:
        check_weights(path)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return None


def stopped_early(checkpoint: str) -> bool:
    """Whether training had decided to stop (early stopping) when `checkpoint` was saved."""
    state = read_json(os.path.join(checkpoint, "trainer_state.json"))
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    control = control[-1] if isinstance(control, list) and control else control
    return bool(control.get("args", {}).get("should_training_stop")) and state.get("global_step", 0) < state.get(
        "max_steps", 0)


__all__ = [
    "RunPaths",
    "is_finished_stage",
    "last_checkpoint",
    "checkpoint_problem",
    "stopped_early",
]
