"""Streaming surgery: `slimmoe prune` cuts a sharded checkpoint tensor by tensor into exactly the tensors that
loading, `prune_to` and `save_pretrained` give, in the per-expert and the fused layouts, and refuses bad input before
writing anything."""

import filecmp
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_slimmoe  # noqa: F401
from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slimmoe.cli import main
from hf_slimmoe.pruning import SensitivityScores
from hf_slimmoe.pruning.safetensors_stream import SafetensorsStreamWriter
from hf_slimmoe.pruning.streaming import prune_checkpoint

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            attention_bias=True, lm_head_bias=True)


def tiny_model(dtype=torch.float32) -> SlimMoeForCausalLM:
    torch.manual_seed(0)
    return SlimMoeForCausalLM(SlimMoeConfig(**TINY)).to(dtype).eval()


def tied_scores(seed: int = 0) -> SensitivityScores:
    """Scores with many ties (values on a coarse grid), so tie-breaking must match the in-memory surgery."""
    generator = torch.Generator().manual_seed(seed)
    return SensitivityScores(experts=[torch.randint(0, 4, (4, 24), generator=generator).float() for _ in range(2)],
                             kv_groups=[torch.randint(0, 2, (4,), generator=generator).float() for _ in range(2)],
                             metadata={"criterion": "kd"})


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_stream_writer_writes_the_bytes_save_file_writes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    values = {"b.weight": torch.randn(3, 5, generator=generator).bfloat16(), "a": torch.arange(7),
              "z": torch.randn(2, generator=generator), "h": torch.randn(4, 2, generator=generator).half(),
              "scalar": torch.tensor(1.5), "m": torch.ones(3, dtype=torch.bool)}
    save_file(values, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    names = {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32", torch.float16: "F16",
             torch.bool: "BOOL"}
    writer = SafetensorsStreamWriter(tmp_path / "out.safetensors",
                                     {k: (names[v.dtype], list(v.shape)) for k, v in values.items()}, {"format": "pt"})
    for key in writer.order:
        value = values[key]
        writer.write(key, [value[:1], value[1:]] if value.dim() else [value])  # in pieces along dim 0
    writer.close()
    assert filecmp.cmp(tmp_path / "ref.safetensors", tmp_path / "out.safetensors", shallow=False)
    short = SafetensorsStreamWriter(tmp_path / "bad.safetensors", {"x": ("F32", [4])})
    with pytest.raises(ValueError, match="received 8 bytes"):
        short.write("x", [torch.zeros(2)])
    short.abort()


def test_streaming_prune_of_a_sharded_checkpoint_equals_load_prune_save(tmp_path, capsys):
    from test_pruning import _word_tokenizer
    from transformers import AutoTokenizer

    model = tiny_model(torch.bfloat16)
    model.save_pretrained(tmp_path / "model", max_shard_size="8KB")
    _word_tokenizer().save_pretrained(tmp_path / "model")
    shards = [n for n in os.listdir(tmp_path / "model") if n.endswith(".safetensors")]
    assert len(shards) >= 4
    scores = tied_scores()
    scores.save(tmp_path / "scores.safetensors")
    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "model"), "--scores", str(tmp_path / "scores.safetensors"),
                 "--output-dir", str(out), "--intermediate-size", "16", "--num-key-value-heads", "2"]) == 0
    assert "parameters" in capsys.readouterr().out

    target = model.config.slimmed(intermediate_size=16, num_key_value_heads=2)
    reference = SlimMoeForCausalLM.from_pretrained(tmp_path / "model", dtype="auto").prune_to(target, scores)
    reference.save_pretrained(tmp_path / "reference")
    assert_same_tensors(tensors(out), tensors(tmp_path / "reference"))  # bit for bit, same keys and dtypes
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == sorted(shards)
    for shard in shards:  # every shard is byte-identical to safetensors' own serialization of its tensors
        save_file(load_file(out / shard), tmp_path / "check.safetensors", metadata={"format": "pt"})
        assert filecmp.cmp(tmp_path / "check.safetensors", out / shard, shallow=False), shard
    index = json.load(open(out / "model.safetensors.index.json"))
    assert index["metadata"]["total_parameters"] == reference.num_parameters()
    assert index["metadata"]["total_size"] == sum(os.path.getsize(out / s) for s in shards) - sum(
        8 + int.from_bytes(open(out / s, "rb").read(8), "little") for s in shards)
    for name in ("config.json", "generation_config.json"):
        produced, expected = json.load(open(out / name)), json.load(open(tmp_path / "reference" / name))
        assert produced == expected, name
    loaded = SlimMoeForCausalLM.from_pretrained(out)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in reference.state_dict().items())
    assert AutoTokenizer.from_pretrained(out)("w3 w4")["input_ids"] == [5, 6]
    stage = json.load(open(out / "stage.json"))
    assert stage["method"] == "prune" and stage["teacher_config"]["intermediate_size"] == 24
    assert "pruned (one-shot pruning by sensitivity scores" in (out / "README.md").read_text()


def test_streaming_prune_of_the_fused_layout_and_of_experts_only(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "fused", save_original_format=False, max_shard_size="20KB")
    keys = tensors(tmp_path / "fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and not any("block_sparse_moe" in k for k in keys)
    scores = tied_scores(1)
    for changes in ({"intermediate_size": 8, "num_key_value_heads": 1}, {"intermediate_size": 16}):
        target = model.config.slimmed(**changes)
        out = tmp_path / f"out-{len(changes)}"
        prune_checkpoint(tmp_path / "fused", out, target, scores, card=False, max_piece_bytes=256,
                         show_progress=False)
        reference = tiny_model().prune_to(target, scores)
        loaded = SlimMoeForCausalLM.from_pretrained(out)
        assert loaded.config.intermediate_size == changes["intermediate_size"]
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in reference.state_dict().items())
        assert "model.layers.1.mlp.experts.down_proj" in tensors(out)  # the input's layout is kept


@pytest.mark.parametrize("damage, message", [
    ("rename", "no tensor for .*layer 0"),
    ("drop", "no tensor for .*layer 1, expert 2"),
    ("reshape", "has shape"),
])
def test_streaming_prune_refuses_a_damaged_checkpoint_before_writing(tmp_path, damage, message):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    values = load_file(tmp_path / "model" / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    if damage == "rename":
        values = {k.replace("block_sparse_moe.experts", "moe.expert"): v for k, v in values.items()}
    elif damage == "drop":
        del values[key]
    else:
        values[key] = values[key][:-1].contiguous()
    save_file(values, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        prune_checkpoint(tmp_path / "model", out, model.config.slimmed(intermediate_size=16), tied_scores(),
                         show_progress=False)
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.startswith(".prune-")] == []


def test_streaming_prune_validates_target_scores_and_output_first(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    wide = SlimMoeConfig(**{**TINY, "intermediate_size": 32})
    with pytest.raises(ValueError, match="wider than the model"):
        prune_checkpoint(tmp_path / "model", tmp_path / "a", wide, tied_scores(), show_progress=False)
    bad = SensitivityScores(experts=[torch.ones(4, 24)], kv_groups=[torch.ones(4)])
    with pytest.raises(ValueError, match="scores.experts has 1 layers"):
        prune_checkpoint(tmp_path / "model", tmp_path / "a", model.config.slimmed(intermediate_size=8), bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        prune_checkpoint(tmp_path / "model", tmp_path / "full", model.config.slimmed(intermediate_size=8),
                         tied_scores())
    with pytest.raises(FileNotFoundError, match="No config.json"):
        prune_checkpoint(tmp_path / "nowhere", tmp_path / "b", model.config, tied_scores())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compress_with_streaming_prune_saves_the_stages_prune_to_gives(tmp_path, caplog):
    """`prune.streaming: true` cuts each parent checkpoint on disk; with the same teacher, scores and seed both runs
    save bit-identical stages."""
    from test_pipeline import tiny_recipe

    from hf_slimmoe.compression.loop import compress
    from hf_slimmoe.compression.recipe import recipe_from_dict

    changes = dict(stages__budget__steps=[3, 3], early_stopping__enabled=False, data__eval_blocks=4)
    streamed = recipe_from_dict(tiny_recipe(tmp_path / "streamed", prune={"streaming": True}, **changes))
    with caplog.at_level("INFO", logger="hf_slimmoe.pruning.streaming"):
        compress(streamed)
    assert sum("Streaming surgery of" in r.message for r in caplog.records) == 2  # one per stage
    in_memory = tiny_recipe(tmp_path / "in-memory", **changes)
    in_memory["teacher"] = {"model": str(tmp_path / "streamed" / "teacher"), "license": "apache-2.0"}
    compress(recipe_from_dict(in_memory))
    for stage in ("stage-1", "stage-2"):
        assert_same_tensors(tensors(tmp_path / "streamed" / stage), tensors(tmp_path / "in-memory" / stage))
    assert not (tmp_path / "streamed" / ".stage-2.work").exists()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2",
                                        "gpt_oss"])
def test_streaming_prune_of_every_family_equals_load_prune_save(tmp_path, model_type):
    """Every family the adapters support, saved by `save_pretrained` in a few shards (dense layers, shared experts,
    gpt-oss's transposed interleaved experts and sinks, MLA left whole): the streamed checkpoint holds exactly the
    tensors and config that loading, `prune_to` and `save_pretrained` give, and loads as the stock family."""
    from test_architectures import score, tiny

    from hf_slimmoe import prune_to, slim_config
    from hf_slimmoe.architectures import get_architecture, load_model

    model = tiny(model_type)
    model.save_pretrained(tmp_path / "model", max_shard_size="40KB")
    assert len([n for n in os.listdir(tmp_path / "model") if n.endswith(".safetensors")]) >= 2
    arch = get_architecture(model)
    shared = {"shared_expert_width": 8} if arch.shared_expert is not None and arch.shared_expert.width else {}
    heads = {"num_key_value_heads": 2} if arch.attention_prunable else {}
    target = slim_config(model.config, expert_width=16, **heads, **shared)
    scores = score(model)
    prune_checkpoint(tmp_path / "model", tmp_path / "streamed", target, scores, show_progress=False)

    reference = prune_to(load_model(tmp_path / "model", dtype="auto"), target, scores)
    reference.save_pretrained(tmp_path / "reference")
    assert_same_tensors(tensors(tmp_path / "streamed"), tensors(tmp_path / "reference"))
    produced, expected = (json.load(open(tmp_path / d / "config.json")) for d in ("streamed", "reference"))
    assert produced == expected
    loaded = load_model(tmp_path / "streamed")
    assert type(loaded) is type(model) and all(torch.equal(v, loaded.state_dict()[k])
                                               for k, v in reference.state_dict().items())
