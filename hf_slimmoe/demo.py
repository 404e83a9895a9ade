"""`slimmoe demo`: the whole SlimMoE method end to end on a real local corpus, on CPU, with nothing downloaded.

The numbers live in the packaged recipe `hf_slimmoe/recipes/demo.yaml` (sections `compress`, `sft`, `dpo`, `eval`,
and `fast`: the overrides of `--fast`). Corpus: this machine's Python standard library source, split by module (train:
the top-level modules; held-out: the packages email/, http/, urllib/, xml/). The steps:

    [1/6] corpus, tokenizer and teacher    a byte-level BPE tokenizer and a small SlimMoE teacher trained on the
                                           train modules (`pipeline.build_teacher`), cached across runs
                                           (see `ensure_teacher`)
    [2/6] teacher top-k cache              the teacher's top-8 on the train and held-out blocks (`cache_teacher_topk`)
    [3/6] stage 1, [4/6] stage 2           `pipeline.compress` on the demo recipe: score, prune, distill, save, card
    [5/6] SFT-KD and DPO                   `posttrain` runners on the final stage, with docstring data from the stdlib
    [6/6] evaluation and summary           held-out perplexity, KL to the teacher, top-1 agreement, parameters and
                                           prefill/decode speed of every model -> summary.md, summary.json

Output layout (`OUTPUT_DIR`): `teacher/`, `teacher_cache/`, `stage-1/`, `stage-2/`, `sft/`, `dpo/` (each a complete
model directory with tokenizer and model card), `trajectory.json` + `trajectory.png`, `recipe.yaml`, `sft.yaml`,
`dpo.yaml`, `summary.md`, `summary.json`. Re-running the same command reuses every finished step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import sys
from importlib import resources

import yaml

from .pipeline import RunPaths, build_teacher
from .recipe import Recipe, recipe_from_dict, recipe_to_dict

logger = logging.getLogger(__name__)

DEMO_RECIPE = "demo.yaml"
TEACHER_STAMP = "demo_teacher.json"  # written into a demo teacher directory: the fingerprint of its settings
STEPS = ("corpus, tokenizer and teacher", "teacher top-k cache", "stage 1: score, prune, distill",
         "stage 2: score, prune, distill", "SFT with KD, then DPO", "evaluation and summary")
MODELS = ("teacher", "stage-1", "stage-2", "sft", "dpo")


# ----------------------------------------------------------------------------------------------------- settings
def _merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in recursively (mappings merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def demo_settings(fast: bool = False) -> dict:
    """The packaged demo recipe as a dict of sections `compress`, `sft`, `dpo`, `eval` (with `fast` merged in)."""
    text = resources.files("hf_slimmoe").joinpath("recipes", DEMO_RECIPE).read_text(encoding="utf-8")
    values = yaml.safe_load(text)
    fast_overrides = values.pop("fast", {}) or {}
    return _merge(values, fast_overrides) if fast else values


def demo_recipe(output_dir: str, fast: bool = False) -> Recipe:
    """The compression recipe the demo runs, writing to `output_dir` (`fast`: the `--fast` variant)."""
    values = demo_settings(fast)["compress"]
    values["output_dir"] = os.fspath(output_dir)
    return recipe_from_dict(values, source=None)


# ----------------------------------------------------------------------------------------------------- teacher
def cache_root() -> str:
    """Where demo teachers are kept across runs: `$HF_SLIMMOE_CACHE`, else `$XDG_CACHE_HOME/hf_slimmoe`, else
    `~/.cache/hf_slimmoe`."""
    if os.environ.get("HF_SLIMMOE_CACHE"):
        return os.path.expanduser(os.environ["HF_SLIMMOE_CACHE"])
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_slimmoe")


def teacher_fingerprint(recipe: Recipe) -> str:
    """A digest of everything the built teacher depends on: `teacher.build`, the data sources and block size, the
    seed, and this Python's version (its standard library is the corpus)."""
    values = recipe_to_dict(recipe)
    key = {"build": values["teacher"]["build"], "data": values["data"], "seed": values["seed"],
           "use_cpu": bool(recipe.training.get("use_cpu", False)), "python": sys.version}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _stamp(directory: str) -> str | None:
    path = os.path.join(directory, TEACHER_STAMP)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("fingerprint")


def _is_complete_teacher(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name))
               for name in ("config.json", "model.safetensors", "tokenizer.json", TEACHER_STAMP))


def ensure_teacher(output_dir: str, fast: bool = False) -> str:
    """
    Build or reuse the demo's trained teacher and tokenizer; returns `OUTPUT_DIR/teacher`.

    The teacher is built once per setting by `pipeline.build_teacher` into `cache_root()/demo-teacher-<fingerprint>/`
    (see `teacher_fingerprint`) and copied to `OUTPUT_DIR/teacher/`, where `pipeline.compress` finds it. A second
    run, in this or any other output directory, starts from the cached teacher without training it again.
    """
    recipe = demo_recipe(output_dir, fast)
    fingerprint = teacher_fingerprint(recipe)
    target = RunPaths(recipe.output_dir).teacher
    if os.path.isdir(target):
        if _is_complete_teacher(target) and _stamp(target) == fingerprint:
            logger.info("Using the demo teacher already in %s", target)
            return target
        raise ValueError(f"{target} holds a teacher built with other settings (a run with{'out' if fast else ''} "
                         "--fast?); use another output directory or remove it.")
    cached = os.path.join(cache_root(), f"demo-teacher-{fingerprint}")
    if _is_complete_teacher(cached):
        logger.info("Using the cached demo teacher %s (no training)", cached)
    else:
        os.makedirs(cache_root(), exist_ok=True)
        shutil.rmtree(cached, ignore_errors=True)  # an incomplete build (no stamp) is rebuilt
        build_teacher(recipe, cached)
        with open(os.path.join(cached, TEACHER_STAMP), "w", encoding="utf-8") as f:
            json.dump({"fingerprint": fingerprint, "recipe": recipe.name}, f, indent=2)
        logger.info("Cached the demo teacher in %s", cached)
    os.makedirs(recipe.output_dir, exist_ok=True)
    shutil.rmtree(target + ".tmp", ignore_errors=True)
    shutil.copytree(cached, target + ".tmp")
    os.replace(target + ".tmp", target)
    return target


__all__ = ["demo_recipe", "demo_settings", "ensure_teacher", "cache_root", "teacher_fingerprint", "STEPS"]
