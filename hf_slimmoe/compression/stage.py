"""One stage of the SlimMoE loop, one method per step of the paper's procedure (`StageRunner`): load the parent,
score, prune, distill, save, card, move into place, push.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from transformers import EarlyStoppingCallback, PretrainedConfig

from ..architectures import count_parameters, get_architecture, load_model, load_sharded
from ..utils.distributed import is_sharded
from ..utils.outputs import human_count, read_json, write_json
from .plan import dataset_ids, multi_stage_init_fraction, training_args
from .recipe import Recipe
from .resume import last_checkpoint, stopped_early
from .run import Run, evaluate_only, loads_into_shards
from .trajectory import TrajectoryLogger, point, stage_points

logger = logging.getLogger(__name__)


class StageRunner:
    """One stage of the loop on a `Run`, one method per step of the paper's procedure.

    Every step leaves its result on disk (scores and the pruned model's evaluation under `.stage-i.work/`, Trainer
    checkpoints under `.stage-i.work/checkpoints/`, the saved stage under `.stage-i.tmp/`), so a killed stage resumes
    where it was. Only the main process writes files; every process trains and takes part in saving the weights.
    """

    def __init__(self, run: Run, index: int, config: PretrainedConfig, max_steps: int, num_stages: int):
        self.run, self.index, self.config, self.max_steps, self.num_stages = run, index, config, max_steps, num_stages
        self.final_dir, self.tmp_dir, self.work_dir = run.paths.stage(index), run.paths.tmp(index), run.paths.work(index)
        self.checkpoints = os.path.join(self.work_dir, "checkpoints")
        recipe = run.recipe
        self.early = (recipe.method == "multi-stage" and index < num_stages and recipe.early_stopping.enabled
                      and run.eval_set is not None)
        self.sharded_scoring = loads_into_shards(recipe, run.args)  # the parent is loaded into shards, scored sharded
        self.model = self.scores = self.trainer = self.iterative = None
        self.callbacks: list = []
        self.metrics: dict = {}
        self.steps = 0

    @property
    def tokens(self) -> int:
        """Training tokens of this stage."""
        return self.steps * self.run.per_step

    def load_parent(self) -> None:
        """The previous stage's model (the teacher for stage 1) on this process's device; a half-written
        `.stage-i.tmp/` of an earlier attempt is removed."""
        from transformers import set_seed

        run, c = self.run, self.config
        if run.is_main:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)  # a half-written stage is never reused
        os.makedirs(self.work_dir, exist_ok=True)
        logger.info("Stage %d/%d: %s -> d_expert %d, heads %d/%d (%s parameters), %d steps%s", self.index,
                    self.num_stages, run.parent, get_architecture(c).expert_width_of(c), c.num_attention_heads,
                    c.num_key_value_heads, human_count(count_parameters(c)[0]), self.max_steps,
                    ", early stopping on eval KL" if self.early else "")
        set_seed(run.recipe.seed + self.index)
        if self.sharded_scoring:  # FSDP2: rank 0 loads, the others receive only their shards
            self.model = load_sharded(run.parent, dtype=run.dtype, device=run.device)
        else:
            self.model = load_model(run.parent, dtype=run.dtype).to(run.device)  # the teacher's family

    def score(self) -> None:
        """Sensitivity scores of the model against the original teacher (Eq. 2-4), once per stage: saved in the work
        directory, so a resumed stage prunes to the same model. The iterative baseline scores during `distill`."""
        from ..pruning import SensitivityScores, compute_sensitivity

        run, recipe = self.run, self.run.recipe
        if recipe.method == "iterative":
            return
        path = os.path.join(self.work_dir, "scores.safetensors")
        teacher = None if run.parent == run.teacher_path else run.teacher  # stage 1: the model is the teacher
        kwargs = dict(teacher=teacher, criterion=recipe.scoring.criterion, top_k=recipe.scoring.top_k)
        if self.sharded_scoring:
            # FSDP: every rank scores its share of the batches on the model loaded sharded one decoder layer per unit
            torch.distributed.barrier()  # every rank looks for the file before the main one may write it
            if os.path.isfile(path):
                self.scores = SensitivityScores.load(path)
                return
            self.scores = compute_sensitivity(self.model, run.calibration, **kwargs)
        else:
            with run.args.main_process_first(desc="sensitivity scores"):
                if os.path.isfile(path):
                    self.scores = SensitivityScores.load(path)
                    return
                self.scores = compute_sensitivity(self.model, run.calibration, **kwargs)
        if run.is_main:
            self.scores.save(path + ".tmp")
            os.replace(path + ".tmp", path)

    def prune(self) -> None:
        """One-shot structured pruning to the stage size (the iterative baseline prunes after `distill`): in memory,
        or with `prune.streaming` (and always for a model sharded while scoring) by streaming surgery of the parent
        checkpoint on disk into `.stage-i.work/pruned/`, which is then loaded; both give the same model."""
        from ..pruning import prune_to

        if self.scores is None:
            return
        if self.run.recipe.prune.streaming or is_sharded(self.model):
            self.model = None
            self.model = self.streamed_prune()
        else:
            prune_to(self.model, self.config, self.scores)  # any supported family

    def streamed_prune(self):
        """Streaming surgery of the parent checkpoint (the main process, once; a resumed stage reuses it), loaded on
        this process's device, or into FSDP2 shards when the parent was (rank 0 reads it, the others get shards)."""
        from ..pruning.streaming import prune_checkpoint

        run, pruned_dir = self.run, os.path.join(self.work_dir, "pruned")
        with run.args.main_process_first(desc="streaming surgery"):
            if not os.path.isfile(os.path.join(pruned_dir, "config.json")):  # renamed into place complete
                source = run.parent
                if not os.path.isdir(source):  # a Hub id: its config and safetensors shards, downloaded once
                    from huggingface_hub import snapshot_download

                    source = snapshot_download(source, revision=run.recipe.teacher.revision)
                shutil.rmtree(pruned_dir, ignore_errors=True)
                prune_checkpoint(source, pruned_dir, self.config, self.scores, card=False)
        if self.sharded_scoring:  # FSDP2: the student goes into shards as its parent did (the Trainer keeps them)
            logger.info("Loading the pruned student of stage %d into FSDP2 shards", self.index)
            return load_sharded(pruned_dir, dtype=run.dtype, device=run.device)
        return load_model(pruned_dir, dtype=run.dtype).to(run.device)  # SlimMoE for PhiMoE, else the family's own

    def distill(self) -> None:
        """Distill from the original teacher, continuing from the latest complete checkpoint, with early stopping on
        eval KL in the intermediate stages; the freshly pruned model is evaluated once first."""
        from ..distillation import DistillationTrainer

        run, recipe = self.run, self.run.recipe
        pruned = point(self.index, run.tokens_done, run.steps_done, self.model.config, self.evaluate_pruned())
        base = [*run.trajectory["points"], pruned]
        args = training_args(recipe, self.checkpoints, max_steps=self.max_steps, early_stopping=self.early,
                             stage=self.index)
        if recipe.method == "iterative":
            self.iterative = self.iterative_callback()
            self.callbacks.append(self.iterative)
        if self.early:
            self.callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping.patience,
                                                        early_stopping_threshold=recipe.early_stopping.min_delta))
        self.callbacks.append(TrajectoryLogger(lambda state: write_json(
            run.paths.trajectory, {**run.trajectory, "points": self.points(base, state)})))
        trainer = DistillationTrainer(model=self.model, teacher_model=run.online_teacher, args=args,
                                      train_dataset=run.train, eval_dataset=run.eval_set,
                                      processing_class=run.tokenizer, callbacks=self.callbacks)
        self.train(trainer, last_checkpoint(self.checkpoints))
        self.trainer, self.model = trainer, trainer.model
        if self.iterative is not None:
            self.model, self.scores = self.iterative.finalize(self.model)
        self.metrics = trainer.evaluate() if run.eval_set is not None else {}
        self.steps = trainer.state.global_step
        self.record_trajectory(base)

    def train(self, trainer, resume: str | None) -> None:
        """`trainer.train()`, continuing from the checkpoint `resume`. When early stopping had already ended the stage
        at that checkpoint (the run was killed before the stage was saved), nothing more is trained: the checkpoint's
        state and best model are loaded, as the end of `train()` would have, so the stage reports the same steps."""
        if resume and stopped_early(resume) and trainer.args.load_best_model_at_end:
            from transformers import TrainerState

            state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
            if state.best_model_checkpoint and os.path.isdir(state.best_model_checkpoint):
                logger.info("Stage %d had stopped early at step %d; loading its best model from %s", self.index,
                            state.global_step, state.best_model_checkpoint)
                trainer.state = state
                trainer._load_best_model()  # what Trainer.train does at its end, for every distributed backend
                return
        if resume:
            logger.info("Resuming stage %d from %s", self.index, resume)
        trainer.train(resume_from_checkpoint=resume)

    def evaluate_pruned(self) -> dict:
        """Eval metrics of the model before distillation (kept in the work directory for a resume)."""
        run, path = self.run, os.path.join(self.work_dir, "pruned_eval.json")
        if os.path.isfile(path):
            return read_json(path)
        metrics = evaluate_only(self.model, run.online_teacher, run.eval_set, run.recipe, self.checkpoints,
                                run.tokenizer) or {}
        if run.is_main:
            write_json(path, metrics)
        return metrics

    def iterative_callback(self):
        """The iterative baseline's masks, reaching the target after the multi-stage run's share of the budget."""
        from ..pruning.iterative import IterativeMaskCallback

        recipe = self.run.recipe
        fraction = recipe.iterative.target_fraction or multi_stage_init_fraction(recipe)
        return IterativeMaskCallback(
            self.model, self.config, self.run.calibration, teacher=self.run.teacher, criterion=recipe.scoring.criterion,
            top_k=recipe.scoring.top_k, mask_every_steps=recipe.iterative.mask_every_steps,
            target_step=max(1, round(fraction * self.max_steps)), expert_multiple=recipe.stages.expert_multiple)

    def points(self, base: list[dict], state) -> list[dict]:
        """`base` and one trajectory point per evaluation of this stage's training so far."""
        run = self.run
        config_at = self.iterative.config_at if self.iterative is not None else (lambda step: self.config)
        return stage_points(base, state.log_history, self.index, run.tokens_done, run.steps_done, run.per_step,
                            config_at)

    def record_trajectory(self, base: list[dict]) -> None:
        """The run's trajectory up to the end of this stage; the final evaluation is a point of its own unless the
        last training step was evaluated."""
        run = self.run
        run.trajectory = {**run.trajectory, "points": self.points(base, self.trainer.state)}
        end_step = run.steps_done + self.steps
        if run.eval_set is not None and run.trajectory["points"][-1]["step"] != end_step:
            run.trajectory["points"].append(point(self.index, run.tokens_done + self.tokens, end_step, self.config,
                                                  self.metrics))

    def save(self) -> None:
        """Write the stage as a complete Hub-ready repository under `.stage-i.tmp/`: weights (every process takes
        part, for ZeRO-3 / FSDP), tokenizer, scores, stage.json and trajectory.json (the main process)."""
        self.trainer.save_model(self.tmp_dir)
        if not self.run.is_main:
            return
        self.run.tokenizer.save_pretrained(self.tmp_dir)
        pickled_args = os.path.join(self.tmp_dir, "training_args.bin")
        if os.path.exists(pickled_args):  # a pickle; recipe and stage.json say it all
            os.remove(pickled_args)
        self.scores.save(os.path.join(self.tmp_dir, "scores.safetensors"))
        write_json(os.path.join(self.tmp_dir, "stage.json"), self.stage_info())
        write_json(os.path.join(self.tmp_dir, "trajectory.json"), self.run.trajectory)

    def stage_info(self) -> dict:
        """stage.json: lineage, training spent and settings, final evaluation."""
        run, recipe, args, m = self.run, self.run.recipe, self.trainer.args, self.metrics
        stopped = self.steps < self.max_steps
        return {
            "stage": self.index, "num_stages": self.num_stages, "method": recipe.method, "teacher": run.teacher_name,
            "parent": run.parent if run.parent != run.teacher_path else run.teacher_name, "recipe": recipe.name,
            "license": recipe.teacher.license, "datasets": dataset_ids(recipe), "teacher_config": run.teacher_summary,
            "training": {
                "tokens": self.tokens, "steps": self.steps, "learning_rate": args.learning_rate,
                "kd_loss": args.kd_loss, "kd_samples": args.kd_samples if args.kd_loss == "sampled" else None,
                "top_k": args.top_k, "temperature": args.temperature, "aux_loss_coef": args.aux_loss_coef,
                "ce_weight": args.ce_weight,
                "early_stopped": stopped, "stopped_at_step": self.steps if stopped else None,
                "max_steps": self.max_steps,
            },
            "eval": {"kl": m.get("eval_kl"), "topk_kl": m.get("eval_topk_kl"), "full_kl": m.get("eval_full_kl"),
                     "perplexity": m.get("eval_perplexity"), "top1_agreement": m.get("eval_top1_agreement")},
            "provenance": {"run": run.record["id"], "recipe_hash": run.record["recipe_hash"],
                           "teacher": run.record["teacher"], "tokenizer": run.record["tokenizer"]},
        }

    def card(self) -> None:
        """The model card (README.md) and trajectory.png of the saved stage."""
        if self.run.is_main:
            write_card(self.tmp_dir, self.final_dir)

    def move_into_place(self) -> None:
        """Rename `.stage-i.tmp/` to `stage-i/`: from here on the stage is finished and never recomputed."""
        run = self.run
        if not run.is_main:
            return
        os.replace(self.tmp_dir, self.final_dir)
        write_json(run.paths.trajectory, run.trajectory)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        logger.info("Stage %d/%d saved to %s (%d steps, %s tokens, eval KL %s)", self.index, self.num_stages,
                    self.final_dir, self.steps, human_count(self.tokens), self.metrics.get("eval_kl"))

    def push(self) -> None:
        """Publish the stage when the recipe's `hub.push_to_hub` says so (a failed push only warns)."""
        if self.run.is_main:
            publish(self.final_dir, self.run.recipe)

    def finish(self) -> None:
        """Wait for every process, then let the next stage start from this one."""
        if self.trainer.accelerator.num_processes > 1:
            self.trainer.accelerator.wait_for_everyone()
        self.run.advance(self.final_dir, self.tokens, self.steps)
        self.trainer = self.model = self.iterative = None
        self.callbacks = []


def write_card(stage_dir: str, final_dir: str) -> None:
    """The card of a stage written in `stage_dir` (its temporary name); its usage snippet loads from `final_dir`."""
    from ..hub import write_model_card

    write_model_card(stage_dir, local_dir=final_dir)


def publish(stage_dir: str, recipe: Recipe) -> None:
    if not recipe.hub.get("push_to_hub"):
        return
    from ..hub import HubSettings, publish_stage

    if not publish_stage(stage_dir, HubSettings.from_dict(recipe.hub)):
        logger.warning("%s was not published; `slimmoe push %s` publishes it later.", stage_dir, recipe.output_dir)


__all__ = [
    "StageRunner",
    "write_card",
    "publish",
]
