"""Compression recipes: the YAML file `slimmoe compress` runs, as dataclasses.

A recipe holds every number of a run (torchtune style: the procedure lives in `loop.py`, the numbers here).
Loading is strict: an unknown key, a wrong type or an impossible value raises `ValueError` naming the dotted key
(`stages.budget.tokens`, `training.learning_rate`, ...) and what to do. Paths may use `{stdlib}` (the Python standard
library's source directory, used by the tiny CPU recipe to have text without downloading anything) and `{recipe_dir}`.

Sections (see `recipes/tiny-cpu.yaml` for a complete, commented example):

    name, method (multi-stage | one-stage | iterative), output_dir, seed
    teacher:        model (path, Hub id, or "build" for a tiny local teacher), tokenizer, architecture, license, build
    data:           train / eval / calibration sources, block_size, numbers of examples
    stages:         target + num_stages (geometric schedule) or explicit sizes; per-stage token or step budgets
    early_stopping: patience and min_delta on eval KL (never applied to the final stage)
    scoring:        sensitivity criterion, top_k, batch size
    prune:          streaming (cut the parent checkpoint on disk tensor by tensor instead of in memory)
    distillation:   kd_loss, kd_samples, top_k, temperature, renormalize, aux_loss_coef, ce_weight, kd_chunk_size,
                    kd_chunk_bytes, cache_teacher
    training:       any `transformers.TrainingArguments` field (optimizer, schedule, batch, logging ...)
    iterative:      the iterative-pruning baseline's mask schedule
    hub:            push_to_hub, repo_id, layout, private (see `hf_slimmoe.hub.HubSettings`)
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import yaml

from ..distillation.settings import DistillationSettings
from ..utils.config_io import merge_settings, read_yaml_mapping

METHODS = ("multi-stage", "one-stage", "iterative")
BUILD_TEACHER = "build"


# ------------------------------------------------------------------------------------------------------ sections
@dataclass
class TeacherBuild:
    """A tiny teacher made locally (for `teacher.model: build`): a tokenizer trained on local text and a model of any
    supported family briefly trained with the causal LM loss on `data.train`. It is cached under
    `OUTPUT_DIR/teacher/`."""

    # The family's configuration fields; `model_type` picks the family (default: SlimMoE, i.e. PhiMoE). The
    # vocabulary size comes from the tokenizer.
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer_files: str | list[str] = "{stdlib}/json/*.py"  # glob(s) of text files the BPE tokenizer is trained on
    vocab_size: int = 512
    pretrain_steps: int = 100  # 0 keeps the random initialisation
    pretrain_learning_rate: float = 3e-3
    pretrain_batch_size: int = 8


@dataclass
class TeacherSettings:
    """The model being compressed. `architecture` (config.json fields) lets `slimmoe plan` run without downloading."""

    model: str = ""  # local path, Hub id, or "build"
    tokenizer: str | None = None  # defaults to `model`
    revision: str | None = None
    license: str | None = None
    architecture: dict[str, Any] | None = None
    build: TeacherBuild | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class DataSource:
    """One dataset: `text_files` (a glob or list of paths, read as text), `disk` (`datasets.load_from_disk`) or
    `hub` (`datasets.load_dataset(path, name, split=split)`). Documents are tokenized and packed into
    `data.block_size` blocks; a dataset that already has an `input_ids` column (packed blocks) is used as is.
    `glob` may be a list of patterns (their matches are joined, each file once, sorted)."""

    type: Literal["text_files", "disk", "hub"] = "text_files"
    paths: list[str] | None = None
    glob: str | list[str] | None = None
    path: str | None = None  # disk directory or Hub dataset id
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    max_examples: int | None = None  # documents read before packing (None: all)


@dataclass
class DataSettings:
    train: DataSource = field(default_factory=DataSource)
    eval: DataSource | None = None  # required for early stopping and eval metrics
    calibration: DataSource | None = None  # defaults to `train`
    block_size: int = 4096
    train_blocks: int | None = None  # packed blocks kept for training (None: all)
    eval_blocks: int | None = None  # packed blocks kept for evaluation (None: all)
    calibration_blocks: int = 16384  # packed blocks used for sensitivity scores (paper: 16K examples)
    num_proc: int | None = None


@dataclass
class StageBudget:
    """Per-stage training budget in tokens or optimizer steps (one entry per stage; one-stage uses their sum)."""

    tokens: list[int] | None = None
    steps: list[int] | None = None


@dataclass
class StageSettings:
    num_stages: int | None = None
    # expert width (`expert_width` or the family's field: intermediate_size / moe_intermediate_size), num_key_value_heads,
    # shared_expert_width (families with shared experts); num_attention_heads as a check
    target: dict[str, int] | None = None
    sizes: list[dict[str, int]] | None = None  # pinned per-stage sizes; the last is the target
    expert_multiple: int = 64
    budget: StageBudget = field(default_factory=StageBudget)
    # multi-stage learning rate: `restart` runs `training.lr_scheduler_type` (with its warmup) anew in every stage;
    # `continue` runs one schedule over the stages' summed steps, warmup once, each stage taking up where the last left
    lr_schedule: Literal["restart", "continue"] = "restart"


@dataclass
class EarlyStopping:
    """Stop an intermediate stage when eval KL has not improved by more than `min_delta` for `patience` evaluations."""

    enabled: bool = True
    patience: int = 3
    min_delta: float = 0.0


@dataclass
class ScoringSettings:
    criterion: Literal["kd", "clm"] = "kd"
    top_k: int = 8
    batch_size: int = 1


@dataclass
class PruneSettings:
    """How each stage's one-shot prune runs: `streaming: true` cuts the parent checkpoint on disk tensor by tensor
    (`hf_slimmoe.pruning.streaming`, memory of about one tensor; the way to prune under FSDP, where no process holds
    the whole model) and loads the result; `false` slices the model in memory (`prune_to`). Both give the same model."""

    streaming: bool = False


@dataclass
class RecipeDistillation(DistillationSettings):
    """The KD objective: the fields of [`DistillationSettings`] (declared once for recipes, `DistillationConfig` and
    `SFTDistillationConfig`, same names and defaults), plus `cache_teacher`: the train cache is the kind the loss reads
    (samples or top-k), cached once under OUTPUT_DIR/teacher_cache/; the eval cache is always the top-k."""

    cache_teacher: bool = False


@dataclass
class IterativeSettings:
    """Iterative-pruning baseline: masks grow during distillation of the full-size model, every `mask_every_steps`,
    reaching the target at `target_fraction` of the budget (default: where multi-stage's last stage would start)."""

    mask_every_steps: int = 10
    target_fraction: float | None = None


@dataclass
class Recipe:
    name: str = ""
    method: Literal["multi-stage", "one-stage", "iterative"] = "multi-stage"
    output_dir: str = ""
    seed: int = 42
    global_batch_size: int | None = None  # sequences per optimizer step; sets gradient_accumulation_steps at launch
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    data: DataSettings = field(default_factory=DataSettings)
    stages: StageSettings = field(default_factory=StageSettings)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    distillation: RecipeDistillation = field(default_factory=RecipeDistillation)
    training: dict[str, Any] = field(default_factory=dict)
    iterative: IterativeSettings = field(default_factory=IterativeSettings)
    hub: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, metadata={"internal": True})  # the YAML file it was read from

    # -------------------------------------------------------------------------------------------- derived values
    @property
    def directory(self) -> str | None:
        """The directory of the YAML file the recipe was read from (`{recipe_dir}`); None for a recipe made in code."""
        return os.path.dirname(self.source) if self.source else None

    def teacher_config(self):
        """The teacher's configuration from the recipe alone (`teacher.architecture` or `teacher.build.config`; its
        `model_type` picks the family, SlimMoE / PhiMoE by default), or None when only the checkpoint knows it."""
        values = self.teacher.architecture
        if values is None and self.teacher.build is not None:
            values = {"vocab_size": self.teacher.build.vocab_size, **self.teacher.build.config}
        if values is None:
            return None
        key = "teacher.architecture" if self.teacher.architecture is not None else "teacher.build.config"
        try:
            from ..architectures import config_from_dict

            return config_from_dict(values)  # model_type picks the family (default: SlimMoE / PhiMoE)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}: {e}") from None

    def stage_configs(self, teacher_config) -> list:
        """The configurations the method prunes into, in order (one-stage: only the target; iterative: the target)."""
        from ..pruning.schedule import pinned_stages, plan_stages

        s = self.stages
        if s.sizes is not None:
            stages = pinned_stages(teacher_config, s.sizes)
        else:
            target = _target_config(teacher_config, s.target)
            stages = plan_stages(teacher_config, target, s.num_stages, expert_multiple=s.expert_multiple)
        return stages if self.method == "multi-stage" else stages[-1:]

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        """Accumulation steps for `world_size` processes: from `global_batch_size` when set, else `training`."""
        per_device = self.training.get("per_device_train_batch_size", 8)
        if self.global_batch_size is None:
            return self.training.get("gradient_accumulation_steps", 1)
        if self.global_batch_size % (per_device * world_size):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of training.per_device_train_batch_size"
                f" ({per_device}) x {world_size} processes; change one of them."
            )
        return self.global_batch_size // (per_device * world_size)

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Training tokens per optimizer step (with `global_batch_size` it does not depend on `world_size`)."""
        if self.global_batch_size is not None:
            return self.global_batch_size * self.data.block_size
        return (self.data.block_size * self.training.get("per_device_train_batch_size", 8)
                * self.gradient_accumulation_steps(world_size) * world_size)

    def stage_steps(self, world_size: int = 1) -> list[int]:
        """Optimizer steps of each stage the method runs (one-stage and iterative: one run with the total budget)."""
        b = self.stages.budget
        if b.steps is not None:
            steps = list(b.steps)
        else:
            per_step = self.tokens_per_step(world_size)
            steps = [max(1, math.ceil(tokens / per_step)) for tokens in b.tokens]
        return steps if self.method == "multi-stage" else [sum(steps)]

    def planned_num_stages(self) -> int:
        return len(self.stages.sizes) if self.stages.sizes is not None else self.stages.num_stages


def _target_config(teacher_config, target: dict[str, int]):
    from ..pruning.schedule import pinned_stages, size_keys

    allowed = size_keys(teacher_config)
    unknown = sorted(set(target) - set(allowed))
    if unknown:
        raise ValueError(f"stages.target has unknown key(s) {unknown}; allowed for {teacher_config.model_type}: "
                         f"{', '.join(allowed)}.")
    try:
        return pinned_stages(teacher_config, [target])[0]
    except ValueError as e:
        raise ValueError(str(e).replace("stages.sizes[0] (stage 1)", "stages.target").replace(
            "stages.sizes[0]", "stages.target")) from None


# ------------------------------------------------------------------------------------------------------ loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """Check and convert one YAML value against a type hint; raise ValueError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of "
                         f"{' | '.join(_type_name(o) for o in options)}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in typing.get_args(tp))}.")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}.")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}.")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}.")
        _, item = typing.get_args(tp)
        return {k: _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():  # YAML 4.0e11 for a token budget
                return int(value)
            raise ValueError(f"{key}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ValueError(f"{key}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported recipe field type {tp} at {key}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(
            f"unknown recipe key(s) {', '.join(where + k for k in unknown)}; "
            f"allowed under {prefix or 'the top level'}: {', '.join(fields)}."
        )
    kwargs = {name: _convert(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    return cls(**kwargs)


def _positive(value, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}.")


def _check_training(training: dict[str, Any]) -> None:
    """`training:` holds `TrainingArguments` fields; keys the pipeline sets itself or that do not exist are refused."""
    from transformers import TrainingArguments

    owned = {"output_dir", "max_steps", "num_train_epochs", "eval_strategy", "save_strategy", "load_best_model_at_end",
             "metric_for_best_model", "greater_is_better", "resume_from_checkpoint", "seed", "push_to_hub"}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in training:
        if key in owned:
            raise ValueError(f"training.{key} is set by the pipeline (stage budgets, early stopping, output "
                             f"directory, seed, hub); remove it from the recipe.")
        if key not in names:
            raise ValueError(f"unknown recipe key training.{key}: not a transformers.TrainingArguments field.")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "eval_steps", "logging_steps", "save_steps"):
        if key in training and (isinstance(training[key], bool) or not isinstance(training[key], (int, float))
                                or training[key] <= 0):
            raise ValueError(f"training.{key} must be a positive number, got {training[key]!r}.")
    if "learning_rate" in training:
        try:
            lr = float(training["learning_rate"])
        except (TypeError, ValueError):
            raise ValueError(f"training.learning_rate must be a number, got {training['learning_rate']!r}.") from None
        if lr <= 0:
            raise ValueError(f"training.learning_rate must be positive, got {lr}.")
        training["learning_rate"] = lr


def _check_distillation(k: RecipeDistillation) -> None:
    try:
        k.check_kd_settings()
    except ValueError as error:
        raise ValueError(f"distillation.{error}") from None
    if k.kd_loss == "full" and k.cache_teacher:
        raise ValueError("distillation.kd_loss: full computes the full-vocabulary KL from the teacher's logits, so it "
                         "needs the teacher online: set distillation.cache_teacher: false, or use kd_loss: sampled.")


def validate(recipe: Recipe) -> Recipe:
    """Check the values of a parsed recipe against each other; raise ValueError naming the key."""
    if not recipe.name:
        raise ValueError("name is missing: give the recipe a name (it is recorded in every stage.json).")
    if not recipe.output_dir:
        raise ValueError("output_dir is missing: say where stages, checkpoints and trajectory.json go.")
    t = recipe.teacher
    if not t.model:
        raise ValueError("teacher.model is missing: give a local checkpoint path, a Hub id, or 'build'.")
    if (t.model == BUILD_TEACHER) != (t.build is not None):
        raise ValueError("teacher.build is required exactly when teacher.model is 'build' "
                         f"(got teacher.model={t.model!r}, teacher.build {'set' if t.build else 'missing'}).")
    if t.build is not None:
        _positive(t.build.vocab_size, "teacher.build.vocab_size")
        _positive(t.build.pretrain_steps, "teacher.build.pretrain_steps", allow_zero=True)
        if "vocab_size" in t.build.config:
            raise ValueError("teacher.build.config.vocab_size: the vocabulary size comes from the tokenizer; "
                             "set teacher.build.vocab_size instead.")
    d = recipe.data
    _positive(d.block_size, "data.block_size")
    _positive(d.train_blocks, "data.train_blocks")
    _positive(d.eval_blocks, "data.eval_blocks")
    _positive(d.calibration_blocks, "data.calibration_blocks")
    for name in ("train", "eval", "calibration"):
        src = getattr(d, name)
        if src is None:
            continue
        key = f"data.{name}"
        if src.type == "text_files" and not (src.paths or src.glob):
            raise ValueError(f"{key}: type text_files needs `paths` or `glob`.")
        if src.type in ("disk", "hub") and not src.path:
            raise ValueError(f"{key}: type {src.type} needs `path` (a directory or a Hub dataset id).")
        _positive(src.max_examples, f"{key}.max_examples")
    s = recipe.stages
    if s.sizes is None:
        if s.target is None or s.num_stages is None:
            raise ValueError("stages: give either `sizes` (explicit per-stage sizes) or both `target` and "
                             "`num_stages`.")
        _positive(s.num_stages, "stages.num_stages")
    elif s.num_stages is not None and s.num_stages != len(s.sizes):
        raise ValueError(f"stages.num_stages={s.num_stages} but stages.sizes lists {len(s.sizes)} stages.")
    _positive(s.expert_multiple, "stages.expert_multiple")
    n = recipe.planned_num_stages()
    b = s.budget
    if (b.tokens is None) == (b.steps is None):
        raise ValueError("stages.budget: give exactly one of `tokens` or `steps` (one entry per stage).")
    values, unit = (b.tokens, "tokens") if b.tokens is not None else (b.steps, "steps")
    if len(values) != n:
        raise ValueError(f"stages.budget.{unit} has {len(values)} entries for {n} stages; give one per stage.")
    for i, v in enumerate(values):
        _positive(v, f"stages.budget.{unit}[{i}]")
    e = recipe.early_stopping
    _positive(e.patience, "early_stopping.patience")
    _positive(e.min_delta, "early_stopping.min_delta", allow_zero=True)
    if e.enabled and d.eval is None and recipe.method == "multi-stage" and n > 1:
        raise ValueError("early_stopping.enabled needs data.eval (eval KL decides when a stage stops); add an eval "
                         "set or set early_stopping.enabled: false.")
    _positive(recipe.scoring.top_k, "scoring.top_k")
    _positive(recipe.scoring.batch_size, "scoring.batch_size")
    _check_distillation(recipe.distillation)
    _positive(recipe.iterative.mask_every_steps, "iterative.mask_every_steps")
    f = recipe.iterative.target_fraction
    if f is not None and not 0 < f <= 1:
        raise ValueError(f"iterative.target_fraction must be in (0, 1], got {f}.")
    _check_training(recipe.training)
    _positive(recipe.global_batch_size, "global_batch_size")
    if recipe.global_batch_size is not None and "gradient_accumulation_steps" in recipe.training:
        raise ValueError("training.gradient_accumulation_steps and global_batch_size are both set; keep one "
                         "(global_batch_size derives the accumulation from the number of processes).")
    _check_hub(recipe.hub)
    return recipe


def _check_hub(hub: dict[str, Any]):
    """Parse the `hub:` section with `hf_slimmoe.hub.HubSettings`, naming the key on error."""
    try:
        from ..hub import HubSettings
    except ImportError:  # the hub module is optional for planning; publishing checks again
        return None
    names = {f.name for f in dataclasses.fields(HubSettings)}
    unknown = sorted(set(hub) - names)
    if unknown:
        raise ValueError(f"unknown recipe key(s) {', '.join('hub.' + k for k in unknown)}; "
                         f"allowed under hub: {', '.join(sorted(names))}.")
    try:
        return HubSettings(**hub)
    except (TypeError, ValueError) as e:
        raise ValueError(f"hub: {e}") from None


def recipe_from_dict(values: dict, source: str | None = None) -> Recipe:
    """Parse and validate a recipe given as a dict (what the YAML file holds)."""
    if not isinstance(values, dict):
        raise ValueError(f"a recipe must be a mapping of sections, got {type(values).__name__}.")
    recipe = _build(Recipe, values)
    recipe.source = source
    return validate(recipe)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read, parse and validate a recipe YAML file. `{recipe_dir}` in paths becomes the file's directory."""
    path = os.fspath(path)
    values = read_yaml_mapping(path, what="recipe file")
    try:
        return recipe_from_dict(values, source=os.path.abspath(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain values with every default filled in (the `hub:` section through `HubSettings` too)."""
    values = dataclasses.asdict(recipe)
    values.pop("source", None)
    hub = _check_hub(recipe.hub)
    if hub is not None:
        values["hub"] = dataclasses.asdict(hub)
    return values


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (every default filled in) as YAML; `slimmoe push OUTPUT_DIR` reads its hub section."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe_to_dict(recipe), f, sort_keys=False)


# ------------------------------------------------------------------------------------------------------ the demo
DEMO_RECIPE = "demo.yaml"  # packaged in hf_slimmoe/recipes/


def demo_settings(fast: bool = False) -> dict:
    """The packaged demo recipe as a dict of sections `compress`, `sft`, `dpo`, `eval` (with `fast` merged in)."""
    text = resources.files("hf_slimmoe").joinpath("recipes", DEMO_RECIPE).read_text(encoding="utf-8")
    values = yaml.safe_load(text)
    fast_overrides = values.pop("fast", {}) or {}
    return merge_settings(values, fast_overrides) if fast else values


__all__ = [
    "Recipe",
    "load_recipe",
    "recipe_from_dict",
    "save_recipe",
    "recipe_to_dict",
    "METHODS",
    "demo_settings",
]
