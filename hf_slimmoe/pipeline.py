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

`Run` holds what the stages share (teacher, tokenizer, data, progress) and `StageRunner` does one stage, one method
per step. Everything a run writes is on disk, and the disk is the truth when the same command runs again:

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

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import EarlyStoppingCallback, PretrainedConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .architectures import count_parameters, get_architecture, load_model, load_sharded
from .data import batches, check_source, load_blocks, source_files
from .distributed import fsdp_requested, is_sharded
from .modeling_utils import check_tokenizer_vocabulary
from .outputs import RunLock, check_weights, read_json, write_json
from .provenance import check_output_dir, open_output_dir, run_record
from .recipe import BUILD_TEACHER, DataSource, Recipe, expand_path, save_recipe
from .schedule import format_plan, human_count
from .teacher import build_teacher, is_local, read_teacher_config, teacher_paths
from .trajectory import TrajectoryLogger, point, stage_points

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- layout
@dataclass
class RunPaths:
    """Where a run keeps its state; see the module docstring."""

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


def world_size() -> int:
    """Number of training processes (`WORLD_SIZE`, set by `accelerate launch` / `torchrun`; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_finished_stage(directory: str) -> bool:
    """A stage directory is finished when it exists under its final name with stage.json, config.json and weights
    (one model.safetensors or a sharded index; stage directories are only ever renamed into place once complete)."""
    return (os.path.isfile(os.path.join(directory, "stage.json"))
            and os.path.isfile(os.path.join(directory, "config.json"))
            and (os.path.isfile(os.path.join(directory, "model.safetensors"))
                 or os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))))


# ----------------------------------------------------------------------------------------------------- checks
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
        from .hub import HubSettings

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
    from .distillation import DistillationConfig
    from .kd_settings import DistillationSettings

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


def evaluate_only(model, teacher, eval_dataset, recipe: Recipe, output_dir: str, tokenizer) -> dict | None:
    """`DistillationTrainer.evaluate()` of `model` against the teacher (online or cached) without training."""
    from .distillation import DistillationTrainer

    if eval_dataset is None:
        return None
    args = training_args(recipe, output_dir, max_steps=1, early_stopping=False)
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, eval_dataset=eval_dataset,
                                  processing_class=tokenizer)
    return trainer.evaluate()


# ----------------------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """What the stages of a run share: the recipe, the original teacher, the data, and the progress so far.

    `args` are the run's training arguments (they give the process index and `main_process_first`); `online_teacher`
    is the teacher the trainers get (with caches in `train` / `eval_set` they read those, and the teacher checks
    them and evaluates online: `eval_full_kl`); `record` is the run's provenance (`provenance.run_record`); `parent`
    is the model the next stage starts from, `tokens_done` / `steps_done` the training spent by the stages before it.
    """

    recipe: Recipe
    paths: RunPaths
    args: Any
    teacher: Any
    teacher_path: str
    tokenizer: Any
    device: torch.device
    train: Any = None
    eval_set: Any = None
    calibration: list[dict] = field(default_factory=list)
    online_teacher: Any = None
    trajectory: dict = field(default_factory=dict)
    teacher_summary: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    parent: str = ""
    tokens_done: int = 0
    steps_done: int = 0

    @property
    def is_main(self) -> bool:
        return self.args.process_index == 0  # only the main process writes run files

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.recipe.teacher.dtype)

    @property
    def per_step(self) -> int:
        return self.recipe.tokens_per_step(world_size())

    @property
    def teacher_name(self) -> str:
        return self.trajectory["teacher"]["name"]

    def advance(self, stage_dir: str, tokens: int, steps: int) -> None:
        """The next stage starts from `stage_dir`, after `tokens` / `steps` more training."""
        self.parent, self.tokens_done, self.steps_done = stage_dir, self.tokens_done + tokens, self.steps_done + steps

    def skip_finished_stage(self, i: int, num_stages: int) -> None:
        """Take a finished `stage-i/` as it is: its trajectory and training spent are read back from disk."""
        final_dir = self.paths.stage(i)
        info = read_json(os.path.join(final_dir, "stage.json"))
        self.trajectory = read_json(os.path.join(final_dir, "trajectory.json"))
        if self.is_main:
            shutil.rmtree(self.paths.work(i), ignore_errors=True)
        logger.info("Stage %d/%d is finished in %s; skipping it.", i, num_stages, final_dir)
        self.advance(final_dir, info["training"]["tokens"], info["training"]["steps"])


def run_device(recipe: Recipe) -> torch.device:
    """This process's device: the CPU with `training.use_cpu` or without CUDA, else the GPU of `LOCAL_RANK`."""
    if recipe.training.get("use_cpu") or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def prepare_output_dir(recipe: Recipe, paths: RunPaths, reuse_stale: bool = False) -> None:
    """Write the resolved recipe into OUTPUT_DIR, and build the teacher for `teacher.model: build` (or reuse the one
    built there, when its build settings match; see `build_teacher`)."""
    save_recipe(recipe, paths.recipe)
    if recipe.teacher.model == BUILD_TEACHER:
        build_teacher(recipe, paths.teacher, reuse_stale=reuse_stale)


def load_teacher(recipe: Recipe, paths: RunPaths) -> tuple[Any, Any, str]:
    """The original teacher (frozen, in eval mode, on this process's device unless ZeRO-3 shards it), its tokenizer
    and its path."""
    from transformers import AutoTokenizer

    teacher_path, tokenizer_path = teacher_paths(recipe, paths.teacher)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    teacher = load_model(teacher_path, dtype=getattr(torch, recipe.teacher.dtype),  # its own family's class
                         revision=recipe.teacher.revision)
    teacher.requires_grad_(False).eval()
    check_tokenizer_vocabulary(tokenizer, teacher.config.vocab_size)
    if not is_deepspeed_zero3_enabled():  # ZeRO-3 keeps the teacher sharded; the trainer places it
        teacher.to(run_device(recipe))
    return teacher, tokenizer, teacher_path


def cache_train_set(teacher, train, distillation, cache_root: str, pad_token_id: int = 0, batch_size: int = 8):
    """The cache `distillation.kd_loss` reads on the train blocks: `<cache_root>/train-samples` (teacher samples)
    for "sampled", `<cache_root>/train` (top-k) for "topk" / "topk_tail"."""
    from .distillation import cache_teacher_samples, cache_teacher_topk

    common = {"pad_token_id": pad_token_id, "batch_size": batch_size}
    if distillation.kd_loss == "sampled":
        return cache_teacher_samples(teacher, train, num_samples=distillation.kd_samples,
                                     temperature=distillation.temperature,
                                     output_dir=os.path.join(cache_root, "train-samples"), **common)
    return cache_teacher_topk(teacher, train, top_k=distillation.top_k, output_dir=os.path.join(cache_root, "train"),
                              **common)


def cache_teacher(run: Run) -> None:
    """With `distillation.cache_teacher`, add what the loss reads from the original teacher to the train blocks
    (samples or top-k, see `cache_train_set`) and its top-k to the eval blocks, computed once for every stage in
    OUTPUT_DIR/teacher_cache/; the trainers then train without a teacher forward."""
    from .distillation import cache_teacher_topk

    if not run.recipe.distillation.cache_teacher:
        return
    top_k, pad_token_id = run.recipe.distillation.top_k, run.tokenizer.pad_token_id or 0
    # every process builds its share of the shards (one process: all of them); the main one joins and saves them
    run.train = cache_train_set(run.teacher, run.train, run.recipe.distillation, run.paths.teacher_cache,
                                pad_token_id=pad_token_id)
    if run.eval_set is not None:  # evaluation reads the top-k (eval_kl)
        run.eval_set = cache_teacher_topk(run.teacher, run.eval_set, top_k=top_k, pad_token_id=pad_token_id,
                                          output_dir=os.path.join(run.paths.teacher_cache, "eval"))


def start_trajectory(run: Run) -> None:
    """The trajectory's first point, the teacher against itself (evaluated once, kept in teacher_eval.json), and the
    teacher's sizes every stage.json records."""
    config, paths = run.teacher.config, run.paths
    if os.path.isfile(paths.teacher_eval):
        metrics = read_json(paths.teacher_eval)
    else:
        scratch = os.path.join(paths.output_dir, ".teacher-eval")
        metrics = evaluate_only(run.teacher, run.online_teacher, run.eval_set, run.recipe, scratch, run.tokenizer) or {}
        if run.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
            write_json(paths.teacher_eval, metrics)
    name = run.recipe.teacher.model if run.recipe.teacher.model != BUILD_TEACHER else run.teacher_path
    total, active = count_parameters(config)
    run.trajectory = {
        "teacher": {"name": name, "num_parameters": total, "num_active_parameters": active},
        "points": [point(0, 0, 0, config, metrics)],
    }
    arch = get_architecture(config)
    run.teacher_summary = {name: getattr(config, name) for name in (
        "num_attention_heads", "num_key_value_heads", "num_hidden_layers")}
    run.teacher_summary.update(intermediate_size=arch.expert_width_of(config),  # the expert width, any family
                               num_local_experts=arch.num_experts_of(config),
                               num_experts_per_tok=arch.top_k_of(config), model_type=config.model_type,
                               num_parameters=total, num_active_parameters=active)


def start_run(recipe: Recipe, paths: RunPaths, args, record: dict, reuse_stale: bool = False) -> Run:
    """Everything the stages share, made or read back from OUTPUT_DIR: the resolved recipe, the (built) teacher and
    its tokenizer, the data blocks, the teacher cache and the trajectory's teacher point. `args` are the run's
    training arguments; work every process would repeat (teacher build, cache, scores) runs on the main one first."""
    with args.main_process_first(desc="preparing the run"):
        prepare_output_dir(recipe, paths, reuse_stale=reuse_stale)
    teacher, tokenizer, teacher_path = load_teacher(recipe, paths)
    blocks = load_blocks(recipe, tokenizer)
    run = Run(recipe, paths, args, teacher, teacher_path, tokenizer, run_device(recipe), train=blocks["train"],
              eval_set=blocks["eval"], online_teacher=teacher, record=record, parent=teacher_path)
    cache_teacher(run)
    run.calibration = batches(blocks["calibration"], recipe.scoring.batch_size, tokenizer.pad_token_id or 0)
    start_trajectory(run)
    return run


# ----------------------------------------------------------------------------------------------------- a stage
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
        # FSDP2 over several processes: the parent is loaded into shards and scored sharded (the iterative baseline,
        # which trains the parent itself, is refused under FSDP before any work)
        self.sharded_scoring = (fsdp_requested(run.args) and run.args.world_size > 1
                                and recipe.method != "iterative")
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
            self.model = load_sharded(run.parent, dtype=run.dtype)
        else:
            self.model = load_model(run.parent, dtype=run.dtype).to(run.device)  # the teacher's family

    def score(self) -> None:
        """Sensitivity scores of the model against the original teacher (Eq. 2-4), once per stage: saved in the work
        directory, so a resumed stage prunes to the same model. The iterative baseline scores during `distill`."""
        from .pruning import SensitivityScores, compute_sensitivity

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
        from .pruning import prune_to

        if self.scores is None:
            return
        if self.run.recipe.prune.streaming or is_sharded(self.model):
            self.model = None
            self.model = self.streamed_prune().to(self.run.device)
        else:
            prune_to(self.model, self.config, self.scores)  # any supported family

    def streamed_prune(self):
        """Streaming surgery of the parent checkpoint (the main process, once; a resumed stage reuses it), loaded."""
        from .pruning.streaming import prune_checkpoint

        run, pruned_dir = self.run, os.path.join(self.work_dir, "pruned")
        with run.args.main_process_first(desc="streaming surgery"):
            if not os.path.isfile(os.path.join(pruned_dir, "config.json")):  # renamed into place complete
                source = run.parent
                if not os.path.isdir(source):  # a Hub id: its config and safetensors shards, downloaded once
                    from huggingface_hub import snapshot_download

                    source = snapshot_download(source, revision=run.recipe.teacher.revision)
                shutil.rmtree(pruned_dir, ignore_errors=True)
                prune_checkpoint(source, pruned_dir, self.config, self.scores, card=False)
        return load_model(pruned_dir, dtype=run.dtype)  # SlimMoE for PhiMoE, else the family's own class

    def distill(self) -> None:
        """Distill from the original teacher, continuing from the latest complete checkpoint, with early stopping on
        eval KL in the intermediate stages; the freshly pruned model is evaluated once first."""
        from .distillation import DistillationTrainer

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
        from .pruning.iterative import IterativeMaskCallback

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


# ----------------------------------------------------------------------------------------------------- helpers
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


def write_card(stage_dir: str, final_dir: str) -> None:
    """The card of a stage written in `stage_dir` (its temporary name); its usage snippet loads from `final_dir`."""
    from .hub import write_model_card

    write_model_card(stage_dir, local_dir=final_dir)


def publish(stage_dir: str, recipe: Recipe) -> None:
    if not recipe.hub.get("push_to_hub"):
        return
    from .hub import HubSettings, publish_stage

    if not publish_stage(stage_dir, HubSettings.from_dict(recipe.hub)):
        logger.warning("%s was not published; `slimmoe push %s` publishes it later.", stage_dir, recipe.output_dir)


__all__ = [
    "compress",
    "check",
    "plan_text",
    "RunPaths",
    "Run",
    "StageRunner",
    "is_finished_stage",
    "build_teacher",
    "read_teacher_config",
    "training_args",
]
