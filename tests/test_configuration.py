"""SlimMoeConfig: analytic parameter accounting, stock interop, slimming rules, Auto registration."""

import pytest
import torch
from transformers import AutoConfig, PhimoeConfig

import hf_slimmoe  # noqa: F401  (registers "slimmoe")
from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM

PHI_35_MOE = dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=16,
                  num_experts_per_tok=2, attention_bias=True, lm_head_bias=True)


def tiny(**overrides) -> SlimMoeConfig:
    values = dict(vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    values.update(overrides)
    return SlimMoeConfig(**values)


def materialized_counts(config: SlimMoeConfig) -> tuple[int, int]:
    model = SlimMoeForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
                  for layer in model.model.layers)
    active = total - experts * (config.num_local_experts - config.num_experts_per_tok) // config.num_local_experts
    return total, active


@pytest.mark.parametrize("overrides", [
    {},
    {"attention_bias": True, "lm_head_bias": True},
    {"head_dim": 12, "num_attention_heads": 6, "num_key_value_heads": 3},  # pruned shape: head_dim != hidden/heads
    {"num_local_experts": 3, "num_experts_per_tok": 1, "intermediate_size": 7},
    {"tie_word_embeddings": True},
])
def test_analytic_counts_equal_materialized_model(overrides):
    config = tiny(**overrides)
    total, active = materialized_counts(config)
    assert config.num_parameters() == total
    assert config.num_active_parameters() == active


def test_paper_sizes():
    phi35 = SlimMoeConfig(**PHI_35_MOE)
    assert round(phi35.num_parameters() / 1e9, 1) == 41.9
    assert round(phi35.num_active_parameters() / 1e9, 1) == 6.6
    tiny_moe = phi35.slimmed(intermediate_size=448, num_key_value_heads=4)
    assert (tiny_moe.num_attention_heads, tiny_moe.num_key_value_heads, tiny_moe.head_dim) == (16, 4, 128)
    assert round(tiny_moe.num_parameters() / 1e9, 1) == 3.8
    mini = phi35.slimmed(intermediate_size=960)
    assert round(mini.num_parameters() / 1e9, 1) == 7.6


def test_head_dim_is_explicit_and_survives_slimming():
    config = tiny()
    assert config.head_dim == 8 and "head_dim" in config.to_dict()
    slim = config.slimmed(num_key_value_heads=1)
    assert (slim.num_attention_heads, slim.num_key_value_heads, slim.head_dim) == (2, 1, 8)
    assert slim.hidden_size // slim.num_attention_heads != slim.head_dim


@pytest.mark.parametrize("kwargs, field", [
    ({"intermediate_size": 25}, "intermediate_size"),
    ({"intermediate_size": 0}, "intermediate_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_key_value_heads": 1.5}, "num_key_value_heads"),
])
def test_slimmed_refuses_illegal_sizes_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny().slimmed(**kwargs)


def test_config_refuses_heads_not_divisible_by_groups():
    with pytest.raises(ValueError, match="num_attention_heads"):
        tiny(num_attention_heads=6, num_key_value_heads=4)


def test_phimoe_round_trip():
    stock = PhimoeConfig(vocab_size=80, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    ours = SlimMoeConfig.from_phimoe(stock)
    assert ours.model_type == "slimmoe" and ours.head_dim == 8
    back = ours.to_phimoe()
    assert type(back) is PhimoeConfig and back.model_type == "phimoe" and back.head_dim == 8
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_local_experts", "num_experts_per_tok", "rms_norm_eps", "router_jitter_noise"):
        assert getattr(back, key) == getattr(stock, key), key


def test_from_phimoe_refuses_other_model_types():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="'llama'"):
        SlimMoeConfig.from_phimoe(LlamaConfig())


def test_auto_config_round_trip(tmp_path):
    config = tiny(head_dim=12)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SlimMoeConfig) and loaded.head_dim == 12
    assert loaded.num_parameters() == config.num_parameters()


def test_meta_device_model_matches_big_config_counts():
    config = SlimMoeConfig(**PHI_35_MOE).slimmed(intermediate_size=448, num_key_value_heads=4)
    with torch.device("meta"):
        model = SlimMoeForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
