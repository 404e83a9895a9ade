"""The `--cpu` path of `benchmarks/gpu_check.py`, the prepared one-GPU check: it runs end to end and writes its table."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")


@pytest.mark.slow
def test_gpu_check_cpu_path_writes_every_phase(tmp_path):
    output = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, SCRIPT, "--cpu", "--output", str(output)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())

    assert list(report["phases"]) == ["scoring", "prune", "cache", "kd_step", "plain_step"]
    for name, phase in report["phases"].items():
        assert phase["seconds"] > 0 and phase["peak_memory_gib"] > 0, name
        if name != "prune":
            assert phase["tokens"] > 0 and phase["tokens_per_s"] > 0, name
    assert report["ratios"]["kd_over_plain_step_time"] > 0
    assert report["ratios"]["kd_over_plain_peak_memory"] > 0
    # the tiny shape was pruned to its stage-1 widths and trained through the kernels the table names
    assert report["shape"]["student"] == {"intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}
    assert report["kernels"]["attention"] == "sdpa"
    assert report["kernels"]["kd_step"]["implementation"] == report["kernels"]["plain_step"]["implementation"]
    assert report["vllm"] == "skipped (--cpu)"
    assert "| kd_step |" in result.stdout and "KD / plain: step time" in result.stdout
