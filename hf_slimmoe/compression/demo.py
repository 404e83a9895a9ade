"""`slimmoe demo`: the whole SlimMoE method end to end on a real local corpus, on CPU, with nothing downloaded.

The numbers live in the packaged recipe `hf_slimmoe/recipes/demo.yaml` (sections `compress`, `sft`, `dpo`, `eval`,
and `fast`: the overrides of `--fast`). Corpus: this machine's Python standard library source, split by module (train:
the top-level modules; held-out: the packages email/, http/, urllib/, xml/). The steps:

    [1/6] corpus, tokenizer and teacher    a byte-level BPE tokenizer and a small SlimMoE teacher trained on the
                                           train modules (`teacher.build_teacher`), cached across runs
                                           (see `ensure_teacher`)
    [2/6] teacher cache                    what the KD loss reads on the train blocks (8 teacher samples per token,
                                           `cache_teacher_samples`) and the teacher's top-8 on the held-out blocks
    [3/6] stage 1, [4/6] stage 2           `compress` (`compression.loop`) on the demo recipe: score, prune, distill,
                                           save, card
    [5/6] SFT-KD and DPO                   `posttrain` runners on the final stage, with docstring data from the stdlib
    [6/6] evaluation and summary           held-out perplexity, KL to the teacher (top-8 + rest, and the full
                                           vocabulary), top-1 agreement, parameters and prefill/decode speed of
                                           every model -> summary.md, summary.json

Output layout (`OUTPUT_DIR`): `teacher/`, `teacher_cache/`, `stage-1/`, `stage-2/`, `sft/`, `dpo/` (each a complete
model directory with tokenizer and model card), `trajectory.json` + `trajectory.png`, `recipe.yaml`, `sft.yaml`,
`dpo.yaml`, `summary.md`, `summary.json`. Re-running the same command reuses every finished step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys

import yaml

from .recipe import Recipe, demo_settings, recipe_from_dict, recipe_to_dict
from .resume import RunPaths, is_finished_stage
from .teacher import BUILD_RECORD, build_teacher

logger = logging.getLogger(__name__)

TEACHER_STAMP = "demo_teacher.json"  # written into a demo teacher directory: the fingerprint of its settings
STEPS = ("corpus, tokenizer and teacher", "teacher cache", "stage 1: score, prune, distill",
         "stage 2: score, prune, distill", "SFT with KD, then DPO", "evaluation and summary")
MODELS = ("teacher", "stage-1", "stage-2", "sft", "dpo")


# ----------------------------------------------------------------------------------------------------- settings
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


def demo_teacher_key(recipe: Recipe) -> str:
    """A digest of everything the built teacher depends on: `teacher.build`, the training data (source, block size,
    number of blocks), the seed, and this Python's version (its standard library is the corpus)."""
    values = recipe_to_dict(recipe)
    data = {k: values["data"][k] for k in ("train", "block_size", "train_blocks")}
    key = {"build": values["teacher"]["build"], "data": data, "seed": values["seed"],
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
               for name in ("config.json", "model.safetensors", "tokenizer.json", BUILD_RECORD, TEACHER_STAMP))


def ensure_teacher(output_dir: str, fast: bool = False) -> str:
    """
    Build or reuse the demo's trained teacher and tokenizer; returns `OUTPUT_DIR/teacher`.

    The teacher is built once per setting by `teacher.build_teacher` into `cache_root()/demo-teacher-<fingerprint>/`
    (see `demo_teacher_key`) and copied to `OUTPUT_DIR/teacher/`, where `compress` finds it. A second
    run, in this or any other output directory, starts from the cached teacher without training it again.
    """
    recipe = demo_recipe(output_dir, fast)
    fingerprint = demo_teacher_key(recipe)
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


# ----------------------------------------------------------------------------------------------------- running
def _write_yaml(path: str, values: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return path


def _posttrain(kind: str, settings: dict, output_dir: str, parent: str, teacher: str | None = None) -> str:
    """Run the `sft` / `dpo` section of the demo recipe through `posttrain.run_recipe` (skipped when finished)."""
    from ..posttrain import run_recipe
    from ..utils.tokenization import chat_template_path

    paths = RunPaths(output_dir)
    target = os.path.join(paths.output_dir, kind)
    if is_finished_stage(target):
        logger.info("%s is finished in %s; skipping it.", kind.upper(), target)
        return target
    values = {**settings[kind], "model_name_or_path": parent, "output_dir": target}
    if kind == "sft":  # the demo tokenizer has no chat template of its own: the packaged one
        values.update(teacher_model_name_or_path=teacher, chat_template_path=chat_template_path())
    shutil.rmtree(target, ignore_errors=True)  # an unfinished run leaves no stage.json: start it again
    return run_recipe(kind, _write_yaml(os.path.join(paths.output_dir, f"{kind}.yaml"), values))


def _evaluate_all(output_dir: str, recipe: Recipe, eval_settings: dict, eval_set) -> list[dict]:
    """One summary row per model of the demo: parameters, held-out metrics against the teacher (its cached top-k,
    and online for the full-vocabulary KL: the demo's vocabulary is small), speed."""
    import torch
    from transformers import AutoModelForCausalLM

    from .evaluation import evaluate_model, measure_speed

    paths = RunPaths(output_dir)
    num_stages = recipe.planned_num_stages()
    directories = {"teacher": paths.teacher, **{f"stage-{i}": paths.stage(i) for i in range(1, num_stages + 1)},
                   "sft": os.path.join(paths.output_dir, "sft"), "dpo": os.path.join(paths.output_dir, "dpo")}
    prompt = torch.tensor(eval_set.select(range(min(eval_settings["batch_size"], len(eval_set))))["input_ids"],
                          dtype=torch.long)[:, :eval_settings["speed_prompt_tokens"]]
    rows = []
    teacher = AutoModelForCausalLM.from_pretrained(paths.teacher, dtype=torch.float32)
    for name, directory in directories.items():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        metrics = evaluate_model(model, eval_set, teacher=teacher, top_k=eval_settings["top_k"],
                                 batch_size=eval_settings["batch_size"])
        speed = measure_speed(model, prompt, new_tokens=eval_settings["speed_new_tokens"],
                              repeats=eval_settings["speed_repeats"])
        rows.append({"model": name, "path": directory, "num_parameters": model.config.num_parameters(),
                     "num_active_parameters": model.config.num_active_parameters(), **metrics, **speed})
        logger.info("Evaluated %s: %s", name, {k: v for k, v in rows[-1].items() if k not in ("model", "path")})
        del model
    return rows


def format_summary(summary: dict) -> str:
    """The summary table as Markdown."""
    from ..utils.outputs import human_count

    header = ("| model | total params | active params | held-out perplexity | KL to teacher (top-8 + rest) "
              "| full KL to teacher | top-1 agreement | prefill tok/s | decode tok/s |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        params = f"{human_count(r['num_parameters'])} | {human_count(r['num_active_parameters'])}"
        full = f"{r['full_kl']:.3f}" if r.get("full_kl") is not None else "n/a"
        speed = f"{r['prefill_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.0f}"
        lines.append(f"| {r['model']} | {params} | {r['perplexity']:.2f} | {r['kl']:.3f} | {full} "
                     f"| {r['top1_agreement']:.3f} | {speed} |")
    e = summary["eval"]
    lines.append("")
    lines.append(f"Held-out: {e['blocks']} blocks of {e['block_size']} tokens from {', '.join(e['data'])} (modules "
                 f"never trained on); KL is KL(teacher || model) per token over the teacher's top-{e['top_k']} tokens "
                 "plus one 'any other token' outcome, full KL over the whole vocabulary. Speed: one "
                 f"process, {summary['threads']} CPU thread{'s' if summary['threads'] != 1 else ''}, prefill = one "
                 f"forward over {e['prefill_shape']} "
                 f"tokens, decode = greedy generation of {e['speed_new_tokens']} tokens with the KV cache (batch 1), "
                 "best of " f"{e['speed_repeats']}.")
    return "\n".join(lines) + "\n"


def run_demo(output_dir: str, fast: bool = False, on_step=None) -> dict:
    """
    Run the demo into `output_dir` (see the module docstring); returns the summary (also in summary.json / .md).

    `on_step(index, total, title)`, when given, is called as each of the six steps begins (the CLI prints a banner).
    Every step reuses what an earlier run finished: the cached teacher, the teacher caches, finished stages and
    post-training outputs.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..distillation import cache_teacher_topk
    from ..hub.plot import plot_trajectory
    from .loop import compress
    from .run import cache_train_set
    from .sources import load_blocks

    settings = demo_settings(fast)
    recipe = demo_recipe(output_dir, fast)
    paths = RunPaths(recipe.output_dir)
    timings, clock = {}, {"step": None, "start": time.perf_counter()}

    def close_step() -> None:
        now = time.perf_counter()
        if clock["step"] is not None:
            timings[STEPS[clock["step"] - 1]] = round(now - clock["start"], 1)
        clock["start"] = now

    def step(index: int) -> None:
        close_step()
        clock["step"] = index
        logger.info("[%d/%d] %s", index, len(STEPS), STEPS[index - 1])
        if on_step is not None:
            on_step(index, len(STEPS), STEPS[index - 1])

    started = time.perf_counter()
    step(1)
    teacher_dir = ensure_teacher(output_dir, fast)

    step(2)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    blocks = load_blocks(recipe, tokenizer)
    k, pad, batch = recipe.distillation.top_k, tokenizer.pad_token_id or 0, settings["eval"]["batch_size"]
    cache_train_set(teacher, blocks["train"], recipe.distillation, paths.teacher_cache, pad_token_id=pad,
                    batch_size=batch)
    eval_set = cache_teacher_topk(teacher, blocks["eval"], top_k=k, batch_size=batch,
                                  output_dir=os.path.join(paths.teacher_cache, "eval"), pad_token_id=pad)
    del teacher

    step(3)
    compress(recipe, on_stage_start=lambda i, n: step(2 + i) if i > 1 else None)
    if clock["step"] == 3:  # every stage was already finished
        step(4)
    final_stage = paths.stage(recipe.planned_num_stages())

    step(5)
    sft_dir = _posttrain("sft", settings, output_dir, parent=final_stage, teacher=teacher_dir)
    _posttrain("dpo", settings, output_dir, parent=sft_dir)

    step(6)
    with open(paths.trajectory, encoding="utf-8") as f:
        plot_trajectory(json.load(f), os.path.join(paths.output_dir, "trajectory.png"))
    rows = _evaluate_all(output_dir, recipe, settings["eval"], eval_set)
    close_step()
    summary = {
        "demo": recipe.name, "fast": fast, "output_dir": paths.output_dir, "rows": rows,
        "eval": _eval_description(recipe, settings["eval"], len(eval_set)),
        "threads": torch.get_num_threads(), "step_seconds": timings,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(paths.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(paths.output_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(format_summary(summary))
    return summary


def _eval_description(recipe, e: dict, num_blocks: int) -> dict:
    """The held-out set and speed settings the summary's numbers were measured with."""
    glob = recipe.data.eval.glob
    return {"data": glob if isinstance(glob, list) else [glob], "blocks": num_blocks,
            "block_size": recipe.data.block_size, "top_k": e["top_k"],
            "prefill_shape": f"{min(e['batch_size'], num_blocks)} x {e['speed_prompt_tokens']}",
            "speed_new_tokens": e["speed_new_tokens"], "speed_repeats": e["speed_repeats"]}


__all__ = ["STEPS", "cache_root", "demo_recipe", "ensure_teacher", "format_summary", "run_demo", "demo_teacher_key"]
