"""The teacher of a compression run: where it is, what its configuration is, and (for `teacher.model: build`) how a
tiny local one is made.

`build_teacher` trains a byte-level BPE tokenizer on `teacher.build.tokenizer_files` and pre-trains a model of any
supported MoE family (`teacher.build.config.model_type`; SlimMoE by default) with the causal LM loss on
`data.train`, so that distilling from it is meaningful on a CPU.
`read_teacher_config` gives the teacher's configuration before anything is downloaded or built, checked against the
checkpoint's `config.json` when it can be read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch

from ..architectures import config_from_dict, count_parameters, get_architecture, new_model
from ..utils.config_io import expand_path
from ..utils.data import TokenCollator
from ..utils.outputs import differences, human_count
from ..utils.tokenization import train_bpe_tokenizer
from .recipe import BUILD_TEACHER, DataSource, Recipe, recipe_to_dict
from .sources import load_blocks, source_files

logger = logging.getLogger(__name__)

BUILD_RECORD = "build.json"  # in a built teacher's directory: the settings it was built with (`build_settings`)
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "head_dim")  # + the family's expert width, expert count and top-k fields


# ----------------------------------------------------------------------------------------------------- building
def pretrain(model, dataset, build, seed: int, pad_token_id: int) -> None:
    """Causal-LM pre-training of the built teacher: AdamW, cosine decay, gradient clipping at 1, shuffled epochs.

    A plain loop on this process alone, not a Trainer: under `torchrun` / `accelerate launch` the teacher is built by
    the main process while the others wait, and a Trainer would wrap the model in DDP and wait for them forever.
    """
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    collate = TokenCollator(pad_token_id=pad_token_id)
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


def is_built_teacher(directory: str) -> bool:
    """A built teacher is complete once its directory holds a config and a tokenizer (it is renamed into place)."""
    return (os.path.isfile(os.path.join(directory, "config.json"))
            and os.path.isfile(os.path.join(directory, "tokenizer.json")))


def build_settings(recipe: Recipe) -> dict:
    """Everything a built teacher depends on: `teacher.build`, the data it is pre-trained on (`data.train`,
    `block_size`, `train_blocks`), the seed, and whether it trains on the CPU."""
    values = recipe_to_dict(recipe)
    return {"build": values["teacher"]["build"],
            "data": {k: values["data"][k] for k in ("train", "block_size", "train_blocks")},
            "seed": recipe.seed, "use_cpu": bool(recipe.training.get("use_cpu", False))}


def read_build_record(directory: str) -> dict | None:
    """The build settings a built teacher recorded (None when it records none)."""
    path = os.path.join(directory, BUILD_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def build_differences(recipe: Recipe, directory: str) -> list[str]:
    """How the teacher built in `directory` differs from the one `recipe` builds (empty when they match)."""
    recorded = read_build_record(directory)
    if recorded is None:
        return [f"{directory}/{BUILD_RECORD}: missing (the teacher there records no build settings)"]
    return [f"built teacher {d}" for d in differences(recorded, build_settings(recipe))]


def build_teacher(recipe: Recipe, directory: str, reuse_stale: bool = False) -> str:
    """Make the tiny local teacher of `teacher.build` in `directory` (once) and return it.

    A byte-level BPE tokenizer is trained on `teacher.build.tokenizer_files`, a model of the family of
    `teacher.build.config` (`model_type`; SlimMoE by default) is initialised with it (seeded by `seed`) and trained
    for `pretrain_steps` with the causal LM loss on `data.train`, so that distilling from it is meaningful. The
    settings are recorded in `build.json`; a teacher built earlier is reused when they match, and refused with the
    differences named otherwise (unless `reuse_stale`).
    """

    if is_built_teacher(directory):
        found = build_differences(recipe, directory)
        if found and not reuse_stale:
            raise ValueError(f"{directory} holds a teacher built with other settings ({'; '.join(found[:6])}); "
                             "remove it, or re-run with --overwrite to start fresh.")
        logger.info("Using the teacher built earlier in %s", directory)
        return directory
    b = recipe.teacher.build
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    files = source_files(DataSource(glob=b.tokenizer_files), "teacher.build.tokenizer_files", recipe.directory)
    logger.info("Building the teacher: tokenizer (vocab %d) on %d files, then %d causal-LM steps", b.vocab_size,
                len(files), b.pretrain_steps)
    tokenizer = train_bpe_tokenizer(files, b.vocab_size)
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
        pretrain(model.to(device), train, b, recipe.seed, tokenizer.pad_token_id)
        model.to("cpu")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, BUILD_RECORD), "w", encoding="utf-8") as f:
        json.dump(build_settings(recipe), f, indent=2)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    logger.info("Saved the built teacher (%s parameters) to %s", human_count(count_parameters(config)[0]), directory)
    return directory


# ----------------------------------------------------------------------------------------------------- locating
def is_local(path: str) -> bool:
    return os.path.isdir(expand_path(path))


def teacher_paths(recipe: Recipe, built_dir: str) -> tuple[str, str]:
    """Where the teacher's weights and its tokenizer load from (`built_dir` for `teacher.model: build`)."""
    if recipe.teacher.model == BUILD_TEACHER:
        return built_dir, built_dir
    model = recipe.teacher.model
    local = expand_path(model, recipe.directory)
    model = local if is_local(local) else model
    return model, recipe.teacher.tokenizer or model


def read_teacher_config(recipe: Recipe, offline_ok: bool = False):
    """The teacher's configuration (any supported family): from `teacher.architecture` / `teacher.build`, checked
    against the checkpoint's config.json when it can be read (a local path, or the Hub unless offline)."""
    from ..architectures import SUPPORTED_MODEL_TYPES

    declared = recipe.teacher_config()
    if recipe.teacher.model == BUILD_TEACHER:
        return declared
    from transformers import PretrainedConfig

    model = expand_path(recipe.teacher.model, recipe.directory)
    if not is_local(model) and (model.startswith((".", "/", "~")) or model.count("/") > 1):
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
        for name in (*ARCHITECTURE_FIELDS, arch.expert_width, arch.num_experts, arch.top_k):
            if getattr(declared, name, None) != getattr(actual, name, None):
                raise ValueError(f"teacher.architecture.{name}={getattr(declared, name, None)} but the checkpoint "
                                 f"{recipe.teacher.model} has {getattr(actual, name, None)}; fix the recipe.")
    return actual


__all__ = [
    "build_teacher",
    "build_settings",
    "build_differences",
    "read_teacher_config",
    "teacher_paths",
    "pretrain",
    "is_built_teacher",
    "BUILD_RECORD",
]
