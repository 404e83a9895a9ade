"""`import hf_slimmoe` is light, every public name still imports, and "slimmoe" reaches the Auto classes in any
import order."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "matplotlib")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_and_cli_help_load_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "import hf_slimmoe\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "from hf_slimmoe.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert 'compress' in out.getvalue()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "[]"]
    result = subprocess.run([sys.executable, "-m", "hf_slimmoe.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "compress" in result.stdout, result.stderr


@pytest.mark.parametrize("module, absent", [
    ("hf_slimmoe.pruning.sensitivity", ("trl", "datasets", "peft")),  # the lazy package loads only this submodule
    # the schema is plain Python and YAML; its KD fields come from distillation/, whose lazy package loads only
    # transformers.utils (for `_LazyModule`), not torch
    ("hf_slimmoe.compression.recipe", ("torch", "trl", "datasets")),
])
def test_a_submodule_loads_only_what_it_needs(module, absent):
    result = _run(f"import sys, {module}\nprint(sorted(m for m in {absent!r} if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_public_name_imports():
    import hf_slimmoe

    for name in hf_slimmoe.__all__:
        assert getattr(hf_slimmoe, name) is not None
    assert set(hf_slimmoe.__all__) <= set(dir(hf_slimmoe))
    with pytest.raises(AttributeError, match="no_such_name"):
        hf_slimmoe.no_such_name  # noqa: B018


_CHECK = """
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model("slimmoe", vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, head_dim=16)
model = AutoModelForCausalLM.from_config(config)
assert type(model).__name__ == "SlimMoeForCausalLM", type(model)
import tempfile
directory = tempfile.mkdtemp()
model.save_pretrained(directory)
from safetensors import safe_open
keys = list(safe_open(directory + "/model.safetensors", "pt").keys())
assert any(".block_sparse_moe.experts.0.w1.weight" in key for key in keys), keys  # Phi-3.5-MoE's stock layout
assert type(AutoModelForCausalLM.from_pretrained(directory)).__name__ == "SlimMoeForCausalLM"
print("ok")
"""

IMPORT_ORDERS = {
    "hf_slimmoe first": "import hf_slimmoe\n",
    "transformers' Auto classes first": "from transformers import AutoModelForCausalLM\nimport hf_slimmoe\n",
    "attribute access on transformers": "import hf_slimmoe, transformers\ntransformers.AutoModelForCausalLM\n",
    # the Auto module is first loaded in the middle of importing model code (transformers' or ours)
    "a transformers model first": "import hf_slimmoe\nfrom transformers import LlamaForCausalLM\n",
    "SlimMoeForCausalLM first": "import hf_slimmoe\nfrom hf_slimmoe import SlimMoeForCausalLM\n",
}


def test_auto_classes_know_slimmoe_in_every_import_order():
    runs = {name: subprocess.Popen([sys.executable, "-c", prefix + _CHECK], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for name, prefix in IMPORT_ORDERS.items()}
    for name, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.strip() == "ok", f"{name}: {err[-2000:]}"
