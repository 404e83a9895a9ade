"""Everything decided before a compression run computes anything: the checks of `--dry-run` (`check`), the stage
table `slimmoe plan` prints (`plan_text`, with the budget guidance of `budget_note`) and the `DistillationConfig` each
stage trains with, mapped from the recipe's `training:` and `distillation:` sections (`training_args`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import torch
from transformers import PretrainedConfig

from ..architectures import count_parameters
from ..pruning.schedule import format_plan
from ..utils.config_io import expand_path
from ..utils.distributed import fsdp_requested
from ..utils.modeling import check_tokenizer_vocabulary
from ..utils.outputs import check_weights, human_count
from .recipe import BUILD_TEACHER, DataSource, Recipe
from .sources import check_source, source_files
from .teacher import is_local, read_teacher_config

logger = logging.getLogger(__name__)


def world_size() -> int:
    """Number of training processes (`WORLD_SIZE`, set by `accelerate launch` / `torchrun`; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def plan_text(recipe: Recipe, teacher_config: PretrainedConfig | None = None) -> str:
    """The stage table of a recipe (from its numbers only unless `teacher_config` is given)."""
    teacher_config = teacher_config or recipe.teacher_config() or read_teacher_config(recipe)
    stages = recipe.stage_configs(teacher_config)
    per_step = recipe.tokens_per_step(world_size())
    budgets = [f"{s:,} steps ({human_count(s * per_step)} tokens)" for s in recipe.stage_steps(world_size())]
    title = f"{recipe.name}: {recipe.method}, {len(stages)} stage(s), {human_count(per_step)} tokens per step"
    if recipe.method == "iterative":
        title += " (masks grow inside one distillation run)"
    note = budget_note(recipe, teacher_config)
    return format_plan(teacher_config, stages, budgets=budgets, title=title) + (f"\n{note}" if note else "")


BUDGET_SWEEP = "budget_sweep.json"  # in hf_slimmoe/recipes/: written by benchmarks/bench_budget_sweep.py


def budget_note(recipe: Recipe, teacher_config: PretrainedConfig, sweep: dict | None = None) -> str | None:
    """One line of guidance when a multi-stage recipe's budget is one at which one-stage measured better: budgets are
    compared in training tokens per teacher parameter with the nearest budget of the measured sweep (`sweep`, default
    the packaged `BUDGET_SWEEP`), or said to be beyond it."""
    from importlib import resources

    if recipe.method != "multi-stage":
        return None
    if sweep is None:
        sweep = json.loads(resources.files("hf_slimmoe.recipes").joinpath(BUDGET_SWEEP).read_text(encoding="utf-8"))
    tokens = sum(recipe.stage_steps(world_size())) * recipe.tokens_per_step(world_size())
    ratio = tokens / count_parameters(teacher_config)[0]
    measured = [b for b in sweep["budgets"] if "one-stage" in b["full_kl"] and len(b["full_kl"]) > 1]

    def one_stage_better(budget):
        return budget["full_kl"]["one-stage"] < min(v for k, v in budget["full_kl"].items() if k != "one-stage")

    largest = max(measured, key=lambda b: b["tokens_per_parameter"])
    beyond = ratio > 2 * largest["tokens_per_parameter"]
    at = largest if beyond else min(measured, key=lambda b: abs(math.log(b["tokens_per_parameter"] / ratio)))
    if not one_stage_better(at):
        return None
    multi = min(v for k, v in at["full_kl"].items() if k != "one-stage")
    figure = (f"one-stage ended at full KL {at['full_kl']['one-stage']:.3f}, the best multi-stage schedule at "
              f"{multi:.3f} ({at['steps']:,} steps, {at['tokens_per_parameter']:.2g} tokens per parameter of "
              f"{sweep['teacher']}; benchmarks/RESULTS.md, 'Budget sweep')")
    if beyond:
        every = f"one-stage measured better at all {len(measured)} of its budgets; " if all(
            one_stage_better(b) for b in measured) else ""
        return (f"Note: {ratio:.2g} tokens per teacher parameter is beyond the measured sweep ({every}at its "
                f"largest, {figure}).")
    return (f"Note: at about this budget ({ratio:.2g} tokens per teacher parameter) {figure}: consider method: "
            "one-stage.")


def check(recipe: Recipe) -> PretrainedConfig:
    """Everything `--dry-run` checks, before any compute: data files, teacher config and sizes, tokenizer and
    vocabulary, stage sizes, budgets, training arguments, Hub settings. Returns the teacher's configuration."""
    recipe_dir = recipe.directory
    for name in ("train", "eval", "calibration"):
        source = getattr(recipe.data, name)
        if source is not None:
            check_source(source, f"data.{name}", recipe_dir)
    if recipe.teacher.build is not None:
        source_files(DataSource(glob=recipe.teacher.build.tokenizer_files), "teacher.build.tokenizer_files",
                      recipe_dir)
    if recipe.method == "iterative" and (recipe.training.get("fsdp") or fsdp_requested()):
        raise ValueError("method: iterative does not run under FSDP: its masks zero and read whole expert and "
                         "attention weights between optimizer steps, and FSDP leaves each process one shard of them. "
                         "Run the iterative baseline on one process or with DDP, or use multi-stage / one-stage.")
    teacher_config = read_teacher_config(recipe, offline_ok=True)
    recipe.stage_configs(teacher_config)  # sizes legal (raises naming stages.*)
    recipe.stage_steps(world_size())
    recipe.gradient_accumulation_steps(world_size())
    check_teacher_files(recipe, teacher_config)
    if recipe.method == "multi-stage" and recipe.early_stopping.enabled and recipe.data.eval is not None:
        t = recipe.training
        if t.get("save_steps", 500) % t.get("eval_steps", t.get("logging_steps", 10)) != 0:
            raise ValueError(f"training.save_steps={t.get('save_steps', 500)} must be a multiple of "
                             f"training.eval_steps={t.get('eval_steps')}: early stopping restores the best evaluated "
                             "checkpoint.")
    checked = recipe
    if not torch.cuda.is_available() and (recipe.training.get("bf16") or recipe.training.get("fp16")):
        logger.warning("No GPU here: training.bf16 / fp16 are not checked on this machine.")
        checked = dataclasses.replace(recipe, training={**recipe.training, "bf16": False, "fp16": False})
    training_args(checked, os.path.join(recipe.output_dir, ".dry-run"), max_steps=1, early_stopping=False)
    if recipe.hub.get("push_to_hub"):
        from ..hub import HubSettings

        HubSettings.from_dict(recipe.hub)
    return teacher_config


def check_teacher_files(recipe: Recipe, teacher_config: PretrainedConfig) -> None:
    """Raise when a local teacher's weight files are damaged, or its tokenizer has more tokens than its vocabulary."""
    if recipe.teacher.model == BUILD_TEACHER:
        return
    model = expand_path(recipe.teacher.model, recipe.directory)
    if is_local(model):
        check_weights(model)
    local = expand_path(recipe.teacher.tokenizer or recipe.teacher.model, recipe.directory)
    if is_local(local):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local)
        check_tokenizer_vocabulary(tokenizer, teacher_config.vocab_size, "teacher.tokenizer")


def training_args(recipe: Recipe, output_dir: str, max_steps: int, early_stopping: bool, stage: int | None = None):
    """The `DistillationConfig` of a stage (or of an evaluation) from the recipe's `training` and `distillation`;
    with `stages.lr_schedule: continue`, stage `stage` of a multi-stage run takes its part of one schedule."""
    from ..distillation import DistillationConfig
    from ..distillation.settings import DistillationSettings

    d, has_eval = recipe.distillation, recipe.data.eval is not None
    training = {k: v for k, v in recipe.training.items() if k != "gradient_accumulation_steps"}
    if stage is not None and recipe.method == "multi-stage" and recipe.stages.lr_schedule == "continue":
        steps = recipe.stage_steps(world_size())
        training.update(lr_schedule_steps=sum(steps), lr_schedule_start=sum(steps[:stage - 1]))
    try:
        return DistillationConfig(
            output_dir=output_dir, max_steps=max_steps, seed=recipe.seed,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps(world_size()),
            eval_strategy="steps" if has_eval else "no", save_strategy="steps",
            load_best_model_at_end=early_stopping, metric_for_best_model="kl" if early_stopping else None,
            greater_is_better=False if early_stopping else None, restore_callback_states_from_checkpoint=True,
            **{f.name: getattr(d, f.name) for f in dataclasses.fields(DistillationSettings)}, **training,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"training: {e}") from None


def multi_stage_init_fraction(recipe: Recipe) -> float:
    """Fraction of the total budget that multi-stage spends before its last stage (where iterative pruning reaches
    the target, as in the paper's Section 4.2)."""
    steps = recipe.stages.budget.steps or recipe.stages.budget.tokens
    return sum(steps[:-1]) / sum(steps) if len(steps) > 1 else 0.5


def dataset_ids(recipe: Recipe) -> list[str]:
    """The data sources of a recipe as the card lists them (Hub ids, directories, or file globs)."""
    ids = []
    for name in ("train", "eval", "calibration"):
        source = getattr(recipe.data, name)
        if source is not None:
            if source.type != "text_files":
                ids.append(source.path)
            else:
                globs = [source.glob] if isinstance(source.glob, str) else source.glob
                ids.append(", ".join(globs or source.paths))
    return list(dict.fromkeys(ids))


__all__ = [
    "world_size",
    "plan_text",
    "BUDGET_SWEEP",
    "budget_note",
    "check",
    "check_teacher_files",
    "training_args",
    "multi_stage_init_fraction",
    "dataset_ids",
]
