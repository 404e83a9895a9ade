"""`evaluate_model` / `slimmoe eval`: held-out perplexity, KL to a teacher, top-1 agreement (tiny in-process models)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slimmoe.cli import main
from hf_slimmoe.compression.evaluation import evaluate_model, perplexity
from hf_slimmoe.compression.sources import load_eval_data
from hf_slimmoe.distillation import cache_teacher_topk
from hf_slimmoe.posttrain import build_tiny_chat_model, build_tiny_tokenizer

TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "lm_eval_tasks")


def _tiny(seed: int, vocab_size: int = 48) -> SlimMoeForCausalLM:
    torch.manual_seed(seed)
    config = SlimMoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, pad_token_id=0)
    return SlimMoeForCausalLM(config).eval()


@pytest.fixture(scope="module")
def rows():
    generator = torch.Generator().manual_seed(0)
    lengths = [16, 16, 11, 16, 7, 16, 13]  # ragged: padding must not count
    return Dataset.from_dict({"input_ids": [torch.randint(1, 48, (n,), generator=generator).tolist()
                                            for n in lengths]})


def _naive_perplexity(model, dataset) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in dataset["input_ids"]:
            ids = torch.tensor([ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.size(1) - 1
    return math.exp(total / count)


def test_perplexity_equals_exp_of_naive_cross_entropy(rows):
    model = _tiny(0)
    result = evaluate_model(model, rows, batch_size=3)
    assert set(result) == {"perplexity", "num_tokens"}
    assert result["num_tokens"] == sum(len(r) - 1 for r in rows["input_ids"])
    assert result["perplexity"] == pytest.approx(_naive_perplexity(model, rows), rel=1e-5)


def test_kl_to_itself_with_full_k_is_zero(rows):
    model = _tiny(0)
    result = evaluate_model(model, rows, teacher=model, top_k=model.config.vocab_size, batch_size=4)
    assert abs(result["kl"]) < 1e-5
    assert result["top1_agreement"] == 1.0
    assert result["perplexity"] == pytest.approx(perplexity(model, rows)["perplexity"], rel=1e-5)


def test_online_teacher_and_cached_teacher_agree(rows, tmp_path):
    student, teacher = _tiny(0), _tiny(1)
    online = evaluate_model(student, rows, teacher=teacher, top_k=8, batch_size=4)
    cached = cache_teacher_topk(teacher, rows, top_k=8, output_dir=str(tmp_path / "cache"))
    from_cache = evaluate_model(student, cached, top_k=8, batch_size=4)
    assert online["kl"] > 0 and 0 <= online["top1_agreement"] < 1
    for key in ("kl", "top1_agreement", "perplexity"):
        assert from_cache[key] == pytest.approx(online[key], rel=1e-5, abs=1e-6)


def test_eval_data_refuses_a_missing_path():
    with pytest.raises(FileNotFoundError, match="No evaluation data"):
        load_eval_data(build_tiny_tokenizer(), "/no/such/file.txt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = build_tiny_tokenizer()
    return build_tiny_chat_model(str(root / "student"), tokenizer, seed=0), \
        build_tiny_chat_model(str(root / "teacher"), tokenizer, seed=1)


def test_eval_cli_on_a_text_file_and_the_default_held_out_data(saved, tmp_path, capsys):
    student, teacher = saved
    text = tmp_path / "held_out.py"
    text.write_text(Path(json.__file__).read_text(encoding="utf-8"))
    assert main(["eval", student, "--data", str(text), "--teacher", teacher, "--block-size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] > 0 and result["kl"] > 0 and 0 <= result["top1_agreement"] <= 1 and result["perplexity"] > 1
    assert main(["eval", student, "--teacher", student, "--max-blocks", "8", "--block-size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # the demo's held-out stdlib modules; the model is its own teacher
    assert result["rows"] == 8 and abs(result["kl"]) < 1e-5 and result["top1_agreement"] == 1.0


def test_lm_eval_on_the_local_task_file(saved, capsys):
    pytest.importorskip("lm_eval")
    student, _ = saved
    assert main(["eval", student, "--lm-eval-tasks", TASKS, "--lm-eval-limit", "8", "--batch-size", "4",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = result["lm_eval"]["stdlib_completion"]
    assert 0 <= metrics["acc,none"] <= 1 and 0 <= metrics["acc_norm,none"] <= 1
