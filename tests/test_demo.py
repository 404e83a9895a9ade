"""`slimmoe demo --fast` end to end (CPU, nothing downloaded), and the cached teacher being reused."""

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_slimmoe.cli import main
from hf_slimmoe.compression.demo import MODELS, demo_recipe, demo_teacher_key, ensure_teacher, run_demo
from hf_slimmoe.compression.sources import source_files


def test_demo_corpus_is_split_by_module_into_disjoint_train_and_held_out_sets():
    for fast in (False, True):
        recipe = demo_recipe("unused", fast=fast)
        train = source_files(recipe.data.train, "data.train", None)
        held_out = source_files(recipe.data.eval, "data.eval", None)
        tokenizer_files = source_files(type(recipe.data.train)(glob=recipe.teacher.build.tokenizer_files), "t", None)
        assert len(train) > 100 and len(held_out) > 20
        assert not set(train) & set(held_out) and not set(tokenizer_files) & set(held_out)
        assert len({os.path.dirname(f) for f in train}) == 1  # top-level modules only
        assert {os.path.relpath(f, os.path.dirname(train[0])).split(os.sep)[0] for f in held_out} == \
            {"email", "http", "urllib", "xml"}
    assert demo_teacher_key(demo_recipe("a")) == demo_teacher_key(demo_recipe("b"))  # not the output dir
    assert demo_teacher_key(demo_recipe("a")) != demo_teacher_key(demo_recipe("a", fast=True))


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("teacher-cache")
    output_dir = tmp_path_factory.mktemp("demo") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CI core, idle OpenMP threads spin-wait: one thread is faster and steadier
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HF_SLIMMOE_CACHE", str(cache))
            assert main(["demo", str(output_dir), "--fast"]) == 0
            yield output_dir, cache
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_demo_fast_writes_models_cards_and_summary(fast_demo):
    output_dir, _ = fast_demo
    with open(output_dir / "summary.json") as f:
        summary = json.load(f)
    rows = {row["model"]: row for row in summary["rows"]}
    assert list(rows) == list(MODELS)
    for row in rows.values():
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert row["kl"] > -1e-5 and 0 <= row["top1_agreement"] <= 1
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert abs(rows["teacher"]["kl"]) < 1e-5 and rows["teacher"]["top1_agreement"] == 1.0  # the teacher vs itself
    sizes = [rows[m]["num_parameters"] for m in MODELS]
    assert sizes[0] > sizes[1] > sizes[2] == sizes[3] == sizes[4]
    assert rows["stage-2"]["num_active_parameters"] < rows["teacher"]["num_active_parameters"]
    assert rows["stage-2"]["kl"] > 0
    for name in MODELS[1:]:
        directory = output_dir / name
        assert (directory / "README.md").is_file(), name
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert model.config.num_parameters() == rows[name]["num_parameters"]
        assert len(tokenizer) <= model.config.vocab_size
    assert (output_dir / "trajectory.png").is_file()
    table = (output_dir / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in MODELS) and "held-out perplexity" in table
    assert set(summary["step_seconds"]) and summary["total_seconds"] > 0


@pytest.mark.slow
def test_demo_second_run_starts_from_the_cached_teacher(fast_demo, tmp_path, caplog):
    output_dir, cache = fast_demo
    cached = cache / f"demo-teacher-{demo_teacher_key(demo_recipe(str(output_dir), fast=True))}"
    weights = cached / "model.safetensors"
    mtime = os.stat(weights).st_mtime_ns
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO, logger="hf_slimmoe"):
        patch.setenv("HF_SLIMMOE_CACHE", str(cache))
        teacher = ensure_teacher(str(tmp_path / "second"), fast=True)
    assert "Using the cached demo teacher" in caplog.text and "Building the teacher" not in caplog.text
    assert os.stat(weights).st_mtime_ns == mtime
    copied = (output_dir / "teacher" / "model.safetensors").read_bytes()
    assert Path(teacher, "model.safetensors").read_bytes() == copied


@pytest.mark.slow
def test_demo_rerun_reuses_every_finished_step(fast_demo, caplog):
    output_dir, cache = fast_demo
    stage_weights = output_dir / "stage-2" / "model.safetensors"
    mtime = os.stat(stage_weights).st_mtime_ns
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO, logger="hf_slimmoe"):
        patch.setenv("HF_SLIMMOE_CACHE", str(cache))
        summary = run_demo(str(output_dir), fast=True)
    assert "Reusing the teacher cache" in caplog.text and "nothing to do" in caplog.text
    assert "SFT is finished" in caplog.text and "DPO is finished" in caplog.text
    assert os.stat(stage_weights).st_mtime_ns == mtime
    assert [row["model"] for row in summary["rows"]] == list(MODELS)


@pytest.mark.slow
def test_demo_refuses_a_teacher_built_with_other_settings(fast_demo):
    output_dir, _ = fast_demo
    with pytest.raises(ValueError, match="other settings"):
        ensure_teacher(str(output_dir), fast=False)
