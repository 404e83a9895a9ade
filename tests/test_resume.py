"""Resuming safely: an output directory records what made it (recipe, stage sizes, teacher, tokenizer) and a re-run
reuses nothing that does not match; one run at a time writes to it; damaged checkpoints and weight files are named or
skipped; a resumed stage ends exactly as an uninterrupted one; cards and plots show what the user needs."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_pipeline import tiny_recipe, write_recipe

from hf_slimmoe.cli import main
from hf_slimmoe.compression.loop import compress
from hf_slimmoe.compression.recipe import recipe_from_dict
from hf_slimmoe.compression.resume import is_finished_stage, last_checkpoint
from hf_slimmoe.compression.stage import StageRunner
from hf_slimmoe.utils.outputs import OutputDirError, RunLock, check_safetensors

FAST = {"stages__budget__steps": [2, 2], "teacher__build__pretrain_steps": 5}


def fast_recipe(output_dir, **changes) -> dict:
    return tiny_recipe(output_dir, **{**FAST, **changes})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-stage run of the fast tiny recipe; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    compress(recipe_from_dict(fast_recipe(out)))
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def mtimes(directory):
    return {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in os.listdir(directory)}


# ----------------------------------------------------------------------------------------------------- provenance
def test_another_recipe_into_a_finished_output_dir_is_refused_naming_what_differs(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    before = mtimes(out / "stage-2")
    other = fast_recipe(out, stages__target={"intermediate_size": 32, "num_key_value_heads": 1})
    for dry_run in (True, False):
        with pytest.raises(OutputDirError, match=r"stages.target.intermediate_size: 16 -> 32.*--overwrite.*"
                                                 r"--reuse-stale"):
            compress(recipe_from_dict(other), dry_run=dry_run)
    assert mtimes(out / "stage-2") == before and not (out / ".lock").exists()
    path = write_recipe(tmp_path / "other.yaml", other)
    assert main(["compress", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "stages.1.intermediate_size: 16 -> 32" in err and len(err.splitlines()) == 1

    assert main(["compress", path, "--overwrite"]) == 0  # start fresh: both stages are recomputed for recipe B
    info = json.load(open(out / "stage-2" / "stage.json"))
    assert json.load(open(out / "stage-2" / "config.json"))["intermediate_size"] == 32
    assert info["provenance"]["run"] == json.load(open(out / "provenance.json"))["id"]
    assert main(["compress", path, "--dry-run"]) == 0  # now it matches

    # --reuse-stale keeps B's stages for recipe A, says so, and remembers it
    recipe_a = recipe_from_dict(fast_recipe(out))
    with pytest.raises(OutputDirError):
        compress(recipe_a, dry_run=True)
    compress(recipe_a, reuse_stale=True)
    compress(recipe_a, dry_run=True)
    assert json.load(open(out / "stage-2" / "config.json"))["intermediate_size"] == 32


def test_changed_teacher_build_is_not_reused(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    teacher = mtimes(out / "teacher")
    changed = recipe_from_dict(fast_recipe(out, teacher__build__pretrain_steps=6))
    with pytest.raises(OutputDirError, match=r"teacher.build.pretrain_steps: 5 -> 6"):
        compress(changed, dry_run=True)
    with pytest.raises(OutputDirError, match=r"built teacher build.pretrain_steps: 5 -> 6"):
        compress(changed)
    assert mtimes(out / "teacher") == teacher
    # without any stage yet, the built teacher alone is checked too
    for name in ("stage-1", "stage-2", "provenance.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else os.remove(out / name)
    with pytest.raises(OutputDirError, match=r"built teacher build.pretrain_steps: 5 -> 6"):
        compress(changed, dry_run=True)


def test_stages_without_provenance_are_not_reused(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path)
    os.remove(out / "provenance.json")  # as an output directory of an older version, or copied stages
    with pytest.raises(OutputDirError, match=r"provenance.json: missing, but the directory holds stage-1/"):
        compress(recipe_from_dict(fast_recipe(out)), dry_run=True)


def local_teacher(directory, seed):
    import sysconfig

    from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM
    from hf_slimmoe.utils.tokenization import train_bpe_tokenizer

    config = SlimMoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    torch.manual_seed(seed)
    SlimMoeForCausalLM(config).save_pretrained(directory)
    train_bpe_tokenizer([os.path.join(sysconfig.get_paths()["stdlib"], "json", "decoder.py")], 300).save_pretrained(
        directory)


def test_a_retrained_local_teacher_is_a_different_run(tmp_path):
    """The record holds the teacher's config hash and weights digest: same path and config, other weights -> refused."""
    from hf_slimmoe.compression.provenance import check_output_dir, open_output_dir, run_record
    from hf_slimmoe.compression.teacher import read_teacher_config

    local_teacher(tmp_path / "teacher", seed=0)
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "out", teacher={"model": str(tmp_path / "teacher")},
                                          stages__target={"intermediate_size": 32, "num_key_value_heads": 1}))
    record = run_record(recipe, read_teacher_config(recipe))
    open_output_dir(recipe, record)
    check_output_dir(recipe, run_record(recipe, read_teacher_config(recipe)))  # unchanged: accepted
    local_teacher(tmp_path / "teacher", seed=1)
    with pytest.raises(OutputDirError, match=r"teacher.weights: \"\w+\" -> \"\w+\""):
        check_output_dir(recipe, run_record(recipe, read_teacher_config(recipe)))


# ----------------------------------------------------------------------------------------------------- weight files
def test_truncated_weights_are_named_before_any_work(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    weights = out / "stage-1" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    path = write_recipe(tmp_path / "recipe.yaml", fast_recipe(out))
    assert main(["compress", path, "--dry-run"]) == 2
    assert f"{weights} is truncated" in capsys.readouterr().err
    assert main(["compress", path]) == 2
    assert f"{weights} is truncated" in capsys.readouterr().err

    open(out / "teacher" / "model.safetensors", "wb").close()  # an empty file
    (tmp_path / "local").mkdir()
    shutil.copytree(out / "teacher", tmp_path / "local" / "teacher")
    local = write_recipe(tmp_path / "local.yaml", tiny_recipe(tmp_path / "out2", teacher={
        "model": str(tmp_path / "local" / "teacher")}))
    assert main(["compress", local, "--dry-run"]) == 2
    assert f"{tmp_path / 'local' / 'teacher' / 'model.safetensors'} is empty" in capsys.readouterr().err


def test_check_safetensors_accepts_whole_files_only(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "w.safetensors")
    save_file({"a": torch.ones(64), "b": torch.zeros(3, 5)}, path)
    check_safetensors(path)
    data = open(path, "rb").read()
    for cut, message in ((0, "empty"), (4, "empty"), (20, "unreadable header"), (len(data) - 1, "truncated")):
        open(path, "wb").write(data[:cut])
        with pytest.raises(ValueError, match=message):
            check_safetensors(path)


# ----------------------------------------------------------------------------------------------------- checkpoints
def fake_checkpoint(directory, step, state=None, weights=True):
    from safetensors.torch import save_file

    os.makedirs(directory / f"checkpoint-{step}")
    with open(directory / f"checkpoint-{step}" / "trainer_state.json", "w") as f:
        f.write(json.dumps({"global_step": step}) if state is None else state)
    if weights:
        save_file({"w": torch.ones(8)}, str(directory / f"checkpoint-{step}" / "model.safetensors"))


def test_damaged_latest_checkpoints_are_skipped_for_the_previous_good_one(tmp_path, caplog):
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8, state="")  # killed while the Trainer wrote trainer_state.json
    fake_checkpoint(tmp_path, 12)
    with open(tmp_path / "checkpoint-12" / "model.safetensors", "r+b") as f:
        f.truncate(30)
    fake_checkpoint(tmp_path, 16, weights=False)
    with caplog.at_level(logging.WARNING):
        assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"]
    assert "trainer_state.json is empty or cut short" in caplog.text and "is truncated" in caplog.text


# ----------------------------------------------------------------------------------------------------- resume
class Killed(Exception):
    pass


def interrupted_before_saving(monkeypatch, stage: int):
    """Make `compress` fail right after stage `stage` trained, as a kill before its directory is written does."""
    original = StageRunner.save

    def save(self):
        if self.index == stage:
            raise Killed("killed before saving")
        return original(self)

    monkeypatch.setattr(StageRunner, "save", save)


def test_resume_after_early_stop_reports_the_steps_of_the_final_weights(tmp_path, monkeypatch):
    """Stage 1 early-stops at step 8 (best model: step 4, as `test_intermediate_stage_stops_early_when_eval_kl_plateaus`
    shows for the uninterrupted run); killed before it was saved, the re-run must not train on, and must save the
    best checkpoint's weights with the steps of the uninterrupted run."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    recipe = recipe_from_dict(tiny_recipe(out, stages__budget__steps=[40, 2], early_stopping__patience=1,
                                          early_stopping__min_delta=100.0, teacher__build__pretrain_steps=5))
    with monkeypatch.context() as m:
        interrupted_before_saving(m, stage=1)
        with pytest.raises(Killed):
            compress(recipe)
    checkpoints = out / ".stage-1.work" / "checkpoints"
    assert not (out / ".lock").exists() and sorted(os.listdir(checkpoints)) == ["checkpoint-4", "checkpoint-8"]
    best = load_file(str(checkpoints / "checkpoint-4" / "model.safetensors"))
    compress(recipe)
    info = json.load(open(out / "stage-1" / "stage.json"))
    assert info["training"] == {**info["training"], "steps": 8, "stopped_at_step": 8, "early_stopped": True,
                                "tokens": 8 * 4 * 32}
    saved = load_file(str(out / "stage-1" / "model.safetensors"))
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in best)
    stage1 = [p["step"] for p in json.load(open(out / "trajectory.json"))["points"] if p["stage"] == 1]
    assert stage1 == [0, 4, 8]


def test_damaged_checkpoint_in_a_real_run_resumes_from_the_previous_one(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    recipe = recipe_from_dict(tiny_recipe(out, stages__budget__steps=[2, 8], teacher__build__pretrain_steps=5))
    with monkeypatch.context() as m:
        interrupted_before_saving(m, stage=2)
        with pytest.raises(Killed):
            compress(recipe)
    checkpoints = out / ".stage-2.work" / "checkpoints"
    open(checkpoints / "checkpoint-8" / "trainer_state.json", "w").close()
    with caplog.at_level(logging.INFO):
        compress(recipe)
    assert "Skipping the damaged checkpoint" in caplog.text and "Resuming stage 2 from" in caplog.text
    assert str(checkpoints / "checkpoint-4") in caplog.text
    assert json.load(open(out / "stage-2" / "stage.json"))["training"]["steps"] == 8


# ----------------------------------------------------------------------------------------------------- lock
def test_a_second_compress_into_a_running_output_dir_is_refused_with_the_pid(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "recipe.yaml", fast_recipe(out, stages__budget__steps=[200, 2]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "hf_slimmoe.cli", "compress", path, "--log-level", "WARNING"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and not (out / ".stage-1.work").exists():
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert main(["compress", path]) == 2
        assert f"in use by another run (PID {process.pid})" in capsys.readouterr().err
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert json.load(open(out / ".lock"))["pid"] == process.pid  # left behind by the killed run
    with caplog.at_level(logging.WARNING), RunLock(str(out)):  # a dead holder's lock is taken over
        assert json.load(open(out / ".lock"))["pid"] == os.getpid()
    assert f"PID {process.pid} is no longer running" in caplog.text and not (out / ".lock").exists()


# ----------------------------------------------------------------------------------------------------- what users see
def test_cards_load_from_the_final_directory(finished_run):
    for stage in ("stage-1", "stage-2"):
        card = open(finished_run / stage / "README.md").read()
        assert f'from_pretrained("{finished_run / stage}")' in card and ".tmp" not in card


def test_trajectory_plot_has_one_label_per_stage_outside_the_curves():
    """Close stages (a short early-stopped stage 1) must not overprint: stages are named once each, in a legend that
    does not overlap either plot."""
    from hf_slimmoe import SlimMoeConfig
    from hf_slimmoe.compression.trajectory import point
    from hf_slimmoe.hub.plot import trajectory_figure

    config = SlimMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    points = [point(0, 0, 0, config, {"eval_kl": 0.0, "eval_perplexity": 10.0})]
    for stage, (start, end, width) in enumerate(((0, 2, 48), (2, 3, 32), (3, 40, 16)), start=1):
        for step in range(start, end + 1):
            points.append(point(stage, step * 128, step, config.slimmed(intermediate_size=width),
                                {"eval_kl": 0.1 * stage, "eval_perplexity": 10.0 + stage}))
    fig = trajectory_figure({"points": points})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [label for label in labels if label.startswith(("stage", "teacher"))] == [
        "teacher", "stage 1", "stage 2", "stage 3"]
    assert all(not ax.texts for ax in fig.axes)  # no labels on the curves
    legend = fig.legends[0].get_window_extent(renderer)
    assert all(not legend.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
