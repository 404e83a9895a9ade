"""What a compression run records in its output directory, and how a re-run checks it before reusing anything.

`run_record(recipe, teacher_config)` is the record: the recipe settings that change the models (and their hash), the
stage sizes, the teacher's fingerprint and the tokenizer's. `check_output_dir` compares an output directory with it:
its `provenance.json`, the built teacher's `build.json`, and the run id in every finished stage's `stage.json`; it
also checks the weight files of the built teacher and of the finished stages. A difference raises `OutputDirError`
naming it, unless `reuse_stale` accepts it (then it is logged, and remembered as accepted).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

from transformers import PretrainedConfig

from ..architectures import get_architecture
from ..utils.config_io import expand_path
from ..utils.outputs import (
    PROVENANCE,
    OutputDirError,
    canonical_hash,
    check_weights,
    differences,
    file_digest,
    mismatch_error,
    read_provenance,
    record_id,
    weights_digest,
    write_provenance,
)
from .recipe import BUILD_TEACHER, Recipe, recipe_to_dict
from .teacher import build_differences, build_settings, is_built_teacher, is_local

logger = logging.getLogger(__name__)

# Recipe settings that do not change the models: names, places, publishing, and how training reports progress.
IGNORED_SETTINGS = ("name", "output_dir", "hub")
IGNORED_TEACHER_SETTINGS = ("model", "tokenizer", "revision", "license")  # the teacher is fingerprinted instead
IGNORED_TRAINING_SETTINGS = ("report_to", "disable_tqdm", "logging_first_step", "logging_dir", "run_name",
                             "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
                             "dataloader_prefetch_factor", "save_total_limit", "log_level", "log_level_replica")
COMPARED = ("recipe", "stages", "teacher", "tokenizer")
TOKENIZER_FILES = ("special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
RUN_OUTPUTS = ("teacher", "teacher.tmp", "teacher_cache", PROVENANCE, "trajectory.json", "teacher_eval.json",
               "recipe.yaml", ".run", ".teacher-eval", ".dry-run")
STAGE_OUTPUT = re.compile(r"(stage-\d+|\.stage-\d+\.(tmp|work))")


def recipe_settings(recipe: Recipe) -> dict:
    """The recipe's settings that change the models (see `IGNORED_*`), every default filled in."""
    values = recipe_to_dict(recipe)
    for key in IGNORED_SETTINGS:
        values.pop(key, None)
    for key in IGNORED_TEACHER_SETTINGS:
        values["teacher"].pop(key, None)
    values["data"].pop("num_proc", None)
    values["training"] = {k: v for k, v in values["training"].items() if k not in IGNORED_TRAINING_SETTINGS}
    return values


def teacher_identity(recipe: Recipe) -> dict:
    """The teacher's identity: the hash of its build settings (`teacher.model: build`), the hash of its config.json and
    a digest of its weights (a local checkpoint), or its id and revision (a Hub checkpoint, not downloaded here)."""
    if recipe.teacher.model == BUILD_TEACHER:
        return {"build": canonical_hash(build_settings(recipe))}
    local = expand_path(recipe.teacher.model, recipe.directory)
    if not is_local(local):
        return {"hub": recipe.teacher.model, "revision": recipe.teacher.revision}
    with open(os.path.join(local, "config.json"), encoding="utf-8") as f:
        config = {k: v for k, v in json.load(f).items() if k != "transformers_version"}
    return {"config": canonical_hash(config), "weights": weights_digest(local)}


def tokenizer_identity(recipe: Recipe) -> dict:
    """The tokenizer's identity: part of the build, a digest of its files (local), or its id and revision (Hub)."""
    if recipe.teacher.model == BUILD_TEACHER:
        return {"build": canonical_hash(build_settings(recipe))}
    name = recipe.teacher.tokenizer or recipe.teacher.model
    local = expand_path(name, recipe.directory)
    if not is_local(local):
        return {"hub": name, "revision": recipe.teacher.revision}
    files = sorted(n for n in os.listdir(local) if n.startswith("tokenizer") or n in TOKENIZER_FILES
                   or n.endswith(".model"))
    return {"files": {n: file_digest(os.path.join(local, n)) for n in files}}


def run_record(recipe: Recipe, teacher_config: PretrainedConfig) -> dict:
    """What makes a run's outputs what they are; `id` identifies it (stage.json files carry it)."""
    settings = recipe_settings(recipe)
    record = {
        "recipe_hash": canonical_hash(settings), "recipe": settings,
        "stages": [{name: getattr(c, name) for name in get_architecture(c).pruned_fields()}  # the family's sizes
                   for c in recipe.stage_configs(teacher_config)],
        "teacher": teacher_identity(recipe), "tokenizer": tokenizer_identity(recipe),
    }
    return {"id": record_id(record), **record}


def stage_dirs(output_dir: str) -> list[str]:
    """The finished-stage directories (`stage-N`) present in an output directory, in stage order."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if re.fullmatch(r"stage-\d+", n)]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def stage_run_id(stage_dir: str) -> str | None:
    """The run id a stage directory records in its stage.json (None when it records none)."""
    try:
        with open(os.path.join(stage_dir, "stage.json"), encoding="utf-8") as f:
            return (json.load(f).get("provenance") or {}).get("run")
    except (FileNotFoundError, ValueError):
        return None


def check_weight_files(recipe: Recipe) -> None:
    """Check the weights of the built teacher and of every finished stage in the output directory; raise naming the
    damaged file."""
    teacher = os.path.join(recipe.output_dir, "teacher")
    targets = [teacher] if recipe.teacher.model == BUILD_TEACHER and is_built_teacher(teacher) else []
    for directory in targets + [d for d in stage_dirs(recipe.output_dir)
                                if os.path.isfile(os.path.join(d, "stage.json"))]:
        try:
            check_weights(directory)
        except (ValueError, FileNotFoundError) as e:
            raise OutputDirError(f"{e} Remove {directory} to compute it again, or re-run with --overwrite to start "
                                 "fresh.") from None


def check_output_dir(recipe: Recipe, record: dict, reuse_stale: bool = False) -> list[str]:
    """Compare `recipe.output_dir` with the run `record`; returns the run ids whose outputs this run may reuse.

    Raises:
        `OutputDirError`: when the directory is a file, holds a damaged weight file, or holds outputs of another run
            (another provenance record, another built teacher, or stages of another run), unless `reuse_stale`.
    """
    output_dir = recipe.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"output_dir {output_dir} is a file; choose a directory.")
    check_weight_files(recipe)
    recorded = read_provenance(output_dir)
    accepted = {record["id"], *((recorded or {}).get("accepted") or [])}
    found = []
    if recorded is not None and recorded.get("id") != record["id"]:
        found += differences({k: recorded.get(k) for k in COMPARED}, {k: record[k] for k in COMPARED})
        found = found or [f"{PROVENANCE}: run id {recorded.get('id')} -> {record['id']}"]
    stages = stage_dirs(output_dir)
    if recorded is None and stages:
        found.append(f"{PROVENANCE}: missing, but the directory holds {os.path.basename(stages[0])}/ of another run")
    elif recorded is not None:
        found += [f"{os.path.basename(d)}/: made by run {stage_run_id(d)}" for d in stages
                  if stage_run_id(d) not in accepted | {recorded.get("id")}]
    teacher = os.path.join(output_dir, "teacher")
    if recipe.teacher.model == BUILD_TEACHER and is_built_teacher(teacher):
        found += build_differences(recipe, teacher)
    if found and not reuse_stale:
        raise mismatch_error(output_dir, found)
    if found:
        logger.warning("Reusing the outputs of another run in %s (--reuse-stale): %s", output_dir, "; ".join(found))
        accepted |= {(recorded or {}).get("id"), *(stage_run_id(d) for d in stages)}
    return sorted(str(a) for a in accepted if a is not None)


def remove_run_outputs(output_dir: str) -> None:
    """What a compression run wrote in `output_dir` (stages, built teacher, teacher cache, records), for
    `--overwrite`; anything else in the directory is left alone."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name in RUN_OUTPUTS or STAGE_OUTPUT.fullmatch(name):
            path = os.path.join(output_dir, name)
            logger.warning("--overwrite: removing %s", path)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def open_output_dir(recipe: Recipe, record: dict, overwrite: bool = False, reuse_stale: bool = False) -> None:
    """Make `recipe.output_dir` this run's: start fresh with `overwrite`, else check it (`check_output_dir`); then
    record this run's provenance."""
    if overwrite:
        remove_run_outputs(recipe.output_dir)
    accepted = check_output_dir(recipe, record, reuse_stale=reuse_stale)
    os.makedirs(recipe.output_dir, exist_ok=True)
    write_provenance(recipe.output_dir, {**record, "accepted": [a for a in accepted if a != record["id"]]})


__all__ = [
    "run_record",
    "check_output_dir",
    "open_output_dir",
    "remove_run_outputs",
    "recipe_settings",
    "teacher_identity",
    "tokenizer_identity",
    "stage_dirs",
    "check_weight_files",
]
