"""Pruning: sensitivity scores (Eq. 2-4), their stage-1 subtlety, memory-lean scoring, and exact tensor surgery."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_slimmoe  # noqa: F401
from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slimmoe.pruning import SensitivityScores, compute_sensitivity
from hf_slimmoe.utils.modeling import teacher_topk

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            attention_bias=True, lm_head_bias=True)


def tiny_model(seed: int = 0, **overrides) -> SlimMoeForCausalLM:
    torch.manual_seed(seed)
    return SlimMoeForCausalLM(SlimMoeConfig(**{**TINY, **overrides})).eval()


def calibration(num_batches: int = 3, batch: int = 2, length: int = 16, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -3:] = 0  # some padding on the right
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def score(model, batches=None, **kwargs) -> SensitivityScores:
    return compute_sensitivity(model, calibration() if batches is None else batches, show_progress=False, **kwargs)


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def target(config: SlimMoeConfig, **changes) -> SlimMoeConfig:
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
    return SlimMoeConfig(**{**values, **changes})


def flat(scores: SensitivityScores) -> list[torch.Tensor]:
    return scores.experts + scores.kv_groups


# ----------------------------------------------------------------------------------------------------- scores
def test_scores_shapes_dtype_determinism_and_round_trip(tmp_path):
    model = tiny_model()
    first, second = score(model), score(model)
    assert first.num_layers == 2
    for layer in range(2):
        assert first.experts[layer].shape == (4, 24) and first.experts[layer].dtype == torch.float32
        assert first.kv_groups[layer].shape == (4,) and first.kv_groups[layer].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(second)))  # eval mode: deterministic
    first.save(tmp_path / "scores.safetensors")
    loaded = SensitivityScores.load(tmp_path / "scores.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(loaded)))
    assert loaded.metadata["criterion"] == "kd" and loaded.metadata["top_k"] == "8"
    with pytest.raises(FileNotFoundError, match="slimmoe score"):
        SensitivityScores.load(tmp_path / "missing.safetensors")


def test_scores_are_the_l2_and_group_mean_of_grad_times_weight():
    """Reference computation with a plain full-logits loss and autograd on all weights."""
    model, batches = tiny_model(), calibration()
    scores = score(model, batches, aux_loss_coef=0.0)
    reference = copy.deepcopy(model)
    tokens = 0
    for b in batches:
        out = reference(**b)
        ids, logprobs = teacher_topk(out.logits.detach(), 8)
        q = torch.log_softmax(out.logits.float(), -1).gather(-1, ids)
        kl = (logprobs.exp() * (logprobs - q)).sum(-1)  # [B, T]
        mask = b["attention_mask"].bool()
        (kl[mask].sum()).backward()
        tokens += int(mask.sum())
    for layer, block in enumerate(reference.model.layers):
        down = block.mlp.experts.down_proj
        expected = (down.grad / tokens * down).abs().norm(dim=1)  # [E, I]
        torch.testing.assert_close(scores.experts[layer], expected, rtol=1e-4, atol=1e-10)
        o_proj = block.self_attn.o_proj.weight
        neurons = (o_proj.grad / tokens * o_proj).abs().norm(dim=0)  # [heads * head_dim]
        torch.testing.assert_close(scores.kv_groups[layer], neurons.reshape(4, -1).mean(1), rtol=1e-4, atol=1e-10)


def test_stage1_self_teacher_full_kl_has_zero_gradient_but_topk_does_not():
    """Student == teacher: the full-vocabulary KL sits at its minimum (zero gradient); the top-k one does not."""
    model = tiny_model()
    full = score(model, top_k=VOCAB, aux_loss_coef=0.0)
    truncated = score(model, top_k=8, aux_loss_coef=0.0)
    largest_full = max(float(t.max()) for t in flat(full))
    smallest_truncated = min(float(t.min()) for t in flat(truncated))
    assert largest_full < 1e-9
    assert smallest_truncated > 0 and smallest_truncated > 100 * largest_full
    with_aux = score(model)  # the default (Eq. 3) adds the load-balancing loss
    assert all(bool((t > 0).all()) for t in flat(with_aux))


def test_teacher_as_same_object_separate_model_or_cache_agree():
    model, batches = tiny_model(), calibration()
    self_scores = score(model, batches)
    assert all(torch.equal(a, b) for a, b in zip(flat(self_scores), flat(score(model, batches, teacher=model))))
    teacher = copy.deepcopy(model).train()
    online = score(model, batches, teacher=teacher)
    assert teacher.training  # teacher's mode restored
    for a, b in zip(flat(self_scores), flat(online)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-12)
    cached = []
    for b in batches:  # a top-16 cache: compute_sensitivity keeps its 8 most probable entries
        with torch.no_grad():
            ids, logprobs = teacher_topk(teacher.eval()(**b).logits, 16)
        cached.append({**b, "teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs})
    other_teacher = tiny_model(seed=5)  # ignored: the cache wins
    for a, b in zip(flat(online), flat(score(model, cached, teacher=other_teacher))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-12)


def test_clm_criterion_differs_from_kd_and_is_nonzero():
    model = tiny_model()
    clm, kd = score(model, criterion="clm"), score(model)
    assert all(bool((t > 0).all()) for t in flat(clm))
    assert not torch.allclose(clm.experts[0], kd.experts[0])


def test_only_scored_weights_require_grad_while_scoring_and_state_is_restored():
    model = tiny_model().train()
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen weight stays frozen afterwards
    seen = []
    handle = model.model.layers[0].register_forward_hook(
        lambda *_: seen.append(sorted(n for n, p in model.named_parameters() if p.requires_grad)))
    score(model)
    handle.remove()
    expected = sorted(f"model.layers.{i}.{name}" for i in range(2)
                      for name in ("mlp.experts.down_proj", "self_attn.o_proj.weight"))
    assert seen and all(names == expected for names in seen)
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["model.embed_tokens.weight"]


def test_scoring_errors_name_the_problem():
    model = tiny_model()
    with pytest.raises(ValueError, match="criterion"):
        score(model, criterion="entropy")
    with pytest.raises(ValueError, match="top_k"):
        score(model, top_k=0)
    with pytest.raises(ValueError, match="vocab_size"):
        score(model, teacher=tiny_model(vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="input_ids"):
        score(model, [{"tokens": torch.zeros(1, 4, dtype=torch.long)}])
    bad_cache = [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "teacher_topk_ids": torch.zeros(1, 4, 4),
                  "teacher_topk_logprobs": torch.zeros(1, 4, 4)}]
    with pytest.raises(ValueError, match="top-4"):
        score(model, bad_cache)
    with pytest.raises(ValueError, match="empty"):
        score(model, [])


# ----------------------------------------------------------------------------------------------------- prune_to
def test_keeping_everything_changes_nothing():
    model, batches = tiny_model(), calibration()
    before, state = logits(model, batches), {k: v.clone() for k, v in model.state_dict().items()}
    assert model.prune_to(target(model.config), score(model, batches)) is model
    assert torch.equal(logits(model, batches), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_dead_expert_neurons_score_zero_and_pruning_them_is_exact():
    model, batches = tiny_model(), calibration(num_batches=4)
    dead = {e: [e, e + 7, 2 * e + 13, 23 - e] for e in range(4)}  # different neurons in every expert
    with torch.no_grad():
        for block in model.model.layers:
            experts = block.mlp.experts
            for e, neurons in dead.items():
                for i in neurons:
                    experts.down_proj[e, :, i] = 0  # down column
                    experts.gate_up_proj[e, i] = 0  # gate row
                    experts.gate_up_proj[e, 24 + i] = 0  # up row
    before = logits(model, batches)
    scores = score(model, batches)
    for layer in range(2):
        for e, neurons in dead.items():
            alive = [i for i in range(24) if i not in neurons]
            assert bool((scores.experts[layer][e, neurons] == 0).all())
            assert bool((scores.experts[layer][e, alive] > 0).all())
    kept = {e: [i for i in range(24) if i not in neurons] for e, neurons in dead.items()}
    original_down = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    model.prune_to(model.config.slimmed(intermediate_size=20), scores)  # a multiple of 4: grouped_mm alignment
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape == (4, 40, 32) and experts.down_proj.shape == (4, 32, 20)
    assert experts.intermediate_dim == 20 and model.config.intermediate_size == 20
    for e in range(4):  # original order kept
        assert torch.equal(experts.down_proj[e], original_down[e][:, kept[e]])
    torch.testing.assert_close(logits(model, batches), before, rtol=0, atol=1e-6)


def test_dead_kv_group_scores_zero_and_pruning_it_is_exact():
    model, batches = tiny_model(), calibration()
    dead_group = {0: 2, 1: 0}
    head_dim, width = 4, 2 * 4  # head_dim = 32 // 8; two query heads per group
    with torch.no_grad():
        for layer, group in dead_group.items():
            model.model.layers[layer].self_attn.o_proj.weight[:, group * width:(group + 1) * width] = 0
    before = logits(model, batches)
    scores = score(model, batches)
    for layer, group in dead_group.items():
        assert float(scores.kv_groups[layer][group]) == 0
        assert int((scores.kv_groups[layer] > 0).sum()) == 3
    model.prune_to(model.config.slimmed(num_key_value_heads=3), scores)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (6 * head_dim, 32) and attention.q_proj.bias.shape == (6 * head_dim,)
    assert attention.k_proj.weight.shape == (3 * head_dim, 32) and attention.v_proj.bias.shape == (3 * head_dim,)
    assert attention.o_proj.weight.shape == (32, 6 * head_dim) and attention.o_proj.bias.shape == (32,)
    assert attention.num_key_value_groups == 2 and attention.head_dim == head_dim
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6, 3, head_dim)
    torch.testing.assert_close(logits(model, batches), before, rtol=0, atol=1e-6)


def test_pruned_model_round_trips_through_save_and_from_pretrained(tmp_path):
    model, batches = tiny_model(), calibration()
    model.prune_to(model.config.slimmed(intermediate_size=16, num_key_value_heads=2), score(model, batches))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SlimMoeForCausalLM
    assert (loaded.config.intermediate_size, loaded.config.num_attention_heads, loaded.config.num_key_value_heads,
            loaded.config.head_dim) == (16, 4, 2, 4)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(loaded, batches), logits(model, batches))
    assert loaded.num_parameters() == loaded.config.num_parameters()


@pytest.mark.parametrize("changes, field", [
    (dict(intermediate_size=48), "intermediate_size"),
    (dict(num_key_value_heads=8, num_attention_heads=16), "num_key_value_heads"),
    (dict(hidden_size=64, head_dim=4), "hidden_size"),
    (dict(vocab_size=VOCAB * 2), "vocab_size"),
    (dict(num_hidden_layers=1), "num_hidden_layers"),
    (dict(num_local_experts=2), "num_local_experts"),
    (dict(num_experts_per_tok=1), "num_experts_per_tok"),
    (dict(head_dim=8), "head_dim"),
    (dict(num_attention_heads=4, num_key_value_heads=4), "num_attention_heads"),
])
def test_bad_targets_raise_naming_the_field_before_touching_weights(changes, field):
    model = tiny_model()
    scores = SensitivityScores([torch.rand(4, 24) for _ in range(2)], [torch.rand(4) for _ in range(2)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=field):
        model.prune_to(target(model.config, **changes), scores)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config.intermediate_size == 24


def test_scores_of_the_wrong_shape_are_refused():
    model = tiny_model()
    smaller = SensitivityScores([torch.rand(4, 16) for _ in range(2)], [torch.rand(4) for _ in range(2)])
    with pytest.raises(ValueError, match=r"scores.experts\[0\]"):
        model.prune_to(model.config.slimmed(intermediate_size=8), smaller)
    fewer_layers = SensitivityScores([torch.rand(4, 24)], [torch.rand(4)])
    with pytest.raises(ValueError, match="scores.experts has 1 layers"):
        model.prune_to(model.config.slimmed(intermediate_size=8), fewer_layers)
    assert model.model.layers[0].mlp.experts.down_proj.shape == (4, 32, 24)


def test_phi35_moe_on_meta_device_prunes_to_phi_tiny_moe_sizes():
    source = SlimMoeConfig(attention_bias=True, lm_head_bias=True)  # Phi-3.5-MoE: 41.9B
    with torch.device("meta"):
        model = SlimMoeForCausalLM(source)
    generator = torch.Generator().manual_seed(0)
    scores = SensitivityScores([torch.rand(16, 6400, generator=generator) for _ in range(32)],
                               [torch.rand(8, generator=generator) for _ in range(32)])
    tiny = source.slimmed(intermediate_size=448, num_key_value_heads=4)  # Phi-tiny-MoE: 16/4 heads, 3.8B
    model.prune_to(tiny, scores)
    layer = model.model.layers[31]
    assert layer.mlp.experts.gate_up_proj.shape == (16, 896, 4096)
    assert layer.mlp.experts.down_proj.shape == (16, 4096, 448)
    assert layer.self_attn.q_proj.weight.shape == (16 * 128, 4096)
    assert layer.self_attn.k_proj.weight.shape == (4 * 128, 4096) and layer.self_attn.v_proj.bias.shape == (512,)
    assert layer.self_attn.o_proj.weight.shape == (4096, 16 * 128)
    assert sum(p.numel() for p in model.parameters()) == tiny.num_parameters() == model.config.num_parameters()
    assert round(tiny.num_parameters() / 1e9, 1) == 3.8


# ----------------------------------------------------------------------------------------------------- CLI
def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def test_cli_score_then_prune_writes_a_loadable_model(tmp_path, capsys):
    from datasets import Dataset

    from hf_slimmoe.cli import main

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    _word_tokenizer().save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, VOCAB, (int(n),), generator=generator).tolist() for n in (12, 9, 16, 5, 14)]
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "calib"))
    scores_file = tmp_path / "scores.safetensors"
    assert main(["score", str(tmp_path / "model"), "--data", str(tmp_path / "calib"), "--output", str(scores_file),
                 "--batch-size", "2", "--max-length", "10", "--aux-loss-coef", "0"]) == 0
    scores = SensitivityScores.load(scores_file)
    assert scores.metadata["num_tokens"] == str(10 + 9 + 10 + 5 + 10) and scores.metadata["teacher"] == "self"
    batches = [{"input_ids": torch.tensor([r[:10]])} for r in rows]
    expected = compute_sensitivity(model, batches, aux_loss_coef=0.0, show_progress=False)
    for a, b in zip(flat(scores), flat(expected)):  # padding and batching do not change the KD term
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-12)

    text = tmp_path / "calib.jsonl"
    text.write_text("\n".join('{"text": "%s"}' % " ".join(f"w{i}" for i in r) for r in rows))
    assert main(["score", str(tmp_path / "model"), "--data", str(text), "--output", str(tmp_path / "clm.safetensors"),
                 "--criterion", "clm", "--teacher", str(tmp_path / "model")]) == 0
    assert SensitivityScores.load(tmp_path / "clm.safetensors").metadata["criterion"] == "clm"

    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "model"), "--scores", str(scores_file), "--output-dir", str(out),
                 "--intermediate-size", "16", "--num-key-value-heads", "2"]) == 0
    assert "parameters" in capsys.readouterr().out
    pruned = AutoModelForCausalLM.from_pretrained(out)
    reference = tiny_model().prune_to(model.config.slimmed(intermediate_size=16, num_key_value_heads=2), scores)
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in reference.state_dict().items())
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("w3 w4")["input_ids"] == [5, 6]
    assert main(["prune", str(tmp_path / "model"), "--scores", str(scores_file), "--output-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "model"), "--scores", str(tmp_path / "nope"), "--output-dir",
                 str(tmp_path / "x"), "--intermediate-size", "64"]) == 2
    assert "slimmoe score" in capsys.readouterr().err
