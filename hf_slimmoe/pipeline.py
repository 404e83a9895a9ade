"""The SlimMoE stage loop: score -> prune -> distill -> save -> card -> push, resumable at every point.

`compress(recipe)` reads top to bottom like the paper's Section 3.2:

    teacher = the original model (never changes)
    for each stage size (from `plan_stages` or pinned in the recipe):
        model  = the previous stage's model (the teacher for stage 1)
        scores = compute_sensitivity(model, calibration batches, teacher)       # Eq. 2-4
        model.prune_to(stage size, scores)                                      # one-shot prune
        DistillationTrainer(model, teacher).train()                            # top-k KD from the original teacher,
                                                                               # early-stopped on eval KL (not last)
        save OUTPUT_DIR/stage-i/ (a Hub-ready repo + scores + stage.json + trajectory.json + card); publish

Everything a run writes is on disk, and the disk is the truth when the same command runs again:

    OUTPUT_DIR/recipe.yaml          the resolved recipe
    OUTPUT_DIR/trajectory.json      every evaluation so far (tokens, parameter counts, eval KL / perplexity / top-1)
    OUTPUT_DIR/teacher/             the locally built teacher (`teacher.model: build` only)
    OUTPUT_DIR/teacher_cache/       the teacher's top-k on the train / eval blocks (`distillation.cache_teacher`)
    OUTPUT_DIR/.stage-i.work/       the running stage: scores.safetensors, pruned_eval.json, checkpoints/checkpoint-N
    OUTPUT_DIR/.stage-i.tmp/        a stage being written; renamed to stage-i/ when complete
    OUTPUT_DIR/stage-i/             a finished stage: never recomputed

A finished `stage-i/` is skipped; a running stage re-uses its saved scores (so it prunes to the same model) and
continues from its latest complete Trainer checkpoint. The baselines of the paper's Section 4.2 share the loop:
`one-stage` prunes straight to the target and distills with the total budget; `iterative` distills the full-size
model while masks grow towards the target, then prunes physically once (see `IterativeMaskCallback`).
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import logging
import os
import shutil
from dataclasses import dataclass

import torch
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .architectures import SLIMMOE_TYPES, config_from_dict, count_parameters, get_architecture, load_model, new_model
from .configuration_slimmoe import SlimMoeConfig
from .recipe import BUILD_TEACHER, DataSource, Recipe, expand_path, save_recipe
from .schedule import format_plan, human_count

logger = logging.getLogger(__name__)

_ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "head_dim")  # + the family's expert width, expert count and top-k fields


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


def world_size() -> int:
    """Number of training processes (`WORLD_SIZE`, set by `accelerate launch` / `torchrun`; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_finished_stage(directory: str) -> bool:
    """A stage directory is finished when it exists under its final name with stage.json, config.json and weights
    (stage directories are only ever renamed into place once complete)."""
    return (os.path.isfile(os.path.join(directory, "stage.json"))
            and os.path.isfile(os.path.join(directory, "config.json"))
            and os.path.isfile(os.path.join(directory, "model.safetensors")))


def _recipe_dir(recipe: Recipe) -> str | None:
    return os.path.dirname(recipe.source) if recipe.source else None


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------- data
def _source_files(source: DataSource, key: str, recipe_dir: str | None) -> list[str]:
    if source.glob is not None:
        patterns = [source.glob] if isinstance(source.glob, str) else list(source.glob)
        files = set()
        for pattern in patterns:
            expanded = expand_path(pattern, recipe_dir)
            matches = globlib.glob(expanded, recursive=True)
            if not matches:
                raise FileNotFoundError(f"{key}.glob {pattern!r} ({expanded}) matches no file.")
            files.update(matches)
        files = sorted(files)
    else:
        files = [expand_path(p, recipe_dir) for p in source.paths]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{key}.paths: no such file(s): {', '.join(missing[:5])}.")
    return files


def check_source(source: DataSource, key: str, recipe_dir: str | None) -> None:
    """Raise when a local data source does not exist (Hub datasets are only checked when loaded)."""
    if source.type == "text_files":
        _source_files(source, key, recipe_dir)
    elif source.type == "disk" and not os.path.isdir(expand_path(source.path, recipe_dir)):
        raise FileNotFoundError(f"{key}.path {source.path!r} is not a directory saved with datasets.save_to_disk.")


def read_source(source: DataSource, key: str, recipe_dir: str | None):
    """A `datasets.Dataset` of documents with the column `source.text_field` (or of pre-tokenized `input_ids`)."""
    import datasets

    if source.type == "text_files":
        texts = []
        for path in _source_files(source, key, recipe_dir):
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        dataset = datasets.Dataset.from_dict({source.text_field: texts})
    elif source.type == "disk":
        dataset = datasets.load_from_disk(expand_path(source.path, recipe_dir))
        if isinstance(dataset, datasets.DatasetDict):
            if source.split not in dataset:
                raise ValueError(f"{key}.split {source.split!r} is not in {source.path} (splits: {list(dataset)}).")
            dataset = dataset[source.split]
    else:
        dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    if source.text_field not in dataset.column_names and "input_ids" not in dataset.column_names:
        raise ValueError(f"{key}.text_field {source.text_field!r} is not a column of {source.path or source.glob} "
                         f"(columns: {dataset.column_names}).")
    if source.max_examples is not None:
        dataset = dataset.select(range(min(source.max_examples, len(dataset))))
    return dataset


def pack(dataset, tokenizer, block_size: int, text_field: str, num_proc: int | None = None):
    """Tokenize documents, join them with EOS and cut the stream into `input_ids` blocks of `block_size` tokens
    (the remainder of each map batch is dropped)."""
    eos = tokenizer.eos_token_id

    def _pack(batch):
        stream = []
        for ids in tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i:i + block_size] for i in range(0, usable, block_size)]}

    return dataset.map(_pack, batched=True, batch_size=1000, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc=f"Packing into {block_size}-token blocks")


def load_blocks(recipe: Recipe, tokenizer) -> dict:
    """Packed `train`, `eval` (or None) and `calibration` datasets, each a column `input_ids`."""
    d, recipe_dir = recipe.data, _recipe_dir(recipe)
    blocks = {}
    for name in ("train", "eval", "calibration"):
        source = getattr(d, name)
        if source is None:
            blocks[name] = blocks["train"] if name == "calibration" else None
            continue
        dataset = read_source(source, f"data.{name}", recipe_dir)
        if "input_ids" in dataset.column_names:  # pre-tokenized blocks (e.g. a packed load_from_disk dataset): as is
            dataset = dataset.select_columns(["input_ids"])
        else:
            dataset = pack(dataset, tokenizer, d.block_size, source.text_field, d.num_proc)
        if len(dataset) == 0:
            raise ValueError(f"data.{name} gives no block of data.block_size={d.block_size} tokens; add text or "
                             "lower data.block_size.")
        blocks[name] = dataset
    if d.train_blocks is not None:
        blocks["train"] = blocks["train"].select(range(min(d.train_blocks, len(blocks["train"]))))
        if d.calibration is None:
            blocks["calibration"] = blocks["train"]
    if blocks["eval"] is not None and d.eval_blocks is not None:
        blocks["eval"] = blocks["eval"].select(range(min(d.eval_blocks, len(blocks["eval"]))))
    blocks["calibration"] = blocks["calibration"].select(range(min(d.calibration_blocks, len(blocks["calibration"]))))
    logger.info("Data: %d train, %s eval, %d calibration blocks of %d tokens", len(blocks["train"]),
                len(blocks["eval"]) if blocks["eval"] is not None else "no", len(blocks["calibration"]), d.block_size)
    return blocks


def calibration_batches(dataset, batch_size: int) -> list[dict]:
    ids = torch.tensor(dataset["input_ids"], dtype=torch.long)
    return [{"input_ids": ids[i:i + batch_size]} for i in range(0, len(ids), batch_size)]


# ----------------------------------------------------------------------------------------------------- teacher
def _train_tokenizer(files: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on local text files, with `<|endoftext|>` as BOS, EOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train(files, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special, pad_token=special)


def _pretrain(model, dataset, build, seed: int, pad_token_id: int) -> None:
    """Causal-LM pre-training of the built teacher: AdamW, cosine decay, gradient clipping at 1, shuffled epochs.

    A plain loop on this process alone, not a Trainer: under `torchrun` / `accelerate launch` the teacher is built by
    the main process while the others wait, and a Trainer would wrap the model in DDP and wait for them forever.
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from .distillation import DistillationCollator

    collate = DistillationCollator(pad_token_id=pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=build.pretrain_learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 0, build.pretrain_steps)
    device = next(model.parameters()).device
    order: list[int] = []
    model.train()
    for _ in tqdm(range(build.pretrain_steps), desc="Pre-training the teacher", unit="step"):
        if len(order) < build.pretrain_batch_size:  # a new shuffled epoch
            order += torch.randperm(len(dataset), generator=generator).tolist()
        rows, order = order[:build.pretrain_batch_size], order[build.pretrain_batch_size:]
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in rows]).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    logger.info("Teacher pre-training: last batch loss %.3f", loss.item())


def build_teacher(recipe: Recipe, directory: str) -> str:
    """Make the tiny local teacher of `teacher.build` in `directory` (once; reused when complete) and return it.

    A byte-level BPE tokenizer is trained on `teacher.build.tokenizer_files`, a model of the family of
    `teacher.build.config` (`model_type`, SlimMoE by default) is initialised with it (seeded by `seed`) and trained for `pretrain_steps` with the causal LM loss on
    `data.train`, so that distilling from it is meaningful.
    """
    if is_finished_stage(directory) or (os.path.isfile(os.path.join(directory, "config.json"))
                                        and os.path.isfile(os.path.join(directory, "tokenizer.json"))):
        logger.info("Using the teacher built earlier in %s", directory)
        return directory
    b = recipe.teacher.build
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    files = _source_files(DataSource(glob=b.tokenizer_files), "teacher.build.tokenizer_files", _recipe_dir(recipe))
    logger.info("Building the teacher: tokenizer (vocab %d) on %d files, then %d causal-LM steps", b.vocab_size,
                len(files), b.pretrain_steps)
    tokenizer = _train_tokenizer(files, b.vocab_size)
    if len(tokenizer) > b.vocab_size:
        raise ValueError(f"teacher.build.vocab_size={b.vocab_size} is smaller than the trained tokenizer "
                         f"({len(tokenizer)} tokens).")
    torch.manual_seed(recipe.seed)
    config = recipe.teacher_config()
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    model = new_model(config)
    if b.pretrain_steps > 0:
        train = load_blocks(recipe, tokenizer)["train"]
        device = "cpu" if recipe.training.get("use_cpu", False) or not torch.cuda.is_available() else "cuda"
        _pretrain(model.to(device), train, b, recipe.seed, tokenizer.pad_token_id)
        model.to("cpu")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    logger.info("Saved the built teacher (%s parameters) to %s", human_count(count_parameters(config)[0]), directory)
    return directory


def _is_local(path: str) -> bool:
    return os.path.isdir(expand_path(path))


def read_teacher_config(recipe: Recipe, offline_ok: bool = False):
    """The teacher's configuration (any supported family): from `teacher.architecture` / `teacher.build`, checked
    against the checkpoint's config.json when it can be read (a local path, or the Hub unless offline)."""
    from .architectures import SUPPORTED_MODEL_TYPES

    declared = recipe.teacher_config()
    if recipe.teacher.model == BUILD_TEACHER:
        return declared
    from transformers import PretrainedConfig

    model = expand_path(recipe.teacher.model, _recipe_dir(recipe))
    if not _is_local(model) and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise FileNotFoundError(f"teacher.model {recipe.teacher.model!r} is neither a directory nor a Hub id.")
    try:
        values, _ = PretrainedConfig.get_config_dict(model, revision=recipe.teacher.revision)
    except (OSError, ValueError) as e:
        if declared is not None and offline_ok:
            logger.warning("Could not read the teacher's config.json (%s); using teacher.architecture instead.",
                           str(e).splitlines()[0])
            return declared
        raise FileNotFoundError(
            f"teacher.model {recipe.teacher.model!r}: cannot read its config.json ({e}).") from None
    if values.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"teacher.model {recipe.teacher.model!r} has model_type {values.get('model_type')!r}; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    actual = config_from_dict(values)
    if declared is not None:
        arch = get_architecture(actual)
        if get_architecture(declared).stock_model_type != arch.stock_model_type:
            raise ValueError(f"teacher.architecture.model_type={declared.model_type!r} but the checkpoint "
                             f"{recipe.teacher.model} has {actual.model_type!r}; fix the recipe.")
        for name in (*_ARCHITECTURE_FIELDS, arch.expert_width, arch.num_experts, arch.top_k):
            if getattr(declared, name, None) != getattr(actual, name, None):
                raise ValueError(f"teacher.architecture.{name}={getattr(declared, name, None)} but the checkpoint "
                                 f"{recipe.teacher.model} has {getattr(actual, name, None)}; fix the recipe.")
    return actual


def _teacher_paths(recipe: Recipe, paths: RunPaths) -> tuple[str, str]:
    if recipe.teacher.model == BUILD_TEACHER:
        return paths.teacher, paths.teacher
    model = recipe.teacher.model
    model = expand_path(model, _recipe_dir(recipe)) if _is_local(expand_path(model, _recipe_dir(recipe))) else model
    tokenizer = recipe.teacher.tokenizer or model
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------- checks
def plan_text(recipe: Recipe, teacher_config: SlimMoeConfig | None = None) -> str:
    """The stage table of a recipe (from its numbers only unless `teacher_config` is given)."""
    teacher_config = teacher_config or recipe.teacher_config() or read_teacher_config(recipe)
    stages = recipe.stage_configs(teacher_config)
    per_step = recipe.tokens_per_step(world_size())
    budgets = [f"{s:,} steps ({human_count(s * per_step)} tokens)" for s in recipe.stage_steps(world_size())]
    title = f"{recipe.name}: {recipe.method}, {len(stages)} stage(s), {human_count(per_step)} tokens per step"
    if recipe.method == "iterative":
        title += " (masks grow inside one distillation run)"
    return format_plan(teacher_config, stages, budgets=budgets, title=title)


def check(recipe: Recipe) -> SlimMoeConfig:
    """Everything `--dry-run` checks, before any compute: data files, teacher config and sizes, tokenizer and
    vocabulary, stage sizes, budgets, training arguments, Hub settings. Returns the teacher's configuration."""
    recipe_dir = _recipe_dir(recipe)
    for name in ("train", "eval", "calibration"):
        source = getattr(recipe.data, name)
        if source is not None:
            check_source(source, f"data.{name}", recipe_dir)
    if recipe.teacher.build is not None:
        _source_files(DataSource(glob=recipe.teacher.build.tokenizer_files), "teacher.build.tokenizer_files",
                      recipe_dir)
    teacher_config = read_teacher_config(recipe, offline_ok=True)
    if recipe.method == "iterative" and teacher_config.model_type not in SLIMMOE_TYPES:
        raise ValueError(f"method: iterative masks PhiMoE / SlimMoE teachers only; the teacher is "
                         f"{teacher_config.model_type!r}: use multi-stage or one-stage.")
    recipe.stage_configs(teacher_config)  # sizes legal (raises naming stages.*)
    recipe.stage_steps(world_size())
    recipe.gradient_accumulation_steps(world_size())
    if recipe.teacher.model != BUILD_TEACHER:
        tokenizer_path = recipe.teacher.tokenizer or recipe.teacher.model
        local = expand_path(tokenizer_path, recipe_dir)
        if _is_local(local):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(local)
            if len(tokenizer) > teacher_config.vocab_size:
                raise ValueError(f"teacher.tokenizer has {len(tokenizer)} tokens but the teacher's vocab_size is "
                                 f"{teacher_config.vocab_size}: teacher and student vocabularies must match.")
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
    _training_args(checked, os.path.join(recipe.output_dir, ".dry-run"), max_steps=1, early_stopping=False)
    if recipe.hub.get("push_to_hub"):
        from .hub import HubSettings

        HubSettings.from_dict(recipe.hub)
    return teacher_config


def _training_args(recipe: Recipe, output_dir: str, max_steps: int, early_stopping: bool):
    from .distillation import DistillationConfig

    d, has_eval = recipe.distillation, recipe.data.eval is not None
    training = {k: v for k, v in recipe.training.items() if k != "gradient_accumulation_steps"}
    try:
        return DistillationConfig(
            output_dir=output_dir, max_steps=max_steps, seed=recipe.seed,
            gradient_accumulation_steps=recipe.gradient_accumulation_steps(world_size()),
            eval_strategy="steps" if has_eval else "no", save_strategy="steps",
            load_best_model_at_end=early_stopping, metric_for_best_model="kl" if early_stopping else None,
            greater_is_better=False if early_stopping else None, restore_callback_states_from_checkpoint=True,
            top_k=d.top_k, temperature=d.temperature, renormalize=d.renormalize, aux_loss_coef=d.aux_loss_coef,
            ce_weight=d.ce_weight, kd_chunk_size=d.kd_chunk_size or 1024, **training,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"training: {e}") from None


# ----------------------------------------------------------------------------------------------------- loop
def _last_checkpoint(directory: str) -> str | None:
    """The newest checkpoint-N that was completely written (its trainer_state.json exists); incomplete ones are
    removed, so a process killed while saving resumes from the previous checkpoint."""
    if not os.path.isdir(directory):
        return None
    found = sorted((int(n.split("-")[-1]), n) for n in os.listdir(directory)
                   if n.startswith(PREFIX_CHECKPOINT_DIR + "-") and n.split("-")[-1].isdigit())
    for _, name in reversed(found):
        path = os.path.join(directory, name)
        if os.path.isfile(os.path.join(path, "trainer_state.json")) and (
                os.path.isfile(os.path.join(path, "model.safetensors")) or os.path.isdir(
                    os.path.join(path, "pytorch_model_fsdp_0")) or any(n.startswith("global_step")
                                                                        for n in os.listdir(path))):
            return path
        logger.warning("Removing the incomplete checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def _point(stage: int, tokens: int, step: int, config: SlimMoeConfig, metrics: dict | None) -> dict:
    metrics = metrics or {}
    total, active = count_parameters(config)
    return {"stage": stage, "tokens": int(tokens), "step": int(step), "num_parameters": total,
            "num_active_parameters": active, "eval_kl": metrics.get("eval_kl"),
            "eval_topk_kl": metrics.get("eval_topk_kl"), "eval_perplexity": metrics.get("eval_perplexity"),
            "eval_top1_agreement": metrics.get("eval_top1_agreement")}


def _eval_only(model, teacher, eval_dataset, recipe: Recipe, output_dir: str, tokenizer) -> dict | None:
    """`DistillationTrainer.evaluate()` of `model` against the teacher (online or cached) without training."""
    from .distillation import DistillationTrainer

    if eval_dataset is None:
        return None
    args = _training_args(recipe, output_dir, max_steps=1, early_stopping=False)
    trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, eval_dataset=eval_dataset,
                                  processing_class=tokenizer)
    return trainer.evaluate()


class _TrajectoryLogger(TrainerCallback):
    """Writes OUTPUT_DIR/trajectory.json after every evaluation, so the run's progress is on disk while it trains."""

    def __init__(self, write):
        self.write = write

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero:
            self.write(state)


def compress(recipe: Recipe, dry_run: bool = False, on_stage_start=None) -> str:
    """Run (or with `dry_run`, only check and plan) a recipe; returns the output directory. Re-running continues.
    `on_stage_start(i, num_stages)`, when given, is called as stage `i` begins (or is found finished)."""
    teacher_config = check(recipe)
    if dry_run:
        return recipe.output_dir
    paths = RunPaths(recipe.output_dir)
    planned = range(1, len(recipe.stage_configs(teacher_config)) + 1)
    if all(is_finished_stage(paths.stage(i)) for i in planned):
        logger.info("All %d stages of %s are finished in %s; nothing to do.", len(planned), recipe.name,
                    paths.output_dir)
        return paths.output_dir
    logger.info("Plan:\n%s", plan_text(recipe, teacher_config))

    from transformers import AutoTokenizer, set_seed

    from .distillation import DistillationTrainer, cache_teacher_topk
    from .pruning import SensitivityScores, compute_sensitivity, prune_to

    # Training arguments first: under `accelerate launch` with DeepSpeed ZeRO-3 they make from_pretrained shard the
    # models as they load. Work every process would repeat (teacher build, cache, scores) runs on the main one first.
    run_args = _training_args(recipe, os.path.join(paths.output_dir, ".run"), max_steps=1, early_stopping=False)
    is_main = run_args.process_index == 0  # only the main process writes run files
    with run_args.main_process_first(desc="preparing the run"):
        os.makedirs(paths.output_dir, exist_ok=True)
        save_recipe(recipe, paths.recipe)
        if recipe.teacher.model == BUILD_TEACHER:
            build_teacher(recipe, paths.teacher)
    teacher_path, tokenizer_path = _teacher_paths(recipe, paths)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    dtype = getattr(torch, recipe.teacher.dtype)
    teacher = load_model(teacher_path, dtype=dtype, revision=recipe.teacher.revision)  # its own family's class
    teacher.requires_grad_(False).eval()
    if len(tokenizer) > teacher.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocab_size is "
                         f"{teacher.config.vocab_size}: teacher and student vocabularies must match.")
    device = torch.device("cpu") if recipe.training.get("use_cpu") or not torch.cuda.is_available() else \
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not is_deepspeed_zero3_enabled():  # ZeRO-3 keeps the teacher sharded; the trainer places it
        teacher.to(device)
    stage_configs = recipe.stage_configs(teacher.config)
    stage_steps = recipe.stage_steps(world_size())
    per_step = recipe.tokens_per_step(world_size())
    num_stages = len(stage_configs)

    blocks = load_blocks(recipe, tokenizer)
    train, eval_set = blocks["train"], blocks["eval"]
    online_teacher = teacher
    if recipe.distillation.cache_teacher:  # the original teacher's top-k, computed once for every stage
        with run_args.main_process_first(desc="caching the teacher's top-k"):
            train = cache_teacher_topk(teacher, train, top_k=recipe.distillation.top_k,
                                       output_dir=os.path.join(paths.teacher_cache, "train"),
                                       pad_token_id=tokenizer.pad_token_id or 0)
            if eval_set is not None:
                eval_set = cache_teacher_topk(teacher, eval_set, top_k=recipe.distillation.top_k,
                                              output_dir=os.path.join(paths.teacher_cache, "eval"),
                                              pad_token_id=tokenizer.pad_token_id or 0)
        online_teacher = None
    calibration = calibration_batches(blocks["calibration"], recipe.scoring.batch_size)

    # Trajectory: the teacher point, then the points of every finished stage (read back from disk on resume).
    teacher_eval_path = os.path.join(paths.output_dir, "teacher_eval.json")
    if os.path.isfile(teacher_eval_path):
        teacher_metrics = _read_json(teacher_eval_path)
    else:
        teacher_metrics = _eval_only(teacher, online_teacher, eval_set, recipe,
                                     os.path.join(paths.output_dir, ".teacher-eval"), tokenizer) or {}
        if is_main:
            shutil.rmtree(os.path.join(paths.output_dir, ".teacher-eval"), ignore_errors=True)
            _write_json(teacher_eval_path, teacher_metrics)
    teacher_total, teacher_active = count_parameters(teacher.config)
    trajectory = {
        "teacher": {"name": recipe.teacher.model if recipe.teacher.model != BUILD_TEACHER else teacher_path,
                    "num_parameters": teacher_total, "num_active_parameters": teacher_active},
        "points": [_point(0, 0, 0, teacher.config, teacher_metrics)],
    }
    arch = get_architecture(teacher)
    teacher_summary = {name: getattr(teacher.config, name) for name in (
        "num_attention_heads", "num_key_value_heads", "num_hidden_layers")}
    teacher_summary.update(intermediate_size=arch.expert_width_of(teacher.config),  # the expert width, any family
                           num_local_experts=arch.num_experts_of(teacher.config),
                           num_experts_per_tok=arch.top_k_of(teacher.config), model_type=teacher.config.model_type,
                           num_parameters=teacher_total, num_active_parameters=teacher_active)

    parent, tokens_done, steps_done = teacher_path, 0, 0
    for i, (stage_config, max_steps) in enumerate(zip(stage_configs, stage_steps), start=1):
        final_dir, tmp_dir, work_dir = paths.stage(i), paths.tmp(i), paths.work(i)
        if on_stage_start is not None:
            on_stage_start(i, num_stages)
        if is_finished_stage(final_dir):
            info = _read_json(os.path.join(final_dir, "stage.json"))
            trajectory = _read_json(os.path.join(final_dir, "trajectory.json"))
            tokens_done += info["training"]["tokens"]
            steps_done += info["training"]["steps"]
            if is_main:
                shutil.rmtree(work_dir, ignore_errors=True)
            logger.info("Stage %d/%d is finished in %s; skipping it.", i, num_stages, final_dir)
            parent = final_dir
            continue
        if is_main:
            shutil.rmtree(tmp_dir, ignore_errors=True)  # a half-written stage is never reused
        os.makedirs(work_dir, exist_ok=True)
        last_stage = i == num_stages
        early = (recipe.method == "multi-stage" and not last_stage and recipe.early_stopping.enabled
                 and eval_set is not None)
        logger.info("Stage %d/%d: %s -> d_expert %d, heads %d/%d (%s parameters), %d steps%s", i, num_stages, parent,
                    arch.expert_width_of(stage_config), stage_config.num_attention_heads,
                    stage_config.num_key_value_heads, human_count(count_parameters(stage_config)[0]), max_steps,
                    ", early stopping on eval KL" if early else "")
        set_seed(recipe.seed + i)

        # 1. Score the current model against the original teacher, once per stage (saved, so a resume prunes alike),
        # 2. and prune it one-shot to the stage size. The iterative baseline masks during training instead.
        model = load_model(parent, dtype=dtype).to(device)
        scoring_teacher = None if parent == teacher_path else teacher  # stage 1: the model is the teacher
        callbacks, scores = [], None
        if recipe.method == "iterative":
            fraction = recipe.iterative.target_fraction or _multi_stage_init_fraction(recipe)
            callbacks.append(IterativeMaskCallback(
                model, stage_config, calibration, teacher=teacher, criterion=recipe.scoring.criterion,
                top_k=recipe.scoring.top_k, mask_every_steps=recipe.iterative.mask_every_steps,
                target_step=max(1, round(fraction * max_steps)), expert_multiple=recipe.stages.expert_multiple))
        else:
            scores_path = os.path.join(work_dir, "scores.safetensors")
            with run_args.main_process_first(desc="sensitivity scores"):
                if os.path.isfile(scores_path):
                    scores = SensitivityScores.load(scores_path)
                else:
                    scores = compute_sensitivity(model, calibration, teacher=scoring_teacher,
                                                 criterion=recipe.scoring.criterion, top_k=recipe.scoring.top_k)
                    scores.save(scores_path + ".tmp")
                    os.replace(scores_path + ".tmp", scores_path)
            prune_to(model, stage_config, scores)

        # 3. Distill from the original teacher; evaluate the freshly pruned model once first.
        checkpoints = os.path.join(work_dir, "checkpoints")
        pruned_eval_path = os.path.join(work_dir, "pruned_eval.json")
        if os.path.isfile(pruned_eval_path):
            pruned_metrics = _read_json(pruned_eval_path)
        else:
            pruned_metrics = _eval_only(model, online_teacher, eval_set, recipe, checkpoints, tokenizer) or {}
            if is_main:
                _write_json(pruned_eval_path, pruned_metrics)
        args = _training_args(recipe, checkpoints, max_steps=max_steps, early_stopping=early)
        if early:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping.patience,
                                                   early_stopping_threshold=recipe.early_stopping.min_delta))
        base_points = list(trajectory["points"])
        base_points.append(_point(i, tokens_done, steps_done, model.config, pruned_metrics))

        config_at = callbacks[0].config_at if recipe.method == "iterative" else (lambda step, c=stage_config: c)

        def stage_points(state, base=base_points, t0=tokens_done, s0=steps_done, stage=i, config_at=config_at):
            points, seen = list(base), set()
            for entry in state.log_history:  # the evaluations during training (one per step)
                if "eval_kl" in entry and entry["step"] not in seen:
                    seen.add(entry["step"])
                    points.append(_point(stage, t0 + entry["step"] * per_step, s0 + entry["step"],
                                         config_at(entry["step"]), entry))
            return points

        def write_progress(state):
            _write_json(paths.trajectory, {**trajectory, "points": stage_points(state)})

        callbacks.append(_TrajectoryLogger(write_progress))
        trainer = DistillationTrainer(model=model, teacher_model=online_teacher, args=args, train_dataset=train,
                                      eval_dataset=eval_set, processing_class=tokenizer, callbacks=callbacks)
        resume = _last_checkpoint(checkpoints)
        if resume:
            logger.info("Resuming stage %d from %s", i, resume)
        trainer.train(resume_from_checkpoint=resume)
        model = trainer.model
        if recipe.method == "iterative":
            model, scores = callbacks[0].finalize(model)
        final_metrics = trainer.evaluate() if eval_set is not None else {}
        steps = trainer.state.global_step
        stage_tokens = steps * per_step
        trajectory = {**trajectory, "points": stage_points(trainer.state)}
        if eval_set is not None and trajectory["points"][-1]["step"] != steps_done + steps:  # no eval at the last step
            trajectory["points"].append(_point(i, tokens_done + stage_tokens, steps_done + steps, stage_config,
                                               final_metrics))

        # 4. Save the stage as a complete Hub-ready repository under a temporary name, then rename it into place.
        trainer.save_model(tmp_dir)  # every rank takes part (ZeRO-3 / FSDP gather); the main process writes
        if not trainer.is_world_process_zero():
            trainer.accelerator.wait_for_everyone()
            parent, tokens_done, steps_done = final_dir, tokens_done + stage_tokens, steps_done + steps
            continue
        tokenizer.save_pretrained(tmp_dir)
        if os.path.exists(os.path.join(tmp_dir, "training_args.bin")):  # a pickle; recipe and stage.json say it all
            os.remove(os.path.join(tmp_dir, "training_args.bin"))
        scores.save(os.path.join(tmp_dir, "scores.safetensors"))
        info = {
            "stage": i, "num_stages": num_stages, "method": recipe.method, "teacher": trajectory["teacher"]["name"],
            "parent": parent if parent != teacher_path else trajectory["teacher"]["name"], "recipe": recipe.name,
            "license": recipe.teacher.license, "datasets": _dataset_ids(recipe), "teacher_config": teacher_summary,
            "training": {
                "tokens": stage_tokens, "steps": steps, "learning_rate": args.learning_rate,
                "top_k": args.top_k, "temperature": args.temperature, "aux_loss_coef": args.aux_loss_coef,
                "ce_weight": args.ce_weight, "early_stopped": steps < max_steps,
                "stopped_at_step": steps if steps < max_steps else None, "max_steps": max_steps,
            },
            "eval": {"kl": final_metrics.get("eval_kl"), "topk_kl": final_metrics.get("eval_topk_kl"),
                     "perplexity": final_metrics.get("eval_perplexity"),
                     "top1_agreement": final_metrics.get("eval_top1_agreement")},
        }
        _write_json(os.path.join(tmp_dir, "stage.json"), info)
        _write_json(os.path.join(tmp_dir, "trajectory.json"), trajectory)
        _write_card(tmp_dir)
        os.replace(tmp_dir, final_dir)
        _write_json(paths.trajectory, trajectory)
        shutil.rmtree(work_dir, ignore_errors=True)
        logger.info("Stage %d/%d saved to %s (%d steps, %s tokens, eval KL %s)", i, num_stages, final_dir, steps,
                    human_count(stage_tokens), info["eval"]["kl"])
        _publish(final_dir, recipe)
        if trainer.accelerator.num_processes > 1:
            trainer.accelerator.wait_for_everyone()
        parent, tokens_done, steps_done = final_dir, tokens_done + stage_tokens, steps_done + steps
        del trainer, model
    if is_main:
        _write_json(paths.trajectory, trajectory)
    return paths.output_dir


class IterativeMaskCallback(TrainerCallback):
    """The iterative-pruning baseline (paper Section 4.2, after Liang et al. 2023 without layer-wise distillation).

    The full-size model is distilled while masks remove its lowest-scoring expert neurons and GQA groups gradually:
    the unmasked sizes shrink geometrically (the schedule of `plan_stages`, in continuous time) from the full size at
    step 0 to the target at `target_step`. Every `mask_every_steps` the sensitivity scores of the masked model are
    recomputed on the calibration batches and the masks grow; masked weights are zeroed after every optimizer step,
    which makes the masked model compute exactly what the pruned one would. `finalize()` prunes physically.
    On resume the masks are read back from the zeroed weights of the checkpoint.
    """

    def __init__(self, model, target: SlimMoeConfig, calibration: list[dict], teacher, criterion: str, top_k: int,
                 mask_every_steps: int, target_step: int, expert_multiple: int):
        self.model, self.target, self.calibration, self.teacher = model, target, calibration, teacher
        self.criterion, self.top_k = criterion, top_k
        self.every, self.target_step, self.multiple = mask_every_steps, target_step, expert_multiple
        self.source = SlimMoeConfig(**{k: v for k, v in model.config.to_dict().items()
                                       if k not in ("model_type", "transformers_version", "architectures")})
        c = self.source
        self.expert_keep = [torch.ones(c.num_local_experts, c.intermediate_size, dtype=torch.bool)
                            for _ in range(c.num_hidden_layers)]
        self.group_keep = [torch.ones(c.num_key_value_heads, dtype=torch.bool) for _ in range(c.num_hidden_layers)]
        self.scores = None

    def sizes_at(self, step: int) -> tuple[int, int]:
        from .schedule import geometric as _geometric

        f = min(1.0, step / self.target_step)
        return (_geometric(self.source.intermediate_size, self.target.intermediate_size, f, self.multiple)
                if f < 1 else self.target.intermediate_size,
                _geometric(self.source.num_key_value_heads, self.target.num_key_value_heads, f, 1))

    def config_at(self, step: int) -> SlimMoeConfig:
        intermediate, groups = self.sizes_at(step)
        return self.source.slimmed(intermediate_size=intermediate, num_key_value_heads=groups)

    def _update_masks(self, step: int) -> None:
        from .pruning import compute_sensitivity

        intermediate, groups = self.sizes_at(step)
        if intermediate == int(self.expert_keep[0][0].sum()) and groups == int(self.group_keep[0].sum()):
            return
        self.scores = compute_sensitivity(self.model, self.calibration, teacher=self.teacher,
                                          criterion=self.criterion, top_k=self.top_k, show_progress=False)
        for layer in range(self.source.num_hidden_layers):
            experts = self.scores.experts[layer].masked_fill(~self.expert_keep[layer], float("-inf"))
            keep = torch.zeros_like(self.expert_keep[layer])
            self.expert_keep[layer] = keep.scatter(1, experts.topk(intermediate, dim=1).indices, True)
            kv = self.scores.kv_groups[layer].masked_fill(~self.group_keep[layer], float("-inf"))
            self.group_keep[layer] = torch.zeros_like(self.group_keep[layer]).scatter(0, kv.topk(groups).indices, True)
        logger.info("Iterative pruning at step %d: masks keep d_expert %d, %d KV groups", step, intermediate, groups)

    @torch.no_grad()
    def apply_masks(self) -> None:
        c, head_dim = self.source, self.source.head_dim
        per_group = c.num_attention_heads // c.num_key_value_heads
        for layer, block in enumerate(self.model.model.layers):
            drop = ~self.expert_keep[layer].to(block.mlp.experts.down_proj.device)  # [E, I]
            block.mlp.experts.gate_up_proj.data[:, :c.intermediate_size][drop] = 0
            block.mlp.experts.gate_up_proj.data[:, c.intermediate_size:][drop] = 0
            block.mlp.experts.down_proj.data.transpose(1, 2)[drop] = 0
            attention = block.self_attn
            for g in torch.nonzero(~self.group_keep[layer]).flatten().tolist():
                kv = slice(g * head_dim, (g + 1) * head_dim)
                q = slice(g * per_group * head_dim, (g + 1) * per_group * head_dim)
                for proj, rows in ((attention.q_proj, q), (attention.k_proj, kv), (attention.v_proj, kv)):
                    proj.weight.data[rows] = 0
                    if proj.bias is not None:
                        proj.bias.data[rows] = 0
                attention.o_proj.weight.data[:, q] = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the checkpoint's zeroed units are the masks
            c = self.source
            for layer, block in enumerate(self.model.model.layers):
                self.expert_keep[layer] = block.mlp.experts.down_proj.detach().abs().sum(dim=1).cpu() > 0
                o = block.self_attn.o_proj.weight.detach().abs().sum(dim=0).cpu()  # [heads * head_dim]
                self.group_keep[layer] = o.view(c.num_key_value_heads, -1).sum(dim=1) > 0
        self._update_masks(state.global_step)
        self.apply_masks()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= self.target_step:
            self._update_masks(state.global_step)
        self.apply_masks()

    def finalize(self, model):
        """Reach the target masks if training stopped before `target_step`, then prune physically to the target.
        Returns the pruned model and the mask scores used (kept units score 1 + their last sensitivity)."""
        from .pruning import SensitivityScores

        self.model = model
        self._update_masks(self.target_step)
        self.apply_masks()
        last = self.scores
        experts = [keep.float() * (1 + (last.experts[i].clamp(min=0) if last else 0))
                   for i, keep in enumerate(self.expert_keep)]
        groups = [keep.float() * (1 + (last.kv_groups[i].clamp(min=0) if last else 0))
                  for i, keep in enumerate(self.group_keep)]
        scores = SensitivityScores(experts=experts, kv_groups=groups, metadata={"method": "iterative"})
        model.prune_to(self.target, scores)
        return model, scores


def _multi_stage_init_fraction(recipe: Recipe) -> float:
    """Fraction of the total budget that multi-stage spends before its last stage (where iterative pruning reaches
    the target, as in the paper's Section 4.2)."""
    steps = recipe.stages.budget.steps or recipe.stages.budget.tokens
    return sum(steps[:-1]) / sum(steps) if len(steps) > 1 else 0.5


def _dataset_ids(recipe: Recipe) -> list[str]:
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


def _write_card(stage_dir: str) -> None:
    try:
        from .hub import write_model_card
    except ImportError:
        logger.warning("hf_slimmoe.hub is not available: %s has no model card.", stage_dir)
        return
    write_model_card(stage_dir)


def _publish(stage_dir: str, recipe: Recipe) -> None:
    if not recipe.hub.get("push_to_hub"):
        return
    from .hub import HubSettings, publish_stage

    if not publish_stage(stage_dir, HubSettings.from_dict(recipe.hub)):
        logger.warning("%s was not published; `slimmoe push %s` publishes it later.", stage_dir, recipe.output_dir)


__all__ = ["compress", "check", "plan_text", "RunPaths", "is_finished_stage", "build_teacher", "load_blocks", "pack"]
