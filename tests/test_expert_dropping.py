"""Ablation surgery: dropping whole experts by KD sensitivity or activation frequency."""

import pytest
import torch

from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slimmoe.pruning.expert_dropping import (
    drop_experts,
    expert_activation_frequency,
    expert_scores_from_sensitivity,
    reap_scores,
)
from hf_slimmoe.pruning.sensitivity import SensitivityScores

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
DEAD = 2  # the expert the router can never pick


def model_with_a_dead_expert() -> SlimMoeForCausalLM:
    """Hidden dim 0 is a constant 1 at every router input (LayerNorm weight 0, bias 1); only expert DEAD reads it,
    with weight -1000, so its router logit is always far below the others and sparsemixer masks it out exactly."""
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(SlimMoeConfig(**CONFIG)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[0] = 0.0
            layer.post_attention_layernorm.bias[0] = 1.0
            layer.mlp.router.weight[:, 0] = 0.0
            layer.mlp.router.weight[DEAD, 0] = -1000.0
    return model


def batches():
    torch.manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (2, 12))} for _ in range(3)]


def test_activation_frequency_sees_the_dead_expert_and_sums_to_one():
    frequency = expert_activation_frequency(model_with_a_dead_expert(), batches(), show_progress=False)
    assert len(frequency) == 2
    for layer in frequency:
        assert layer.shape == (4,) and layer[DEAD] == 0
        torch.testing.assert_close(layer.sum(), torch.tensor(1.0))


def test_dropping_a_never_routed_expert_leaves_logits_unchanged():
    model = model_with_a_dead_expert()
    inputs = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(inputs).logits
    frequency = expert_activation_frequency(model, batches(), show_progress=False)
    drop_experts(model, 3, frequency)
    assert model.config.num_local_experts == 3
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (3, 32, 32)
    assert model.model.layers[0].mlp.router.weight.shape == (3, 32)
    assert model.config.num_parameters() == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, before, rtol=0, atol=1e-6)


def test_dropped_model_round_trips(tmp_path):
    model = model_with_a_dead_expert()
    drop_experts(model, 2, [torch.tensor([0.1, 0.4, 0.0, 0.3])] * 2)
    assert torch.equal(model.model.layers[1].mlp.router.weight[:, 0], torch.zeros(2))  # experts 1 and 3 kept
    model.save_pretrained(tmp_path)
    loaded = SlimMoeForCausalLM.from_pretrained(tmp_path).eval()
    inputs = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, model(inputs).logits)


def test_kd_expert_scores_are_the_norm_of_neuron_scores():
    scores = SensitivityScores(experts=[torch.tensor([[3.0, 4.0], [0.0, 1.0]])], kv_groups=[torch.ones(2)])
    assert torch.equal(expert_scores_from_sensitivity(scores)[0], torch.tensor([5.0, 1.0]))


@pytest.mark.parametrize("num_experts", [1, 5, 2.0])
def test_drop_experts_validates_before_touching_weights(num_experts):
    model = model_with_a_dead_expert()
    before = model.model.layers[0].mlp.experts.down_proj.clone()
    with pytest.raises(ValueError, match="num_experts"):
        drop_experts(model, num_experts, [torch.ones(4)] * 2)
    with pytest.raises(ValueError, match="expert_scores"):
        drop_experts(model, 2, [torch.ones(3)] * 2)
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj, before)


# ----------------------------------------------------------------------------------------------------- REAP
def test_reap_gives_the_dead_expert_zero_and_dropping_it_leaves_logits_unchanged():
    model = model_with_a_dead_expert()
    inputs = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(inputs).logits
    scores = reap_scores(model, batches(), show_progress=False)
    assert [tuple(s.shape) for s in scores] == [(4,), (4,)]
    assert all(float(s[DEAD]) == 0 and bool((s[[0, 1, 3]] > 0).all()) for s in scores)
    drop_experts(model, 3, scores)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, before, rtol=0, atol=1e-6)


def test_reap_is_the_mean_router_weighted_output_norm_of_routed_tokens():
    """Reference: route every token by hand and run each chosen expert's GLU on it, in a plain loop."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             max_position_embeddings=64)).eval()
    data = batches()
    block_inputs = []
    hooks = [layer.mlp.register_forward_hook(lambda _m, args, _o: block_inputs.append(args[0].reshape(-1, 32)))
             for layer in model.model.layers]
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for hook in hooks:
        hook.remove()
    scores = reap_scores(model, data, show_progress=False)
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        sums, counts = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
        for hidden in block_inputs[index::2]:  # [tokens, H]
            with torch.no_grad():
                _, weights, chosen = mlp.gate(hidden)
                for token in range(hidden.shape[0]):
                    for slot in range(2):
                        e = int(chosen[token, slot])
                        gate, up = (mlp.experts.gate_up_proj[e] @ hidden[token]).chunk(2)
                        out = mlp.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
                        sums[e] += float(weights[token, slot]) * float(out.norm())
                        counts[e] += 1
        torch.testing.assert_close(scores[index].double(), sums / counts.clamp(min=1), rtol=1e-5, atol=1e-8)
