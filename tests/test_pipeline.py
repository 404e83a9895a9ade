"""The stage loop end to end on a tiny teacher built in-process: multi-stage with a resume after SIGKILL, the
one-stage and iterative baselines, the stage directory contract, and recipes rejected with the key's name."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from hf_slimmoe.cli import main
from hf_slimmoe.compression.loop import compress
from hf_slimmoe.compression.recipe import load_recipe, recipe_from_dict
from hf_slimmoe.compression.resume import is_finished_stage

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")

TINY = {
    "name": "test-tiny",
    "method": "multi-stage",
    "output_dir": None,  # set per test
    "seed": 0,
    "teacher": {
        "model": "build",
        "license": "apache-2.0",
        "build": {
            "tokenizer_files": "{stdlib}/json/*.py", "vocab_size": 300, "pretrain_steps": 30,
            "pretrain_learning_rate": 5e-3, "pretrain_batch_size": 8,
            "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                       "attention_bias": True, "lm_head_bias": True, "max_position_embeddings": 128},
        },
    },
    "data": {"train": {"type": "text_files", "glob": "{stdlib}/json/*.py"},
             "eval": {"type": "text_files", "paths": ["{stdlib}/csv.py"]},
             "block_size": 32, "eval_blocks": 16, "calibration_blocks": 8},
    "stages": {"num_stages": 2, "target": {"intermediate_size": 16, "num_key_value_heads": 1}, "expert_multiple": 16,
               "budget": {"steps": [8, 12]}},
    "early_stopping": {"enabled": True, "patience": 2, "min_delta": 0.0},
    "scoring": {"criterion": "kd", "top_k": 8, "batch_size": 4},
    "distillation": {"top_k": 8, "aux_loss_coef": 0.01, "cache_teacher": True},
    "training": {"learning_rate": 2e-3, "lr_scheduler_type": "cosine", "warmup_steps": 2,
                 "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "eval_steps": 4,
                 "save_steps": 4, "logging_steps": 4, "use_cpu": True, "report_to": [], "disable_tqdm": True},
    "hub": {"push_to_hub": False},
}

STAGE_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "scores.safetensors", "stage.json", "trajectory.json", "README.md", "trajectory.png"}


def tiny_recipe(output_dir, **changes) -> dict:
    values = copy.deepcopy(TINY)
    values["output_dir"] = str(output_dir)
    for dotted, value in changes.items():
        node = values
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return values


def write_recipe(path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def check_stage_dir(stage_dir, stage, num_stages, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert STAGE_FILES <= set(os.listdir(stage_dir)), sorted(os.listdir(stage_dir))
    info = json.load(open(os.path.join(stage_dir, "stage.json")))
    assert (info["stage"], info["num_stages"], info["method"], info["recipe"]) == (stage, num_stages, method,
                                                                                    "test-tiny")
    assert info["license"] == "apache-2.0" and info["teacher_config"]["intermediate_size"] == 64
    assert set(info["training"]) >= {"tokens", "steps", "learning_rate", "top_k", "temperature", "aux_loss_coef",
                                      "ce_weight", "early_stopped", "stopped_at_step", "max_steps"}
    assert info["training"]["tokens"] == info["training"]["steps"] * 4 * 32
    assert isinstance(info["eval"]["kl"], float) and info["eval"]["top1_agreement"] is not None
    model = AutoModelForCausalLM.from_pretrained(stage_dir)  # a model AND a tokenizer from the directory alone
    tokenizer = AutoTokenizer.from_pretrained(stage_dir)
    ids = tokenizer("import json", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    return info, model


def test_multi_stage_killed_in_stage_2_resumes_without_redoing_stage_1(tmp_path):
    """Run `slimmoe compress` in a subprocess, SIGKILL it once stage 2 has a checkpoint, re-run the same command."""
    out = tmp_path / "run"
    values = tiny_recipe(out, stages__budget__steps=[8, 60])
    recipe_path = write_recipe(tmp_path / "recipe.yaml", values)
    command = [sys.executable, "-m", "hf_slimmoe.cli", "compress", recipe_path, "--log-level", "WARNING"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = out / ".stage-2.work" / "checkpoints"
    deadline = time.time() + 150
    try:
        while time.time() < deadline and process.poll() is None:
            if checkpoints.is_dir() and any((c / "trainer_state.json").exists() for c in checkpoints.iterdir()):
                break
            time.sleep(0.05)
        assert process.poll() is None, f"compress ended before stage 2 checkpointed: {process.stderr.read()[-3000:]}"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert is_finished_stage(out / "stage-1") and not (out / "stage-2").exists()
    stage1_mtimes = {f: os.stat(out / "stage-1" / f).st_mtime_ns for f in os.listdir(out / "stage-1")}
    killed_at = max(int(c.name.split("-")[-1]) for c in checkpoints.iterdir() if c.name.startswith("checkpoint-"))

    result = subprocess.run(command[:-1] + ["INFO"], env=env, capture_output=True, text=True)  # the same command
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stage 1/2 is finished" in result.stderr and "Resuming stage 2 from" in result.stderr
    assert "missing keys" not in result.stderr  # the checkpoint's experts and routers were restored
    assert {f: os.stat(out / "stage-1" / f).st_mtime_ns for f in os.listdir(out / "stage-1")} == stage1_mtimes
    assert not (out / ".stage-2.work").exists() and not (out / ".stage-2.tmp").exists()

    info1, _ = check_stage_dir(out / "stage-1", 1, 2, "multi-stage")
    info2, model = check_stage_dir(out / "stage-2", 2, 2, "multi-stage")
    assert (model.config.intermediate_size, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        16, 2, 1)
    assert info2["training"]["steps"] == 60 and not info2["training"]["early_stopped"]  # the last stage runs in full
    assert info2["parent"] == str(out / "stage-1")
    # the resumed run continued from the checkpoint: the trajectory has each evaluation step of stage 2 once
    trajectory = json.load(open(out / "trajectory.json"))
    assert trajectory == json.load(open(out / "stage-2" / "trajectory.json"))
    assert trajectory["teacher"]["num_parameters"] == info2["teacher_config"]["num_parameters"]
    stage2 = [p for p in trajectory["points"] if p["stage"] == 2]
    steps = [p["step"] - info1["training"]["steps"] for p in stage2]
    assert steps == [0] + list(range(4, 61, 4)) and killed_at >= 4
    assert [p["tokens"] for p in stage2] == [p["step"] * 128 for p in stage2]
    assert trajectory["points"][0] == {**trajectory["points"][0], "stage": 0, "tokens": 0, "eval_kl": 0.0}
    assert stage2[-1]["num_parameters"] == model.num_parameters()
    # the resolved recipe in OUTPUT_DIR loads again and carries the full hub section `slimmoe push` reads
    from hf_slimmoe.hub import read_hub_settings

    assert load_recipe(out / "recipe.yaml").stages.budget.steps == [8, 60]
    assert read_hub_settings(out).layout == "repo-per-stage"


@pytest.mark.parametrize("method", ["one-stage", "iterative"])
def test_baselines_spend_the_same_budget_in_one_run(tmp_path, method):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, method=method,
                                          iterative={"mask_every_steps": 4, "target_fraction": None}))
    compress(recipe)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("stage-")) == ["stage-1"]
    info, model = check_stage_dir(tmp_path / "stage-1", 1, 1, method)
    assert info["training"]["steps"] == 20  # 8 + 12: the multi-stage total
    assert (model.config.intermediate_size, model.config.num_key_value_heads) == (16, 1)
    points = json.load(open(tmp_path / "trajectory.json"))["points"]
    if method == "iterative":  # the masked size shrinks during training and reaches the target at 8/20 of it
        sizes = [p["num_parameters"] for p in points if p["stage"] == 1]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1] == model.num_parameters()
    compress(recipe)  # finished: nothing is recomputed
    assert json.load(open(tmp_path / "stage-1" / "stage.json")) == info


def test_intermediate_stage_stops_early_when_eval_kl_plateaus(tmp_path):
    """min_delta larger than any change: stage 1 stops at its second evaluation; the final stage runs in full.
    The teacher runs online here (no cache)."""
    values = tiny_recipe(tmp_path, stages__budget__steps=[40, 4], early_stopping__patience=1,
                         early_stopping__min_delta=100.0, distillation__cache_teacher=False)
    compress(recipe_from_dict(values))
    info1 = json.load(open(tmp_path / "stage-1" / "stage.json"))
    info2 = json.load(open(tmp_path / "stage-2" / "stage.json"))
    assert info1["training"] == {**info1["training"], "early_stopped": True, "stopped_at_step": 8, "steps": 8,
                                 "max_steps": 40}
    assert info2["training"] == {**info2["training"], "early_stopped": False, "stopped_at_step": None, "steps": 4}
    assert not (tmp_path / "teacher_cache").exists()
    # a stage directory left half-written under its temporary name is never taken for a finished one
    os.rename(tmp_path / "stage-2", tmp_path / ".stage-2.tmp")
    stage1 = os.stat(tmp_path / "stage-1" / "model.safetensors").st_mtime_ns
    compress(recipe_from_dict(values))  # stage 2 is redone, stage 1 is not
    assert is_finished_stage(tmp_path / "stage-2") and not (tmp_path / ".stage-2.tmp").exists()
    assert os.stat(tmp_path / "stage-1" / "model.safetensors").st_mtime_ns == stage1


def test_trainer_checkpoints_reload_every_weight():
    """Trainer resumes and `load_best_model_at_end` read checkpoints with a plain `load_state_dict` of the saved
    (per-expert, stock PhiMoE layout) safetensors; every weight, experts and routers included, must come back."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM

    config = SlimMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2,
                           attention_bias=True, lm_head_bias=True)
    torch.manual_seed(0)
    saved = SlimMoeForCausalLM(config)
    torch.manual_seed(1)
    other = SlimMoeForCausalLM(config)
    with tempfile.TemporaryDirectory() as directory:
        saved.save_pretrained(directory)
        state_dict = load_file(os.path.join(directory, "model.safetensors"))
    assert any(".block_sparse_moe.experts.0.w1" in key for key in state_dict)
    result = other.load_state_dict(state_dict, False)
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(saved.eval()(ids).logits, other.eval()(ids).logits)


def test_tiny_cpu_recipe_dry_run(capsys):
    recipe = os.path.join(RECIPES, "tiny-cpu.yaml")
    assert main(["compress", recipe, "--dry-run", "--output-dir", "/nonexistent/x"]) == 0
    out = capsys.readouterr().out
    assert "OK (dry run" in out and "6/3" in out and not os.path.exists("/nonexistent/x")


@pytest.mark.parametrize("change, message", [
    ({"stages__budget__steps": [8]}, r"stages.budget.steps has 1 entries for 2 stages"),
    ({"stages__target": {"intermediate_size": 128, "num_key_value_heads": 1}}, r"stages.target.*larger"),
    ({"stages__target": {"intermediate_size": 16, "num_key_value_heads": 1, "num_attention_heads": 4}},
     r"stages.target.num_attention_heads=4"),
    ({"stages__sizes": [{"intermediate_size": 32}, {"d_expert": 16}]}, r"stages.sizes\[1\] has unknown key"),
    ({"training__learning_rate": -1.0}, r"training.learning_rate must be positive"),
    ({"training__max_steps": 5}, r"training.max_steps is set by the pipeline"),
    ({"training__lerning_rate": 1e-3}, r"training.lerning_rate"),
    ({"early_stopping__patience": 0}, r"early_stopping.patience must be positive"),
    ({"early_stopping__patience_steps": 3}, r"early_stopping.patience_steps"),
    ({"method": "two-stage"}, r"method: 'two-stage' is not one of"),
    ({"data__block_size": "long"}, r"data.block_size: expected an integer"),
    ({"data__train": {"type": "text_files", "glob": "/nonexistent/*.txt"}}, r"data.train.glob .* matches no file"),
    ({"hub": {"push_to_hub": True}}, r"hub.repo_id"),
    ({"hub": {"repo": "x"}}, r"hub.repo"),
    ({"distillation__kd_loss": "full", "distillation__cache_teacher": True}, r"distillation.kd_loss: full .* online"),
    ({"distillation__kd_loss": "top8"}, r"distillation.kd_loss"),
    ({"distillation__kd_samples": 0}, r"distillation.kd_samples=0 must be at least 1"),
])
def test_bad_recipes_are_rejected_naming_the_key(tmp_path, change, message):
    values = tiny_recipe(tmp_path / "out", **change)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        compress(recipe_from_dict(values), dry_run=True)
    assert not (tmp_path / "out").exists()  # nothing was written


def test_bad_recipe_file_through_the_cli(tmp_path, capsys):
    path = write_recipe(tmp_path / "bad.yaml", tiny_recipe(tmp_path / "out", teacher__model="/nonexistent/teacher",
                                                           teacher__build=None))
    assert main(["compress", path, "--dry-run"]) == 2
    assert "teacher.model '/nonexistent/teacher'" in capsys.readouterr().err
    path = write_recipe(tmp_path / "bad2.yaml", {**TINY, "output_dir": str(tmp_path), "stagez": {}})
    assert main(["plan", path]) == 2
    assert "unknown recipe key(s) stagez" in capsys.readouterr().err


def test_vocabulary_mismatch_is_caught_before_compute(tmp_path):
    """A teacher checkpoint whose tokenizer is larger than its vocabulary is refused by the dry run."""
    import sysconfig

    from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM
    from hf_slimmoe.utils.tokenization import train_bpe_tokenizer

    teacher = tmp_path / "teacher"
    config = SlimMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    SlimMoeForCausalLM(config).save_pretrained(teacher)
    train_bpe_tokenizer([os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py")], 300).save_pretrained(
        teacher)
    values = tiny_recipe(tmp_path / "out", teacher={"model": str(teacher)})
    with pytest.raises(ValueError, match="teacher and student vocabularies must match"):
        compress(recipe_from_dict(values), dry_run=True)


def test_data_sources_text_files_disk_and_pretokenized(tmp_path):
    """text_files and load_from_disk documents are packed into block_size blocks joined by EOS; a dataset that
    already has input_ids is used as is; calibration defaults to the training blocks."""
    import datasets

    from hf_slimmoe.compression.sources import load_blocks
    from hf_slimmoe.utils.tokenization import train_bpe_tokenizer

    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    tokenizer = train_bpe_tokenizer([str(tmp_path / "a.txt")], 300)
    datasets.Dataset.from_dict({"body": ["print('hello')\n" * 50] * 3}).save_to_disk(str(tmp_path / "docs"))
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 5}).save_to_disk(str(tmp_path / "blocks"))
    values = tiny_recipe(tmp_path / "out", data={
        "train": {"type": "text_files", "paths": [str(tmp_path / "a.txt")]},
        "eval": {"type": "disk", "path": str(tmp_path / "docs"), "text_field": "body"},
        "block_size": 16, "eval_blocks": 4, "calibration_blocks": 3})
    blocks = load_blocks(recipe_from_dict(values), tokenizer)
    assert all(len(row) == 16 for row in blocks["train"]["input_ids"]) and len(blocks["eval"]) == 4
    assert blocks["calibration"]["input_ids"] == blocks["train"]["input_ids"][:3]
    stream = [t for row in blocks["train"]["input_ids"] for t in row]
    assert tokenizer.decode(stream).startswith("def f(x):\n    return x + 1\n")
    values["data"]["eval"] = {"type": "disk", "path": str(tmp_path / "blocks")}
    assert load_blocks(recipe_from_dict(values), tokenizer)["eval"]["input_ids"] == [[1, 2, 3, 4]] * 4
    values["data"]["eval"] = {"type": "disk", "path": str(tmp_path / "docs")}  # no 'text' column
    with pytest.raises(ValueError, match="data.eval.text_field 'text'"):
        load_blocks(recipe_from_dict(values), tokenizer)


def iterative_model(family: str):
    """A tiny model of `family` and the iterative baseline's target: a quarter of the expert width (and of a
    shared expert's own width), half the GQA groups where the attention can lose some."""
    import torch

    from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM, slim_config
    from hf_slimmoe.architectures import get_architecture

    torch.manual_seed(0)
    if family == "slimmoe":
        model = SlimMoeForCausalLM(SlimMoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True))
    else:
        from family_models import tiny_model

        model = tiny_model(family, dtype=torch.float32)
    arch, config = get_architecture(model), model.config
    shared = arch.shared_width_of(config)
    target = slim_config(config, expert_width=arch.expert_width_of(config) // 4,
                         shared_expert_width=shared // 4 if shared and not arch.shared_expert.tied else None,
                         num_key_value_heads=config.num_key_value_heads // 2 if arch.attention_prunable else None)
    return model.eval(), target


@pytest.mark.parametrize("family", ["slimmoe", "qwen2_moe", "deepseek_v3", "qwen3_next", "gpt_oss", "jamba"])
def test_iterative_masks_compute_what_the_pruned_model_computes(family):
    """The masked full-size model equals the physically pruned one, for routed and shared experts and GQA groups of
    any family (hybrids: the full-attention layers); a resumed callback reads the masks back."""
    from types import SimpleNamespace

    import torch

    from hf_slimmoe.pruning.iterative import IterativeMaskCallback
    from hf_slimmoe.pruning.schedule import stage_sizes

    model, target = iterative_model(family)
    vocab = model.config.vocab_size
    calibration = [{"input_ids": torch.randint(5, vocab, (4, 16))} for _ in range(2)]
    callback = IterativeMaskCallback(model, target, calibration, teacher=None, criterion="kd", top_k=8,
                                     mask_every_steps=1, target_step=4, expert_multiple=4)
    assert bool(callback.dense_keep) == (family == "jamba")  # dense MLPs sized by the expert width field
    source = stage_sizes(model.config)
    assert stage_sizes(callback.config_at(0)) == source and stage_sizes(callback.config_at(9)) == stage_sizes(target)
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    callback.on_step_end(None, SimpleNamespace(global_step=2), None)
    halfway = stage_sizes(callback.config_at(2))
    assert source["expert_width"] > halfway["expert_width"] > stage_sizes(target)["expert_width"]
    assert all(int(keep[0].sum()) == halfway["expert_width"] for keep in callback.expert_keep.values())
    callback.on_step_end(None, SimpleNamespace(global_step=4), None)
    ids = torch.randint(5, vocab, (2, 12))
    with torch.no_grad():
        masked = model(ids).logits
    resumed = IterativeMaskCallback(model, target, calibration, teacher=None, criterion="kd", top_k=8,
                                    mask_every_steps=1, target_step=4, expert_multiple=4)
    resumed.on_train_begin(None, SimpleNamespace(global_step=4), None)
    for name in ("expert_keep", "shared_keep", "dense_keep", "group_keep"):
        mine, theirs = getattr(resumed, name), getattr(callback, name)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[i], theirs[i]) for i in mine)
    pruned, _ = callback.finalize(model)
    assert stage_sizes(pruned.config) == stage_sizes(target)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked, rtol=1e-5, atol=1e-5)


def test_compress_runs_under_torchrun_with_two_ranks(tmp_path):
    """The whole pipeline as a 2-rank DDP job (gloo, CPU): the teacher is built on the main process while the other
    waits (a Trainer there would wait for the other rank forever), stages train across both ranks."""
    import shutil

    out = tmp_path / "ddp"
    recipe_path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(out))
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "hf_slimmoe.cli", "compress",
                             recipe_path, "--log-level", "WARNING"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage_dir = out / "stage-2"
    assert STAGE_FILES <= set(os.listdir(stage_dir)) and is_finished_stage(str(stage_dir))
    info = json.load(open(stage_dir / "stage.json"))
    assert info["training"]["steps"] == 12
    assert info["training"]["tokens"] == 12 * 4 * 32 * 2  # two ranks of 4 x 32-token rows per step
    model, tokenizer = AutoModelForCausalLM.from_pretrained(stage_dir), AutoTokenizer.from_pretrained(stage_dir)
    assert model.config.intermediate_size == 16 and len(tokenizer) <= model.config.vocab_size


def test_pipeline_modules_read_as_short_functions():
    """The stage loop and the modules split from it keep every function short enough to read at once (<= 80 lines)."""
    import ast

    import hf_slimmoe

    root = os.path.dirname(hf_slimmoe.__file__)
    modules = [os.path.join("compression", f"{name}.py") for name in (
        "loop", "plan", "run", "stage", "resume", "teacher", "trajectory", "provenance", "recipe", "sources")]
    modules += [os.path.join("utils", "outputs.py"), os.path.join("pruning", "iterative.py")]
    long = []
    for module in modules:
        with open(os.path.join(root, module), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        long += [f"{module}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
