"""The `slimmoe` command: help, `info` on directories and config files, errors."""

import json
import shutil
import subprocess

import pytest
from transformers import LlamaConfig

from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slimmoe.cli import main


def test_console_script_help():
    slimmoe = shutil.which("slimmoe")
    assert slimmoe, "the `slimmoe` console script is not installed (pip install -e .)"
    result = subprocess.run([slimmoe, "--help"], capture_output=True, text=True, check=True)
    assert "info" in result.stdout


def test_every_command_has_help(capsys):
    from hf_slimmoe.cli import COMMANDS

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"slimmoe {command}" in capsys.readouterr().out


def test_info_on_checkpoint_directory_counts_stored_tensors(tmp_path, capsys):
    config = SlimMoeConfig(vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, head_dim=12,
                           attention_bias=True, lm_head_bias=True)
    SlimMoeForCausalLM(config).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_parameters"] == config.num_parameters() == info["stored_parameters"]
    assert info["num_active_parameters"] == config.num_active_parameters()
    assert (info["num_attention_heads"], info["num_key_value_heads"], info["head_dim"]) == (4, 2, 12)


def test_info_on_phi35_config_json(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "phimoe", "vocab_size": 32064, "hidden_size": 4096,
                                "intermediate_size": 6400, "num_hidden_layers": 32, "num_attention_heads": 32,
                                "num_key_value_heads": 8, "num_local_experts": 16, "num_experts_per_tok": 2,
                                "attention_bias": True, "lm_head_bias": True}))
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "41.87B" in out and "6.64B" in out and "32/8 (head_dim 128)" in out


def test_info_without_path_builds_a_tiny_model(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stored_parameters"] == info["num_parameters"] > 0


def test_info_errors_name_the_problem(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "No config.json" in capsys.readouterr().err
    LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 2
    assert "model_type 'llama'" in capsys.readouterr().err


def test_export_command_writes_a_stock_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, PhimoeForCausalLM

    config = SlimMoeConfig(vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, head_dim=12)
    model = SlimMoeForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "slim")
    assert main(["export", str(tmp_path / "slim"), str(tmp_path / "stock")]) == 0
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["model_type"] == "phimoe"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    assert type(stock) is PhimoeForCausalLM and stock.config.head_dim == 12
