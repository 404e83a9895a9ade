"""SlimMoeForCausalLM: equivalence with stock PhiMoE, checkpoint round trips, export, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, PhimoeConfig
from transformers import PhimoeForCausalLM

import hf_slimmoe  # noqa: F401
from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM

TINY = dict(vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            attention_bias=True, lm_head_bias=True)


@pytest.fixture
def inputs():
    torch.manual_seed(1)
    return torch.randint(0, 80, (2, 9))


def stock_checkpoint(path, **overrides):
    torch.manual_seed(0)
    model = PhimoeForCausalLM(PhimoeConfig(**{**TINY, **overrides})).eval()
    model.save_pretrained(path)
    return model


def test_loads_stock_per_expert_checkpoint_with_identical_logits(tmp_path, inputs):
    stock = stock_checkpoint(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys  # original Phi-3.5-MoE layout
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    ours = SlimMoeForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(ours.config, SlimMoeConfig) and ours.config.head_dim == 8
    with torch.no_grad():
        assert torch.equal(stock(inputs).logits, ours(inputs).logits)


def test_save_load_round_trip_is_exact_and_keeps_stock_key_layout(tmp_path, inputs):
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(SlimMoeConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w1.weight")
        w3 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    assert not any("gate_up_proj" in k for k in keys)
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj[2]  # [2I, H], gate half first
    assert torch.equal(w1, gate_up[:24]) and torch.equal(w3, gate_up[24:])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SlimMoeForCausalLM
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, loaded(inputs).logits)


EXPORT_CHECK = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert "hf_slimmoe" not in sys.modules, "the plugin was imported"
assert type(model).__name__ == "PhimoeForCausalLM", type(model)
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(inputs).logits, sys.argv[3])
"""


def test_export_loads_in_stock_transformers_without_the_plugin(tmp_path, inputs):
    # A pruned-looking shape: head_dim (12) != hidden_size // num_attention_heads (32 // 2).
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(SlimMoeConfig(**{**TINY, "num_attention_heads": 2, "num_key_value_heads": 1,
                                                "head_dim": 12, "intermediate_size": 20})).eval()
    export = tmp_path / "export"
    model.export_phimoe(export)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "phimoe" and config["architectures"] == ["PhiMoEForCausalLM"]  # vLLM's name
    assert config["head_dim"] == 12
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(export), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "logits.pt")], check=True, cwd=tmp_path)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(inputs).logits)


@pytest.mark.parametrize("config, model_type", [
    (LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4),
     "llama"),
    (MixtralConfig(vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=4), "mixtral"),
])
def test_loading_another_architecture_names_it(tmp_path, config, model_type):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"model_type '{model_type}'.*'phimoe' and 'slimmoe'"):
        SlimMoeForCausalLM.from_pretrained(tmp_path)


def test_generate_with_cache_matches_without(inputs):
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(SlimMoeConfig(**TINY)).eval()
    with_cache = model.generate(inputs, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    without = model.generate(inputs, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert with_cache.shape == (2, 15)
    assert torch.equal(with_cache, without)


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(inputs):
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(SlimMoeConfig(**TINY))
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        calls.clear()
        model.zero_grad()
        model(inputs, labels=inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def deterministic_training_mode():
        model.train()  # checkpointing is active in training mode ...
        for layer in model.model.layers:
            layer.mlp.eval()  # ... while routing stays deterministic (no sparsemixer sampling)

    deterministic_training_mode()
    plain = grads()
    assert len(calls) == 1
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    deterministic_training_mode()
    checkpointed = grads()
    assert len(calls) == 2  # the layer's forward ran again during backward
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6, msg=name)


def test_supports_the_same_kernels_as_stock_phimoe():
    # transformers inspects a class's module source to pick kernels; a SlimMoE model must never fall back to slower
    # (and numerically different) eager experts just because it is a plugin class.
    model = SlimMoeForCausalLM(SlimMoeConfig(**TINY))
    assert SlimMoeForCausalLM._can_set_experts_implementation() is True
    assert model.config._experts_implementation == PhimoeForCausalLM(PhimoeConfig(**TINY)).config._experts_implementation


def test_unaligned_expert_width_runs_with_eager_experts(tmp_path, inputs):
    # grouped_mm needs 16-byte aligned rows; a pruned width such as 13 must still run (eager experts).
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(SlimMoeConfig(**{**TINY, "intermediate_size": 13})).eval()
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        logits = model(inputs).logits
    model.save_pretrained(tmp_path)
    loaded = SlimMoeForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, logits)


def test_prune_to_an_unaligned_width_switches_to_eager_experts(inputs):
    from hf_slimmoe import SensitivityScores

    torch.manual_seed(0)
    model = SlimMoeForCausalLM(SlimMoeConfig(**TINY)).eval()
    assert model.config._experts_implementation == "grouped_mm"
    scores = SensitivityScores(experts=[torch.rand(4, 24) for _ in range(2)], kv_groups=[torch.rand(2)] * 2)
    model.prune_to(model.config.slimmed(intermediate_size=13), scores)
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        assert model(inputs).logits.shape == (2, 9, 80)
