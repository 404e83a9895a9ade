"""The SlimMoE stage loop: score -> prune -> distill -> save -> card -> push, resumable at every point.

`compress(recipe)` reads top to bottom like the paper's Section 3.2:

    teacher = the original model (never changes)
    for each stage size (from `plan_stages` or pinned in the recipe):
        model  = the previous stage's model (the teacher for stage 1)
        scores = compute_sensitivity(model, calibration batches, teacher)       # Eq. 2-4
        model.prune_to(stage size, scores)                                      # one-shot prune
        DistillationTrainer(model, teacher).train()                            # KD (distillation.kd_loss) from the
                                                                               # original teacher,
                                                                               # early-stopped on eval KL (not last)
        save OUTPUT_DIR/stage-i/ (a Hub-ready repo + scores + stage.json + trajectory.json + card); publish

`Run` (`run.py`) holds what the stages share (teacher, tokenizer, data, progress), `StageRunner` (`stage.py`) does
one stage, one method per step, `plan.py` checks a recipe before any work and `resume.py` names the files below.
Everything a run writes is on disk, and the disk is the truth when the same command runs again:

    OUTPUT_DIR/recipe.yaml          the resolved recipe
    OUTPUT_DIR/trajectory.json      every evaluation so far (tokens, parameter counts, eval KL / perplexity / top-1)
    OUTPUT_DIR/teacher/             the locally built teacher (`teacher.model: build` only)
    OUTPUT_DIR/teacher_cache/       what the loss reads from the teacher on the train blocks (samples or top-k) and
                                    its top-k on the eval blocks (`distillation.cache_teacher`)
    OUTPUT_DIR/.stage-i.work/       the running stage: scores.safetensors, pruned_eval.json, checkpoints/checkpoint-N
    OUTPUT_DIR/.stage-i.tmp/        a stage being written; renamed to stage-i/ when complete
    OUTPUT_DIR/stage-i/             a finished stage: never recomputed

A finished `stage-i/` is skipped; a running stage re-uses its saved scores (so it prunes to the same model) and
continues from its latest complete Trainer checkpoint. The baselines of the paper's Section 4.2 share the loop:
`one-stage` prunes straight to the target and distills with the total budget; `iterative` distills the full-size
model while masks grow towards the target, then prunes physically once (see `pruning.iterative`).
"""

from __future__ import annotations

import logging
import os

from ..utils.outputs import RunLock, write_json
from .plan import check, plan_text, training_args, world_size
from .provenance import check_output_dir, open_output_dir, run_record
from .recipe import Recipe
from .resume import RunPaths, is_finished_stage
from .run import start_run
from .stage import StageRunner

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- the loop
def compress(recipe: Recipe, dry_run: bool = False, on_stage_start=None, overwrite: bool = False,
             reuse_stale: bool = False) -> str:
    """Run (or with `dry_run`, only check and plan) a recipe; returns the output directory. Re-running continues.

    The output directory must hold nothing of another run (see `provenance`): `overwrite` removes what an earlier run
    left there first, `reuse_stale` keeps it despite the differences. A run holds `OUTPUT_DIR/.lock` while it writes.
    `on_stage_start(i, num_stages)`, when given, is called as stage `i` begins (or is found finished).
    """
    teacher_config = check(recipe)
    record = run_record(recipe, teacher_config)
    if dry_run:
        if not overwrite:
            check_output_dir(recipe, record, reuse_stale=reuse_stale)
        return recipe.output_dir
    paths = RunPaths(recipe.output_dir)
    # Training arguments first: under `accelerate launch` with DeepSpeed ZeRO-3 they make from_pretrained shard the
    # models as they load. Only the main process locks, checks and records the output directory.
    args = training_args(recipe, os.path.join(paths.output_dir, ".run"), max_steps=1, early_stopping=False)
    with RunLock(paths.output_dir, enabled=args.process_index == 0):
        with args.main_process_first(desc="checking the output directory"):
            if args.process_index == 0:
                open_output_dir(recipe, record, overwrite=overwrite, reuse_stale=reuse_stale)
        num_stages = len(record["stages"])
        if all(is_finished_stage(paths.stage(i)) for i in range(1, num_stages + 1)):
            logger.info("All %d stages of %s are finished in %s; nothing to do.", num_stages, recipe.name,
                        paths.output_dir)
            return paths.output_dir
        logger.info("Plan:\n%s", plan_text(recipe, teacher_config))

        run = start_run(recipe, paths, args, record, reuse_stale=reuse_stale)
        stages = zip(recipe.stage_configs(run.teacher.config), recipe.stage_steps(world_size()))
        for i, (stage_config, max_steps) in enumerate(stages, start=1):
            if on_stage_start is not None:
                on_stage_start(i, num_stages)
            if is_finished_stage(paths.stage(i)):
                run.skip_finished_stage(i, num_stages)
                continue
            stage = StageRunner(run, i, stage_config, max_steps, num_stages)
            stage.load_parent()      # the previous stage's model (the teacher for stage 1)
            stage.score()            # Eq. 2-4 against the original teacher
            stage.prune()            # one-shot to the stage size
            stage.distill()          # KD (distillation.kd_loss) from the original teacher
            stage.save()             # a complete Hub-ready repository under .stage-i.tmp/
            stage.card()
            stage.move_into_place()  # .stage-i.tmp/ -> stage-i/
            stage.push()
            stage.finish()
        if run.is_main:
            write_json(paths.trajectory, run.trajectory)
    return paths.output_dir


__all__ = ["compress"]
