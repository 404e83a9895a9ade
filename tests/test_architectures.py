"""Every supported MoE family, on stock transformers classes: exact parameter accounting, slim_config, exact pruning
(keep-all, dead expert / shared-expert neurons, dead KV groups), scores, refusals, and stock exports."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from hf_slimmoe import SUPPORTED_MODEL_TYPES, compute_sensitivity, count_parameters, prune_to, slim_config
from hf_slimmoe.architectures import get_architecture, save_stock
from hf_slimmoe.pruning import SensitivityScores, expert_activation_frequency

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MLA = dict(num_key_value_heads=8, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=6,
           first_k_dense_replace=1, moe_intermediate_size=24, intermediate_size=40, n_routed_experts=4)
# Tiny stock configurations: every family's own fields, biases switched on where the family has them, and dense
# layers where the family can have them.
FAMILIES = {
    "phimoe": dict(intermediate_size=24, num_local_experts=4, attention_bias=True, lm_head_bias=True),
    "mixtral": dict(intermediate_size=24, num_local_experts=4),
    "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=16,
                      num_experts=4, mlp_only_layers=[0]),
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=24, num_experts=4, decoder_sparse_step=2,
                      attention_bias=True),
    "olmoe": dict(intermediate_size=24, num_experts=4, attention_bias=True),
    "deepseek_v3": dict(**MLA, n_shared_experts=1, q_lora_rank=12, n_group=1, topk_group=1, attention_bias=True),
    "deepseek_v2": dict(**MLA, n_shared_experts=2, q_lora_rank=None, mlp_bias=True),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=4, head_dim=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
GQA_PRUNABLE = [t for t in FAMILIES if get_architecture(t).attention_prunable]
NOT_PRUNABLE = [t for t in FAMILIES if not get_architecture(t).attention_prunable]


def tiny(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny stock model of `model_type`. The exactness tests run in float64 (eager experts): pruning changes the
    order of float sums, and in float32 a last-bit difference can flip a near-tie routing decision."""
    config = CONFIG_MAPPING[model_type](**{**COMMON, "num_experts_per_tok": 2, **FAMILIES[model_type]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if dtype != torch.float32:
        model.set_experts_implementation("eager")
        model.to(dtype)
    with torch.no_grad():  # stock inits leave some weights at 0 (routers, biases): give every weight a value
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def calibration(num_batches: int = 3, batch: int = 2, length: int = 16, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -3:] = 0
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def score(model, batches=None, **kwargs) -> SensitivityScores:
    return compute_sensitivity(model, calibration() if batches is None else batches, show_progress=False, **kwargs)


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def routed(model, batches) -> dict[int, list[int]]:
    """Per MoE layer, the experts the calibration tokens reach (an expert no token reaches has zero gradients)."""
    frequency = expert_activation_frequency(model, batches, show_progress=False)
    return {layer: (f > 0).nonzero().flatten().tolist() for layer, f in enumerate(frequency) if f.numel()}


def materialized(model) -> tuple[int, int]:
    """Total parameters, and active ones (minus the routed experts a token does not use), counted on the tensors."""
    arch = get_architecture(model)
    total = sum(p.numel() for p in model.parameters())
    experts, top_k = arch.num_experts_of(model.config), arch.top_k_of(model.config)
    inactive = 0
    for block in arch.moe_blocks(model).values():
        per_expert = sum(p.numel() for p in arch.experts_of(block).parameters()) // experts
        inactive += (experts - top_k) * per_expert
    return total, total - inactive


def test_registry_covers_the_issue_families_and_names_unsupported_ones():
    assert set(FAMILIES) < set(SUPPORTED_MODEL_TYPES)
    with pytest.raises(ValueError, match="'llama' is not a supported MoE family.*mixtral"):
        get_architecture("llama")


# ----------------------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("model_type", FAMILIES)
def test_count_parameters_equals_the_materialized_count(model_type):
    model = tiny(model_type)
    assert count_parameters(model.config) == materialized(model)
    heads = 2 if get_architecture(model_type).attention_prunable else None
    small = slim_config(model.config, expert_width=12, num_key_value_heads=heads)
    assert count_parameters(small) == materialized(AutoModelForCausalLM.from_config(small))


def test_count_parameters_is_instant_and_matches_published_sizes():
    from transformers import MixtralConfig, Qwen3MoeConfig

    qwen3_235b = Qwen3MoeConfig(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64,
                                num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8)
    total, active = count_parameters(qwen3_235b)
    assert (round(total / 1e9), round(active / 1e9)) == (235, 22)  # Qwen3-235B-A22B
    total, active = count_parameters(MixtralConfig())  # Mixtral-8x7B: 46.7B total, 12.9B active
    assert (round(total / 1e9, 1), round(active / 1e9, 1)) == (46.7, 12.9)


# ----------------------------------------------------------------------------------------------- slim_config
def test_slim_config_keeps_the_class_and_heads_per_group():
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    small = slim_config(config, expert_width=256, num_key_value_heads=2)
    assert type(small) is Qwen3MoeConfig and small.model_type == "qwen3_moe"
    assert (small.moe_intermediate_size, small.num_attention_heads, small.num_key_value_heads, small.head_dim) == (
        256, 16, 2, 128)
    assert config.moe_intermediate_size == 768 and config.num_key_value_heads == 4  # the source is untouched
    assert slim_config(config, num_key_value_heads=2, num_attention_heads=16).num_attention_heads == 16


@pytest.mark.parametrize("model_type, kwargs, field", [
    ("qwen3_moe", dict(num_key_value_heads=2, num_attention_heads=12), "num_attention_heads"),
    ("qwen3_moe", dict(expert_width=48), "expert_width"),
    ("qwen3_moe", dict(num_key_value_heads=0), "num_key_value_heads"),
    ("qwen3_moe", dict(shared_expert_width=8), "shared_expert_width"),
    ("qwen2_moe", dict(shared_expert_width=32), "shared_expert_width"),
    ("deepseek_v3", dict(expert_width=16, shared_expert_width=24), "shared_expert_width"),
    ("deepseek_v2", dict(expert_width=20, shared_expert_width=30), "shared_expert_width"),
    ("olmoe", dict(num_key_value_heads=2), "num_key_value_heads.*q_norm"),
    ("deepseek_v3", dict(num_key_value_heads=4), "num_key_value_heads.*latent attention"),
])
def test_slim_config_refuses_naming_the_field(model_type, kwargs, field):
    with pytest.raises(ValueError, match=field):
        slim_config(tiny(model_type).config, **kwargs)


def test_deepseek_shared_width_follows_the_expert_count_field():
    config = tiny("deepseek_v2").config  # moe width 24 x 2 shared experts = 48
    small = slim_config(config, expert_width=16)  # the count is kept: the shared experts narrow with the routed ones
    assert (small.moe_intermediate_size, small.n_shared_experts) == (16, 2)
    assert slim_config(config, expert_width=16, shared_expert_width=48).n_shared_experts == 3


# ----------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("model_type", FAMILIES)
def test_scores_are_deterministic_and_nonzero_at_stage_1(model_type):
    model = tiny(model_type)
    first, second = score(model), score(model)
    arch = get_architecture(model)
    moe, reached = set(arch.moe_layer_indices(model.config)), routed(model, calibration())
    for name in ("experts", "kv_groups", "shared_experts"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(first, name), getattr(second, name)))
    attention = set(arch.attention_layer_indices(model.config))  # none for MLA: no GQA groups to score
    for layer in range(3):
        assert first.kv_groups[layer].shape == ((model.config.num_key_value_heads,) if layer in attention else (0,))
        assert bool((first.kv_groups[layer] > 0).all())
        if layer in moe:
            assert first.experts[layer].shape == (4, arch.expert_width_of(model.config))
            assert len(reached[layer]) >= 2 and bool((first.experts[layer][reached[layer]] > 0).all())
        else:
            assert first.experts[layer].numel() == 0
    if arch.shared_expert is not None:
        assert [t.numel() for t in first.shared_experts] == [
            arch.shared_width_of(model.config) if i in moe else 0 for i in range(3)]
        assert all(bool((first.shared_experts[i] > 0).all()) for i in moe)
    else:
        assert first.shared_experts == []


def test_scores_with_dense_layers_and_shared_experts_round_trip(tmp_path):
    scores = score(tiny("qwen2_moe"))
    scores.save(tmp_path / "scores.safetensors")
    loaded = SensitivityScores.load(tmp_path / "scores.safetensors")
    for name in ("experts", "kv_groups", "shared_experts"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(scores, name), getattr(loaded, name)))
    assert len(loaded.shared_experts) == 3 and loaded.experts[0].numel() == 0


def test_slimmoe_scores_with_phimoe_aux_loss():
    """SlimMoeForCausalLM runs PhimoeForCausalLM's forward, so it has PhiMoE's load-balancing loss (read off the class
    that defines `forward`, not the subclass's own module)."""
    from transformers import PhimoeConfig

    from hf_slimmoe import SlimMoeConfig

    aux = get_architecture(SlimMoeConfig()).aux_loss
    assert aux == get_architecture(PhimoeConfig()).aux_loss == "transformers.models.phimoe.modeling_phimoe:" \
        "load_balancing_loss_func"


def test_family_without_aux_loss_refuses_an_aux_coefficient():
    with pytest.raises(ValueError, match="without a load-balancing loss"):
        score(tiny("deepseek_v3"), aux_loss_coef=0.01)


# ----------------------------------------------------------------------------------------------- exact pruning
@pytest.mark.parametrize("model_type", FAMILIES)
def test_keeping_everything_changes_nothing(model_type):
    model, batches = tiny(model_type), calibration()
    before, state = logits(model, batches), {k: v.clone() for k, v in model.state_dict().items()}
    assert prune_to(model, slim_config(model.config), score(model, batches)) is model
    assert torch.equal(logits(model, batches), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _kill_expert_neurons(model, dead: dict[int, list[int]], dead_shared: list[int]) -> None:
    """Zero the down projection of neurons `dead[e]` of every expert and `dead_shared` of the shared expert."""
    arch = get_architecture(model)
    with torch.no_grad():
        for block in arch.moe_blocks(model).values():
            experts = arch.experts_of(block)
            for e, neurons in dead.items():
                if experts.is_transposed:
                    experts.down_proj[e, neurons, :] = 0  # [E, I, H]
                else:
                    experts.down_proj[e, :, neurons] = 0  # [E, H, I]
            if dead_shared:
                arch.shared_of(block).down_proj.weight[:, dead_shared] = 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_pruning_dead_expert_and_shared_neurons_is_exact(model_type):
    model, batches = tiny(model_type, dtype=torch.float64), calibration(num_batches=4)
    arch = get_architecture(model)
    width, shared = arch.expert_width_of(model.config), arch.shared_width_of(model.config)
    dead = {e: [e, e + 7, 2 * e + 13, 23 - e] for e in range(4)}  # different neurons in every expert
    new_shared = None
    if shared is not None:  # DeepSeek sizes its shared experts as width x count: keep that a multiple of 20
        new_shared = shared - 4 if arch.shared_expert.width else 20 * (shared // width)
    dead_shared = list(range(1, 2 * (shared - new_shared), 2)) if shared is not None else []
    _kill_expert_neurons(model, dead, dead_shared)
    before, scores, reached = logits(model, batches), score(model, batches), routed(model, batches)
    for layer in arch.moe_layer_indices(model.config):
        for e, neurons in dead.items():
            alive = [i for i in range(width) if i not in neurons]
            assert bool((scores.experts[layer][e, neurons] == 0).all())
            assert bool((scores.experts[layer][e, alive] > 0).all()) or e not in reached[layer]
        if dead_shared:
            assert bool((scores.shared_experts[layer][dead_shared] == 0).all())
    prune_to(model, slim_config(model.config, expert_width=20, shared_expert_width=new_shared), scores)
    assert arch.expert_width_of(model.config) == 20 and arch.shared_width_of(model.config) == new_shared
    assert count_parameters(model.config) == materialized(model)
    torch.testing.assert_close(logits(model, batches), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_type", GQA_PRUNABLE)
def test_pruning_a_dead_kv_group_is_exact(model_type):
    model, batches = tiny(model_type, dtype=torch.float64), calibration()
    arch = get_architecture(model)
    dead_group, width = {0: 2, 1: 0, 2: 3}, 2 * 4  # two query heads of head_dim 4 per group
    with torch.no_grad():
        for layer, group in dead_group.items():
            arch.attention_of(arch.decoder_layers(model)[layer]).o_proj.weight[:, group * width:(group + 1) * width] = 0
    before, scores = logits(model, batches), score(model, batches)
    for layer, group in dead_group.items():
        assert float(scores.kv_groups[layer][group]) == 0 and int((scores.kv_groups[layer] > 0).sum()) == 3
    prune_to(model, slim_config(model.config, num_key_value_heads=3), scores)
    attention = arch.attention_of(arch.decoder_layers(model)[0])
    assert attention.q_proj.weight.shape == (6 * 4, 32) and attention.k_proj.weight.shape == (3 * 4, 32)
    assert attention.o_proj.weight.shape == (32, 6 * 4)
    for name in arch.query_head_parameters:
        assert getattr(attention, name).shape[0] == 6
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (6, 3, 4)
    assert count_parameters(model.config) == materialized(model)
    torch.testing.assert_close(logits(model, batches), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_type", NOT_PRUNABLE)
def test_attention_pruning_is_refused_before_any_change_but_experts_still_slim(model_type):
    model, batches = tiny(model_type), calibration()
    scores = score(model, batches)
    values = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "transformers_version")}
    per_group = model.config.num_attention_heads // model.config.num_key_value_heads
    target = type(model.config)(**{**values, "num_key_value_heads": 2, "num_attention_heads": 2 * per_group,
                                   "head_dim": get_architecture(model).head_dim_of(model.config)})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"attention of {model_type} models cannot be pruned"):
        prune_to(model, target, scores)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    prune_to(model, slim_config(model.config, expert_width=16, shared_expert_width=get_architecture(
        model).shared_expert and 16 * model.config.n_shared_experts), scores)
    assert count_parameters(model.config) == materialized(model)
    assert logits(model, batches).isfinite().all()


def test_bad_targets_and_scores_are_refused_naming_the_field():
    model = tiny("qwen2_moe")
    scores = score(model)
    values = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "transformers_version")}
    with pytest.raises(ValueError, match="moe_intermediate_size=48 is wider"):
        prune_to(model, type(model.config)(**{**values, "moe_intermediate_size": 48}), scores)
    with pytest.raises(ValueError, match="mlp_only_layers"):
        prune_to(model, type(model.config)(**{**values, "mlp_only_layers": []}), scores)
    wrong = SensitivityScores(scores.experts, scores.kv_groups, shared_experts=[torch.zeros(0)] * 3)
    with pytest.raises(ValueError, match=r"scores.shared_experts\[1\]"):
        prune_to(model, slim_config(model.config, shared_expert_width=8), wrong)
    assert get_architecture(model).shared_width_of(model.config) == 16


# ----------------------------------------------------------------------------------------------- stock exports
EXPORT_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
inputs = torch.load(sys.argv[1])
for directory in sys.argv[2:]:
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, (directory, problems)
    with torch.no_grad():
        torch.save(model.eval()(inputs).logits, directory + "/stock_logits.pt")
    print(directory, type(model).__name__)
assert "hf_slimmoe" not in sys.modules, "the plugin was imported"
"""


def test_pruned_models_export_as_their_stock_family(tmp_path):
    inputs = torch.randint(3, VOCAB, (2, 10))
    torch.save(inputs, tmp_path / "inputs.pt")
    expected, directories = {}, []
    for model_type in FAMILIES:
        model = tiny(model_type)
        arch = get_architecture(model)
        heads = 2 if arch.attention_prunable else None
        shared = arch.shared_expert and (12 if arch.shared_expert.width else 16 * model.config.n_shared_experts)
        prune_to(model, slim_config(model.config, expert_width=16, num_key_value_heads=heads,
                                    shared_expert_width=shared), score(model))
        directory = tmp_path / model_type
        save_stock(model, directory)
        config = json.loads((directory / "config.json").read_text())
        assert config["model_type"] == model_type and config["architectures"] == [arch.architecture]
        if arch.attention_prunable:
            assert config["head_dim"] == 4 and config["num_attention_heads"] == 4
        assert config[arch.expert_width] == 16
        with torch.no_grad():
            expected[model_type] = model(inputs).logits
        directories.append(str(directory))
    result = subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(tmp_path / "inputs.pt"), *directories],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for model_type in FAMILIES:
        assert torch.equal(torch.load(tmp_path / model_type / "stock_logits.pt"), expected[model_type]), model_type


# ----------------------------------------------------------------------------------------------- expert dropping
@pytest.mark.parametrize("model_type", FAMILIES)
def test_drop_experts_by_reap_for_every_family(model_type, tmp_path):
    from hf_slimmoe.pruning import drop_experts, reap_scores

    model, batches = tiny(model_type), calibration()
    arch = get_architecture(model)
    scores = reap_scores(model, batches, show_progress=False)
    moe = arch.moe_layer_indices(model.config)
    assert [s.numel() for s in scores] == [4 if i in moe else 0 for i in range(3)]
    drop_experts(model, 3, scores)
    assert arch.num_experts_of(model.config) == 3
    assert count_parameters(model.config) == materialized(model)
    save_stock(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, batches), logits(model, batches))


def test_drop_experts_refuses_group_limited_routing():
    from hf_slimmoe.pruning import drop_experts

    config = CONFIG_MAPPING["deepseek_v3"](**{**COMMON, "num_experts_per_tok": 2, **FAMILIES["deepseek_v3"],
                                              "n_group": 2, "topk_group": 1})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="n_group=2"):
        drop_experts(model, 2, [torch.zeros(0)] + [torch.ones(4)] * 2)


def test_cli_score_and_prune_a_stock_qwen2_moe(tmp_path, capsys):
    from datasets import Dataset

    from hf_slimmoe.cli import main

    model = tiny("qwen2_moe")
    model.save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (12,), generator=generator).tolist() for _ in range(6)]
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "calib"))
    assert main(["score", str(tmp_path / "model"), "--data", str(tmp_path / "calib"), "--output",
                 str(tmp_path / "scores.safetensors"), "--batch-size", "3"]) == 0
    assert main(["prune", str(tmp_path / "model"), "--scores", str(tmp_path / "scores.safetensors"),
                 "--output-dir", str(tmp_path / "pruned"), "--intermediate-size", "16", "--num-key-value-heads", "2",
                 "--shared-expert-width", "8"]) == 0
    assert "intermediate_size 16" in capsys.readouterr().out
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and (config["moe_intermediate_size"],
                                                    config["shared_expert_intermediate_size"]) == (16, 8)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert count_parameters(pruned.config) == materialized(pruned)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_expert_neuron_views_address_what_slimming_keeps(model_type):
    """`expert_neurons` (the iterative masks' views) and `slim_experts` agree on which rows form neuron i, for the
    gate-first layout and gpt-oss's transposed, interleaved one."""
    from hf_slimmoe.pruning.surgery import expert_neurons, slim_experts

    model = tiny(model_type)
    arch = get_architecture(model)
    experts = arch.experts_of(next(iter(arch.moe_blocks(model).values())))
    before = [w.detach().clone() for w in expert_neurons(arch, experts)]  # each [E, I, H]
    generator = torch.Generator().manual_seed(0)
    keep = torch.stack([torch.randperm(24, generator=generator)[:16].sort().values for _ in range(4)])  # [E, 16]
    slim_experts(arch, experts, keep)
    for old, new in zip(before, expert_neurons(arch, experts)):
        assert new.shape == (4, 16, 32)
        assert torch.equal(new, torch.stack([old[e, keep[e]] for e in range(4)]))


def test_readme_family_table_is_generated_from_the_adapters():
    """The README's family table is `family_table()` (regenerate: `python -m hf_slimmoe.architectures.table
    README.md`): one row per family of SUPPORTED_MODEL_TYPES, read off its default configuration."""
    import os

    from hf_slimmoe.architectures.table import END, START, family_table

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    in_readme = readme.partition(START)[2].partition(END)[0].lstrip("\n")
    table = family_table()
    assert in_readme == table, "README family table is stale: python -m hf_slimmoe.architectures.table README.md"
    rows = {row.split(" | ")[0].strip("| `"): row for row in table.splitlines()[2:]}
    assert sorted(rows) == sorted(SUPPORTED_MODEL_TYPES)
    assert "yes: GQA groups" in rows["qwen3_moe"] and "no: it uses multi-head latent attention" in rows["deepseek_v3"]
    assert "dense MLPs are sized by the same field and narrow with them" in rows["jamba"]
    assert "**refused**: routed experts: the experts module holds" in rows["ergo"]
