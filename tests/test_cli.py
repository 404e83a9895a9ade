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


def test_info_says_what_is_slimmed_kept_and_refused_for_any_family(tmp_path, capsys):
    """`slimmoe info` on stock checkpoints of other families: what slims, whether attention prunes (or why not), what
    stays as it is, and a refused family's reason (exit 0: the model is described, not an error)."""
    from family_models import tiny_model

    for model_type in ("qwen3_moe", "deepseek_v3", "olmoe", "ergo"):
        tiny_model(model_type).save_pretrained(tmp_path / model_type)
    assert main(["info", str(tmp_path / "qwen3_moe")]) == 0
    out = capsys.readouterr().out
    assert "attention pruning        yes: GQA groups (num_key_value_heads)" in out
    assert "modeling_qwen3_moe.load_balancing_loss_func" in out and "exports as               qwen3_moe" in out
    assert main(["info", str(tmp_path / "deepseek_v3"), "--json"]) == 0
    slimming = json.loads(capsys.readouterr().out)["slimming"]
    assert slimming["attention"].startswith("no: it uses multi-head latent attention (MLA)")
    assert "`n_shared_experts`" in slimming["shared"] and "`DeepseekV3MLP` (3 of 4 layers)" in slimming["kept"]
    assert slimming["aux_loss"] == "none (KD alone)"
    assert main(["info", str(tmp_path / "olmoe")]) == 0
    out = capsys.readouterr().out
    assert "attention pruning        no: OlmoeAttention: q_norm holds weights of shapes [(64,)]" in out
    assert "kept as they are         OlmoeAttention (4 of 4 layers)" in out
    assert main(["info", str(tmp_path / "ergo")]) == 0
    assert "SlimMoE      refused: ergo: routed experts: the experts module holds" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "ergo"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["refused"].startswith("ergo: routed experts") and "num_parameters" not in info


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


# ------------------------------------------------------------------------------------- the error boundary
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from hf_slimmoe.cli import COMMANDS  # noqa: E402


def _error_lines(capsys) -> list[str]:
    """The error lines the boundary printed (logging may share stderr), after checking no traceback went there."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if ": error: " in line]


def _tiny_model_dir(path, weights: bytes | None = None):
    config = SlimMoeConfig(vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, head_dim=16)
    SlimMoeForCausalLM(config).save_pretrained(path)
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_weights_file_is_named_in_one_line(tmp_path, capsys, damage):
    model = _tiny_model_dir(tmp_path / "model")
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(b"" if damage == "empty" else weights[:-64])
    for argv in (["info", str(model)], ["export", str(model), str(tmp_path / "out")], ["eval", str(model)],
                 ["prune", str(model), "--scores", "s.safetensors", "--output-dir", str(tmp_path / "p")]):
        assert main(argv) == 2
        lines = _error_lines(capsys)
        assert len(lines) == 1 and f"{model / 'model.safetensors'} is " in lines[0], (argv, lines)
        assert "truncated" in lines[0] and "re-run the command that wrote it" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_missing_model_directory_is_named(tmp_path, capsys):
    missing = str(tmp_path / "outputs" / "stage-9")
    assert main(["eval", missing]) == 2
    assert _error_lines(capsys) == [f"slimmoe eval: error: MODEL {missing} does not exist: pass a model directory "
                                    "(config.json and *.safetensors) or a Hub id such as org/model."]
    assert main(["eval", str(_tiny_model_dir(tmp_path / "m")), "--teacher", missing]) == 2
    assert "--teacher" in _error_lines(capsys)[0]


def test_non_positive_sizes_are_refused_before_any_work(capsys):
    for argv in (["eval", "m", "--block-size", "0"], ["demo", "--threads", "0"], ["eval", "m", "--top-k", "x"],
                 ["score", "m", "--data", "d", "--output", "o", "--batch-size", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        lines = _error_lines(capsys)
        flag = argv[-2]
        assert len(lines) == 1 and f"argument {flag}:" in lines[0] and "positive integer" in lines[0], lines


def test_empty_text_file_for_cache_teacher_is_named(tmp_path, capsys):
    from hf_slimmoe.posttrain import build_tiny_tokenizer

    model = _tiny_model_dir(tmp_path / "teacher")
    build_tiny_tokenizer(vocab_size=80).save_pretrained(model)
    (tmp_path / "empty.txt").write_text("")
    assert main(["cache-teacher", str(model), str(tmp_path / "empty.txt"), str(tmp_path / "cache")]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and str(tmp_path / "empty.txt") in lines[0]


def test_binary_recipe_and_config_files_are_named(tmp_path, capsys):
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    for argv in (["compress", str(binary)], ["compress", str(binary), "--dry-run"], ["plan", str(binary)],
                 ["sft", str(binary)], ["distill", "--config", str(binary)]):
        assert main(argv) == 2
        lines = _error_lines(capsys)
        assert len(lines) == 1 and f"{binary} is not a valid YAML text file" in lines[0], (argv, lines)


def test_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    model = _tiny_model_dir(tmp_path / "model")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny-cpu.yaml")
    for argv, name in ((["export", str(model), str(a_file)], "OUTPUT_DIR"),
                       (["prune", str(model), "--scores", "s", "--output-dir", str(a_file)], "--output-dir"),
                       (["compress", recipe, "--dry-run", "--output-dir", str(a_file)], "output_dir"),
                       (["demo", str(a_file), "--fast"], "OUTPUT_DIR"),
                       (["cache-teacher", str(model), "data.txt", str(a_file)], "OUTPUT")):
        assert main(argv) == 2
        lines = _error_lines(capsys)
        assert lines == [f"slimmoe {argv[0]}: error: {name} {a_file} is a file, not a directory: choose another "
                         "path or remove the file."], (argv, lines)
    assert a_file.read_text() == "keep me\n"


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    first, second = _tiny_model_dir(tmp_path / "first"), tmp_path / "second"
    config = SlimMoeConfig(vocab_size=80, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, head_dim=16)
    SlimMoeForCausalLM(config).save_pretrained(second)
    out = tmp_path / "stock"
    assert main(["export", str(first), str(out)]) == 0
    (out / "README.md").write_text("a card describing the first model\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", str(second), str(out)]) == 2
    (line,) = _error_lines(capsys)
    assert "exists and is not empty" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert main(["export", str(second), str(out), "--overwrite"]) == 0
    assert not (out / "README.md").exists()  # nothing of the first export is left beside the second
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 8
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine\n")
    assert main(["export", str(second), str(tmp_path / "notes"), "--overwrite"]) == 2  # not a model directory
    assert "holds no model" in _error_lines(capsys)[0]
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine\n"


def test_expected_errors_print_one_line_unexpected_ones_keep_their_traceback(monkeypatch, capsys):
    info = COMMANDS["info"]
    expected = [ValueError("a value\nover two lines"), FileNotFoundError("no such file x"),
                PermissionError(13, "Permission denied", "out/stage-1"), type("OutputDirError", (ValueError,), {})(
                    "out is locked by PID 123 on host h (a run writing there).")]
    for error in expected:
        monkeypatch.setattr(info, "run", lambda args, extra_args, error=error: (_ for _ in ()).throw(error))
        assert main(["info"]) == 2
        lines = _error_lines(capsys)
        assert lines == [f"slimmoe info: error: {' '.join(str(error).split())}"], lines
    monkeypatch.setattr(info, "run", lambda args, extra_args: (_ for _ in ()).throw(KeyError("bug")))
    with pytest.raises(KeyError, match="bug"):  # a bug: the traceback is kept (main re-raises)
        main(["info"])


def test_ctrl_c_prints_how_to_resume(monkeypatch, capsys):
    monkeypatch.setattr(COMMANDS["info"], "run", lambda args, extra_args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["info"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    assert "Traceback" not in err


def test_ctrl_c_in_a_running_command(tmp_path):
    """A real SIGINT to `slimmoe demo` while it works: exit status 130, the resume hint, no traceback.

    The command starts with SIGINT's default disposition, as from a terminal: a test runner started in the background
    of a non-interactive shell ignores SIGINT, and a child would inherit that (Python then never raises
    KeyboardInterrupt)."""
    env = {**os.environ, "HF_SLIMMOE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "hf_slimmoe.cli", "demo", str(tmp_path / "demo"), "--fast",
                                "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started = time.monotonic()
    line = "\n"
    while line and "====" not in line:  # the first step's banner: the command is running
        line = process.stdout.readline()
    assert "====" in line, process.stderr.read()[-2000:]
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    assert "Traceback" not in err and time.monotonic() - started < 120


def test_dataclass_commands_read_config_files_and_flags_override_them(tmp_path, monkeypatch):
    """`distill` parses through TrlParser: --config FILE, FILE first, --config=FILE; flags win; env: is applied."""
    monkeypatch.delenv("SLIMMOE_TEST_VAR", raising=False)
    config = tmp_path / "distill.yaml"
    config.write_text(f"student: {tmp_path}\ndataset: data\noutput_dir: {tmp_path / 'out'}\nmax_steps: 100\n"
                      "learning_rate: 1e-3\ntop_k: 4\nenv:\n  SLIMMOE_TEST_VAR: hello\n")
    command = COMMANDS["distill"]
    for argv in (["--config", str(config), "--max_steps", "3"], [str(config), "--max_steps", "3"],
                 ["--max_steps", "3", f"--config={config}"]):
        (script_args, training_args), sections = command.parse(argv)
        assert (training_args.max_steps, training_args.learning_rate, training_args.top_k) == (3, 1e-3, 4)
        assert script_args.dataset == "data" and sections == {}
    assert os.environ["SLIMMOE_TEST_VAR"] == "hello"
    (script_args, training_args), _ = command.parse(["--student", "s", "--dataset", "d", "--output_dir", "o"])
    assert training_args.max_steps == -1  # no file: the dataclass defaults
    config.write_text("student: s\ndataset: d\ntop_kk: 8\n")
    with pytest.raises(ValueError, match=r"Unknown key\(s\) in .*distill.yaml: top_kk"):
        command.parse(["--config", str(config)])


def test_parse_config_file_serves_user_scripts(tmp_path):
    """The library function behind the dataclass commands: the file's fields, flags over them, `sections` returned
    beside the instances, field `defaults` the file can still override, an unknown key named with the help hint."""
    import dataclasses

    from hf_slimmoe import DistillationConfig
    from hf_slimmoe.utils.config_io import parse_config_file

    @dataclasses.dataclass
    class ScriptArgs:
        data: str = "default"

    config = tmp_path / "x.yaml"
    config.write_text(f"data: mine\noutput_dir: {tmp_path / 'out'}\nmax_steps: 5\nhub: {{repo_id: a/b}}\n")
    (script, training), sections = parse_config_file((ScriptArgs, DistillationConfig), config, ["--max_steps", "7"],
                                                    defaults={"top_k": 4, "max_steps": 2}, sections=("hub",))
    assert (script.data, training.max_steps, training.top_k) == ("mine", 7, 4)
    assert sections == {"hub": {"repo_id": "a/b"}}
    config.write_text("dataa: x\n")
    with pytest.raises(ValueError, match=r"Unknown key\(s\) in .*x.yaml: dataa; `my.py --help` lists the fields"):
        parse_config_file((ScriptArgs, DistillationConfig), config, help_command="my.py --help")
