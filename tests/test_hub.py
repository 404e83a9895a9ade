"""Model cards and publishing, with the real `huggingface_hub` client talking HTTP to a local Hub stand-in.

The stand-in (`tests/hub_server.py`) binds to 127.0.0.1; tests point `huggingface_hub` at it the way a user does
(`HF_ENDPOINT`: set in the environment of a subprocess, or the already-imported `constants.ENDPOINT` in-process) and
disable Xet storage so large files go through the LFS batch API that the stand-in implements.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants

from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slimmoe.cli import main as cli_main
from hf_slimmoe.hub import HubSettings, publish_stage, write_model_card

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LocalHub, SilentServer  # noqa: E402

TOKEN = "hf_TESTtokenDoNotLeak_7f3c9a1e5b"
TEACHER = "microsoft/Phi-3.5-MoE-instruct"
NUM_STAGES = 2


def _teacher_config() -> SlimMoeConfig:
    return SlimMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)


def _build_output_dir(out: Path, hub: dict | None = None) -> Path:
    """An OUTPUT_DIR as the pipeline leaves it: recipe.yaml, trajectory.json, stage-1/ .. stage-T/ (contract keys)."""
    torch.manual_seed(0)
    teacher = _teacher_config()
    keys = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
            "num_local_experts", "num_experts_per_tok")
    teacher_config = {k: getattr(teacher, k) for k in keys}
    teacher_config.update(num_parameters=teacher.num_parameters(),
                          num_active_parameters=teacher.num_active_parameters())
    points = [{"stage": 0, "tokens": 0, "step": 0, "num_parameters": teacher.num_parameters(),
               "num_active_parameters": teacher.num_active_parameters(), "eval_kl": 0.0, "eval_perplexity": 5.0,
               "eval_top1_agreement": 1.0}]
    trajectory = {}
    for i in range(1, NUM_STAGES + 1):
        cfg = teacher.slimmed(intermediate_size=32 - 8 * i, num_key_value_heads=2 if i == 1 else 1)
        stage_dir = out / f"stage-{i}"
        SlimMoeForCausalLM(cfg).save_pretrained(stage_dir)
        points.append({"stage": i, "tokens": 1000 * i, "step": 10 * i, "num_parameters": cfg.num_parameters(),
                       "num_active_parameters": cfg.num_active_parameters(), "eval_kl": 0.5 / i,
                       "eval_perplexity": 9.0 / i, "eval_top1_agreement": 0.6})
        stage = {
            "stage": i, "num_stages": NUM_STAGES, "method": "multi-stage", "teacher": TEACHER,
            "parent": str(out / f"stage-{i - 1}") if i > 1 else TEACHER, "recipe": "tiny-test", "license": "mit",
            "datasets": ["HuggingFaceFW/fineweb-edu", "/data/local/*.txt"], "teacher_config": teacher_config,
            "training": {"tokens": 1000, "steps": 10, "learning_rate": 1e-4, "kd_loss": "sampled", "kd_samples": 8,
                         "top_k": 8, "temperature": 1.0,
                         "aux_loss_coef": 0.01, "ce_weight": 0.0, "early_stopped": i < NUM_STAGES,
                         "stopped_at_step": 10 if i < NUM_STAGES else None, "max_steps": 20},
            "eval": {"full_kl": 0.25 / i, "kl": 0.5 / i, "perplexity": 9.0 / i, "top1_agreement": 0.6},
        }
        (stage_dir / "stage.json").write_text(json.dumps(stage, indent=2))
        trajectory = {"teacher": {"name": TEACHER, "num_parameters": teacher.num_parameters(),
                                  "num_active_parameters": teacher.num_active_parameters()}, "points": list(points)}
        (stage_dir / "trajectory.json").write_text(json.dumps(trajectory, indent=2))
    (out / "trajectory.json").write_text(json.dumps(trajectory, indent=2))
    hub = hub if hub is not None else {"push_to_hub": True, "repo_id": "{user}/tiny-moe-stage{stage}"}
    (out / "recipe.yaml").write_text(yaml.safe_dump({"name": "tiny-test", "hub": hub}))
    return out


@pytest.fixture(scope="module")
def template_output(tmp_path_factory) -> Path:
    return _build_output_dir(tmp_path_factory.mktemp("template") / "out")


@pytest.fixture
def output_dir(template_output, tmp_path) -> Path:
    return Path(shutil.copytree(template_output, tmp_path / "out"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub on 127.0.0.1 that `huggingface_hub` (already imported) talks to, with the token in HF_TOKEN."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    with LocalHub(token=TOKEN, user="tester") as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        yield server


# ------------------------------------------------------------------------------------------------------ cards
def test_card_metadata_sections_and_plot(output_dir, hub):
    stage_dir = output_dir / "stage-2"
    path = write_model_card(stage_dir)
    assert path == stage_dir / "README.md"

    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers"
    assert data.base_model == TEACHER
    assert data.license == "mit"
    assert data.datasets == ["HuggingFaceFW/fineweb-edu"]  # Hub dataset ids only; local data is named in the text
    assert {"moe", "pruning", "distillation", "slimmoe"} <= set(data.tags)
    results = [(r.metric_name, r.metric_value) for r in data.eval_results]
    assert [value for _, value in results] == [0.125, 0.25, 4.5, 0.6]
    assert results[0][0] == "full-vocabulary KL to the teacher"
    card.validate()  # POST /api/validate-yaml, as the Hub checks every README.md pushed

    text = card.text
    assert "stage 2 of 2" in text and "`/data/local/*.txt`" in text
    assert "with the sampled KD loss: cross-entropy on 8 tokens drawn from the teacher per position" in text
    assert "top-8 KL" not in text and "| KD loss | sampled |" in text
    assert "| d_expert (expert width) | 16 | 32 | 50.0% |" in text
    assert "| attention heads q / kv | 2 / 1 | 4 / 2 | 50.0% |" in text
    assert "| layers | 2 | 2 | 100.0% |" in text
    assert "| experts per token (top-k) | 2 | 2 | 100.0% |" in text
    total = SlimMoeConfig.from_pretrained(stage_dir).num_parameters()
    teacher_total = _teacher_config().num_parameters()
    assert f"{100 * total / teacher_total:.1f}%" in text
    assert "| learning rate | 0.0001 |" in text and "| KD teacher top-k | 8 |" in text
    assert "export_phimoe" in text and "import hf_slimmoe" in text
    assert "arXiv:2506.18349" in text
    assert "![Compression trajectory](trajectory.png)" in text
    assert (stage_dir / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # stage 1 was early-stopped, and its card says where
    assert "stopped at step 10" in ModelCard.load(write_model_card(output_dir / "stage-1")).text


def test_card_and_push_for_post_training_output_without_stage_keys(output_dir, hub):
    dpo_dir = output_dir / "dpo"
    shutil.copytree(output_dir / "stage-2", dpo_dir)
    (dpo_dir / "trajectory.json").unlink()
    (dpo_dir / "trajectory.png").unlink(missing_ok=True)
    (dpo_dir / "stage.json").write_text(json.dumps({"method": "dpo", "parent": "tester/tiny-moe-stage2",
                                                     "teacher": None, "license": None,
                                                     "eval": {"eval_loss": 0.69}}))
    card = ModelCard.load(write_model_card(dpo_dir))
    assert "dpo" in card.data.tags and card.data.eval_results is None
    assert card.data.base_model == "tester/tiny-moe-stage2"  # no teacher: descends from its parent
    assert "[tester/tiny-moe-stage2](https://huggingface.co/tester/tiny-moe-stage2)" in card.text
    assert "| eval loss | 0.69 |" in card.text
    assert "## Training" not in card.text and "## Compression trajectory" not in card.text
    assert not (dpo_dir / "trajectory.png").exists()
    # published like a stage, with the method in place of the stage number
    assert publish_stage(dpo_dir, HubSettings(push_to_hub=True, repo_id="{user}/tiny-slimmoe-{stage}")) is True
    assert hub.commits("tester/tiny-slimmoe-dpo")[0].title.startswith("SlimMoE dpo")


def test_card_command_regenerates_without_training(output_dir, capsys):
    (output_dir / "stage-1" / "README.md").unlink(missing_ok=True)
    assert cli_main(["card", str(output_dir / "stage-1"), "--repo-id", "someone/tiny-stage1"]) == 0
    text = (output_dir / "stage-1" / "README.md").read_text()
    assert 'from_pretrained("someone/tiny-stage1")' in text
    assert cli_main(["card", str(output_dir)]) == 2  # no stage.json there: a clear error, not a traceback
    assert "stage.json" in capsys.readouterr().err


def test_settings_validation_names_the_key():
    with pytest.raises(ValueError, match="hub.layout"):
        HubSettings(repo_id="a/b{stage}", layout="one-repo")
    with pytest.raises(ValueError, match=r"hub.repo_id.*\{stage\}"):
        HubSettings(push_to_hub=True, repo_id="me/model")
    with pytest.raises(ValueError, match="hub.repo_id"):
        HubSettings(push_to_hub=True)
    with pytest.raises(ValueError, match="hub.revision"):
        HubSettings.from_dict({"repo_id": "me/m{stage}", "revision": "x"})
    settings = HubSettings.from_dict({"repo_id": "{user}/m", "layout": "branch-per-stage"})
    assert settings.target(3, user="me") == ("me/m", "stage-3")


# ------------------------------------------------------------------------------------------------------ publishing
def test_publish_repo_per_stage_commits_weights_card_plot_then_is_idempotent(output_dir, hub):
    settings = HubSettings(push_to_hub=True, repo_id="{user}/tiny-moe-stage{stage}", private=True)
    stage_dir = output_dir / "stage-1"
    assert publish_stage(stage_dir, settings) is True

    repo = hub.repos["tester/tiny-moe-stage1"]
    assert repo.private
    head = hub.commits("tester/tiny-moe-stage1")[0]
    assert head.title.startswith("SlimMoE stage 1/2 (d_expert 24, heads 4/2")
    assert "model.safetensors" in head.description and "README.md" in head.description
    for name in ("model.safetensors", "config.json", "generation_config.json", "README.md", "trajectory.png",
                 "stage.json", "trajectory.json"):
        assert hub.file("tester/tiny-moe-stage1", name) == (stage_dir / name).read_bytes(), name
    assert "lfs" in head.files["model.safetensors"] and "lfs" in head.files["trajectory.png"]  # LFS batch + PUT
    assert 'from_pretrained("tester/tiny-moe-stage1")' in hub.file("tester/tiny-moe-stage1", "README.md").decode()

    # same stage again: no new commit, and no file content goes over the wire
    n_commits, n_requests = len(hub.commits("tester/tiny-moe-stage1")), len(hub.requests)
    assert publish_stage(stage_dir, settings) is True
    assert len(hub.commits("tester/tiny-moe-stage1")) == n_commits
    assert not [r for r in hub.requests[n_requests:] if "/commit/" in r["path"] or r["path"].startswith("/lfs/")]

    # a changed stage: one new commit with only what changed
    info = json.loads((stage_dir / "stage.json").read_text())
    info["eval"]["kl"] = 0.4
    (stage_dir / "stage.json").write_text(json.dumps(info))
    assert publish_stage(stage_dir, settings) is True
    history = hub.commits("tester/tiny-moe-stage1")
    assert len(history) == n_commits + 1
    changed = {p for p in history[0].files if history[0].files[p] != history[1].files.get(p)}
    assert changed == {"stage.json", "README.md"}


def test_publish_branch_per_stage(output_dir, hub):
    settings = HubSettings(push_to_hub=True, repo_id="tester/tiny-moe", layout="branch-per-stage")
    assert publish_stage(output_dir / "stage-1", settings)
    assert publish_stage(output_dir / "stage-2", settings)
    repo = hub.repos["tester/tiny-moe"]
    assert set(repo.branches) == {"main", "stage-1", "stage-2"} and not repo.private
    assert hub.commits("tester/tiny-moe", "stage-2")[0].title.startswith("SlimMoE stage 2/2")
    assert hub.file("tester/tiny-moe", "stage.json", "stage-2") == (output_dir / "stage-2" / "stage.json").read_bytes()
    card = hub.file("tester/tiny-moe", "README.md", "stage-2").decode()
    assert 'from_pretrained("tester/tiny-moe", revision="stage-2")' in card
    assert "(https://huggingface.co/tester/tiny-moe/tree/stage-1)" in card  # the parent, one branch back


def test_failed_push_keeps_stage_and_push_command_publishes_later(output_dir, hub, caplog, capsys):
    settings = HubSettings(push_to_hub=True, repo_id="{user}/tiny-moe-stage{stage}")
    before = sorted(p.name for p in (output_dir / "stage-1").iterdir())
    hub.fail_with = 500
    with caplog.at_level(logging.WARNING, logger="hf_slimmoe"):
        assert publish_stage(output_dir / "stage-1", settings) is False
    assert "Could not push" in caplog.text and "slimmoe push" in caplog.text
    assert set(before) <= {p.name for p in (output_dir / "stage-1").iterdir()}
    assert hub.repos == {}

    hub.fail_with = None
    (output_dir / "stage-3").mkdir()  # a stage still being written is skipped, not pushed half-done
    assert cli_main(["push", str(output_dir)]) == 0
    out = capsys.readouterr().out
    assert "pushed (or already up to date): stage-1, stage-2" in out and "skipped (incomplete): stage-3" in out
    assert len(hub.commits("tester/tiny-moe-stage1")) == 2 and len(hub.commits("tester/tiny-moe-stage2")) == 2
    assert cli_main(["push", str(output_dir), "--stage", "2"]) == 0  # unchanged: no new commit
    assert len(hub.commits("tester/tiny-moe-stage2")) == 2


def test_commit_failure_after_upload_then_retry(output_dir, hub):
    settings = HubSettings(push_to_hub=True, repo_id="tester/tiny-moe", layout="branch-per-stage")
    hub.fail_with, hub.fail_on = 503, r"/commit/"
    assert publish_stage(output_dir / "stage-1", settings) is False
    assert hub.commits("tester/tiny-moe", "stage-1")[0].title == "initial commit"  # branch made, nothing committed
    assert hub.lfs  # the weights were uploaded before the commit failed
    hub.fail_with = hub.fail_on = None
    n_requests = len(hub.requests)
    assert publish_stage(output_dir / "stage-1", settings) is True
    assert hub.commits("tester/tiny-moe", "stage-1")[0].title.startswith("SlimMoE stage 1/2")
    assert not [r for r in hub.requests[n_requests:] if r["method"] == "PUT"]  # LFS objects are not sent twice


def test_push_without_token_fails_softly(output_dir, hub, monkeypatch, caplog):
    monkeypatch.delenv("HF_TOKEN")
    with caplog.at_level(logging.WARNING, logger="hf_slimmoe"):
        assert publish_stage(output_dir / "stage-1", HubSettings(repo_id="{user}/m{stage}")) is False
    assert "no Hugging Face token" in caplog.text


def _assert_token_absent(hub: LocalHub, paths: list[Path], texts: list[str]) -> None:
    leaks = [str(p) for root in paths for p in [root, *root.rglob("*")]
             if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    assert all(TOKEN not in text for text in texts)
    for repo in hub.repos.values():  # nor in anything committed
        for commit in repo.commits.values():
            assert TOKEN not in commit.title + commit.description
            for path, entry in commit.files.items():
                assert TOKEN.encode() not in (entry["data"] if "data" in entry else hub.lfs[entry["lfs"]]), path
    assert all(TOKEN.encode() not in r["body"] for r in hub.requests)
    assert any(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)  # it was used


def test_token_never_written_logged_or_raised(output_dir, hub, tmp_path, caplog, capsys):
    """Card, failed push, successful push and no-op re-push with every logger at DEBUG: the token goes to the Hub in
    the Authorization header and appears in no file, card, log record, printed line or error message."""
    for name in (None, "huggingface_hub", "httpx2", "httpx", "hf_slimmoe"):
        caplog.set_level(logging.DEBUG, logger=name)
    settings = HubSettings(push_to_hub=True, repo_id="{user}/tiny-moe-stage{stage}")
    errors = []
    assert cli_main(["card", str(output_dir / "stage-1"), "--log-level", "DEBUG"]) == 0
    hub.fail_with = 500
    assert cli_main(["push", str(output_dir), "--log-level", "DEBUG"]) == 1
    hub.fail_with = 401  # a bad token is a server answer too: logged, not raised
    assert publish_stage(output_dir / "stage-1", settings) is False
    hub.fail_with = None
    assert cli_main(["push", str(output_dir), "--log-level", "DEBUG"]) == 0
    assert publish_stage(output_dir / "stage-2", settings, token=TOKEN) is True  # explicit token, unchanged stage
    try:  # the client's own errors, as a caller of HfApi would see them
        from huggingface_hub import HfApi

        HfApi().model_info("tester/no-such-repo")
    except Exception as e:  # noqa: BLE001
        errors.append(f"{e!r} {e}")
    assert errors and "no-such-repo" in errors[0]
    captured = capsys.readouterr()
    assert "Could not push" in caplog.text and "Pushed" in caplog.text and "nothing to push" in caplog.text
    assert len(hub.commits("tester/tiny-moe-stage1")) == 2
    _assert_token_absent(hub, [output_dir, tmp_path / "hf_home"],
                         [caplog.text, captured.out, captured.err, *errors,
                          *(str(r.args) for r in caplog.records)])


def test_push_command_in_a_fresh_process_reads_hf_endpoint_and_hf_token(output_dir, hub, tmp_path):
    """`slimmoe push` as a user runs it: endpoint and token only from the environment (HF_ENDPOINT is read when
    huggingface_hub is imported), DEBUG logging; nothing the process prints or writes contains the token."""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "hf_slimmoe.cli", "push", str(output_dir), "--stage", "1",
                             "--log-level", "DEBUG"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pushed (or already up to date): stage-1" in result.stdout
    assert hub.file("tester/tiny-moe-stage1", "model.safetensors") == (output_dir / "stage-1" / "model.safetensors"
                                                                         ).read_bytes()
    _assert_token_absent(hub, [output_dir, tmp_path / "hf_home"], [result.stdout, result.stderr])


# ------------------------------------------------------------------------------------------------------ timeouts
@pytest.fixture
def silent_hub(tmp_path, monkeypatch):
    """A Hub endpoint that accepts connections and never answers, with a 1 s huggingface_hub timeout."""
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    with SilentServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        yield server


def test_push_to_a_hub_that_never_answers_gives_up_with_a_clear_message(output_dir, silent_hub, caplog, capsys):
    from huggingface_hub import get_session

    before = get_session().timeout
    for repo_id in ("{user}/tiny-moe-stage{stage}", "tester/tiny-moe-stage{stage}"):  # whoami or create_repo first
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="hf_slimmoe"):
            assert cli_main(["push", str(output_dir), "--repo-id", repo_id]) == 1
        assert time.monotonic() - started < 60  # 2 stages x (1 s timeout + no retry of a plain call); never forever
        captured = capsys.readouterr()
        assert "failed: stage-1, stage-2" in captured.out
        assert captured.err.strip().splitlines()[-1].startswith("slimmoe push: error: 2 stage(s) not pushed")
        assert caplog.text.count(f"did not answer within 1 s") == 2 and "HF_HUB_DOWNLOAD_TIMEOUT" in caplog.text
        caplog.clear()
    assert silent_hub.connections  # it was asked
    assert get_session().timeout == before  # the shared client's setting is restored


def test_push_command_times_out_in_a_fresh_process(output_dir, tmp_path):
    """As a user runs it: HF_ENDPOINT and HF_HUB_DOWNLOAD_TIMEOUT only from the environment."""
    with SilentServer() as silent:
        env = {**os.environ, "HF_ENDPOINT": silent.endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf_home"),
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "hf_slimmoe.cli", "push", str(output_dir), "--stage", "1"],
                                env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "did not answer within 1 s" in result.stderr and "Traceback" not in result.stderr


def test_compress_continues_past_a_push_to_a_hub_that_never_answers(tmp_path, silent_hub, caplog):
    from test_pipeline import tiny_recipe, write_recipe

    from hf_slimmoe.compression.resume import is_finished_stage

    out = tmp_path / "run"
    values = tiny_recipe(out, stages__budget__steps=[2, 2], teacher__build__pretrain_steps=4,
                         hub={"push_to_hub": True, "repo_id": "tester/tiny-moe-stage{stage}"})
    recipe = write_recipe(tmp_path / "recipe.yaml", values)
    with caplog.at_level(logging.WARNING, logger="hf_slimmoe"):
        assert cli_main(["compress", recipe, "--log-level", "WARNING"]) == 0
    assert is_finished_stage(str(out / "stage-1")) and is_finished_stage(str(out / "stage-2"))
    assert caplog.text.count("did not answer within 1 s") == 2  # each stage's push gave up; the run went on
