"""What the stages of a compression run share, made or read back from OUTPUT_DIR by `start_run`: the resolved recipe,
the original teacher and its tokenizer, the data blocks, the teacher cache and the trajectory's teacher point (a `Run`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..architectures import count_parameters, get_architecture, load_model, load_sharded
from ..utils.data import batches
from ..utils.distributed import fsdp_requested
from ..utils.modeling import check_tokenizer_vocabulary
from ..utils.outputs import read_json, write_json
from .plan import training_args, world_size
from .recipe import BUILD_TEACHER, Recipe, save_recipe
from .resume import RunPaths
from .sources import load_blocks
from .teacher import build_teacher, teacher_paths
from .trajectory import point

logger = logging.getLogger(__name__)


def evaluate_only(model, teacher, eval_dataset, recipe: Recipe, output_dir: str, tokenizer) -> dict | None:
    """`DistillationTrainer.evaluate()` of `model` against the teacher (online or cached) without training."""
    from ..distillation import DistillationTrainer

    if eval_dataset is None:
        return None
    args = training_args(recipe, output_dir, max_steps=1, early_stopping=False)
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, eval_dataset=eval_dataset,
                                  processing_class=tokenizer)
    return trainer.evaluate()


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


def loads_into_shards(recipe: Recipe, args) -> bool:
    """Whether the teacher and each stage's parent are loaded into FSDP2 shards (`load_sharded`: rank 0 reads the
    checkpoint, every other rank holds only its shards): FSDP2 over several processes. The iterative baseline, which
    trains the parent itself, is refused under FSDP before any work."""
    return fsdp_requested(args) and args.world_size > 1 and recipe.method != "iterative"


def load_teacher(recipe: Recipe, paths: RunPaths, sharded: bool = False) -> tuple[Any, Any, str]:
    """The original teacher (frozen, in eval mode, on this process's device unless ZeRO-3 or, with `sharded`, FSDP2
    shards it), its tokenizer and its path. Every use of a sharded teacher (caching, evaluation, scoring, online
    targets) runs its forwards in lockstep on every rank."""
    from transformers import AutoTokenizer

    teacher_path, tokenizer_path = teacher_paths(recipe, paths.teacher)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    dtype = getattr(torch, recipe.teacher.dtype)
    if sharded:
        teacher = load_sharded(teacher_path, dtype=dtype, device=run_device(recipe), revision=recipe.teacher.revision)
        logger.info("The teacher is loaded into FSDP2 shards on rank %d", torch.distributed.get_rank())
    else:
        teacher = load_model(teacher_path, dtype=dtype, revision=recipe.teacher.revision)  # its own family's class
    teacher.requires_grad_(False).eval()
    check_tokenizer_vocabulary(tokenizer, teacher.config.vocab_size)
    if not (sharded or is_deepspeed_zero3_enabled()):  # ZeRO-3 keeps the teacher sharded; the trainer places it
        teacher.to(run_device(recipe))
    return teacher, tokenizer, teacher_path


def cache_train_set(teacher, train, distillation, cache_root: str, pad_token_id: int = 0, batch_size: int = 8):
    """The cache `distillation.kd_loss` reads on the train blocks: `<cache_root>/train-samples` (teacher samples)
    for "sampled", `<cache_root>/train` (top-k) for "topk" / "topk_tail"."""
    from ..distillation import cache_teacher_samples, cache_teacher_topk

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
    from ..distillation import cache_teacher_topk

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
    teacher, tokenizer, teacher_path = load_teacher(recipe, paths, sharded=loads_into_shards(recipe, args))
    blocks = load_blocks(recipe, tokenizer)
    run = Run(recipe, paths, args, teacher, teacher_path, tokenizer, run_device(recipe), train=blocks["train"],
              eval_set=blocks["eval"], online_teacher=teacher, record=record, parent=teacher_path)
    cache_teacher(run)
    run.calibration = batches(blocks["calibration"], recipe.scoring.batch_size, tokenizer.pad_token_id or 0)
    start_trajectory(run)
    return run


__all__ = [
    "Run",
    "start_run",
    "evaluate_only",
    "run_device",
    "prepare_output_dir",
    "loads_into_shards",
    "load_teacher",
    "cache_train_set",
    "cache_teacher",
    "start_trajectory",
]
