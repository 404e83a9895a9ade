"""Post-training: SFT with top-k KD on TRL, DPO, LoRA on PEFT; tiny models and local data, CPU, a few steps each."""

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from hf_slimmoe import SlimMoeForCausalLM
from hf_slimmoe.posttrain import (
    EXPERT_PARAMETERS,
    SFTDistillationConfig,
    SFTDistillationTrainer,
    build_tiny_chat_model,
    build_tiny_tokenizer,
    docstring_datasets,
    lora_config,
    parse_recipe,
    save_lora,
)
from hf_slimmoe.utils.modeling import teacher_topk
from hf_slimmoe.utils.tokenization import CHAT_TEMPLATE

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("posttrain")
    tokenizer = build_tiny_tokenizer()
    student = build_tiny_chat_model(str(root / "student"), tokenizer, seed=0)
    teacher = build_tiny_chat_model(str(root / "teacher"), tokenizer, seed=1)
    sft, preference = docstring_datasets()
    return {"root": root, "tokenizer": tokenizer, "student": student, "teacher": teacher,
            "sft": sft.select(range(16)), "preference": preference.select(range(16))}


def _config(tmp_path, **kwargs) -> SFTDistillationConfig:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8,
                  per_device_eval_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
                  bf16=False, activation_checkpointing=False, report_to="none", save_strategy="no", use_cpu=True,
                  max_length=96, seed=0, dataloader_num_workers=0, kd_loss="topk")  # the tests below: the top-k KD
    values.update(kwargs)
    return SFTDistillationConfig(**values)


def _trainer(tiny, tmp_path, teacher=True, **kwargs) -> SFTDistillationTrainer:
    torch.manual_seed(0)
    return SFTDistillationTrainer(
        model=SlimMoeForCausalLM.from_pretrained(tiny["student"]),
        teacher_model=SlimMoeForCausalLM.from_pretrained(tiny["teacher"]) if teacher else None,
        args=_config(tmp_path, **kwargs), train_dataset=tiny["sft"], processing_class=tiny["tokenizer"],
    )


def _first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_chat_template_applied_and_completion_only_labels(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path)
    tokenizer = tiny["tokenizer"]
    example, row = tiny["sft"][0], trainer.train_dataset[0]
    text = tokenizer.decode(row["input_ids"])
    prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
    assert text == tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    assert text.startswith("<|user|>\nWrite the docstring of") and "<|assistant|>\n" in text
    num_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert all(label == -100 for label in row["labels"][:num_prompt])  # the prompt is never a target
    assert row["labels"][num_prompt:] == row["input_ids"][num_prompt:]  # the completion (and its EOS) is
    assert row["input_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("ce_mix", [0.0, 0.3])
def test_kd_loss_counts_completion_tokens_only_and_mixes_ce(tiny, tmp_path, ce_mix):
    trainer = _trainer(tiny, tmp_path, ce_mix=ce_mix, router_aux_loss_coef=0.0, top_k=4, temperature=2.0)
    batch = _first_batch(trainer)
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    # reference from full logits: KL of the teacher's top-k (relative to the full vocabulary) to the student, and CE,
    # both averaged over the positions whose next token is a completion token
    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        teacher = trainer.teacher_model(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    assert 0 < mask.sum() < batch["attention_mask"].sum()  # prompt tokens are left out
    ids, logprobs = teacher_topk(teacher[mask], 4, 2.0)
    student_logprobs = torch.log_softmax(student[mask].float() / 2.0, -1).gather(-1, ids)
    kd = (logprobs.exp() * (logprobs - student_logprobs)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(student[mask].float(), labels[mask])
    torch.testing.assert_close(loss, ce_mix * ce + (1 - ce_mix) * kd, rtol=1e-4, atol=1e-5)


def test_sft_kd_loss_goes_down(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path)
    batch = _first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, dict(batch)).item()
    trainer.train()
    trainer.model.eval()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert after < before
    logged = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    assert len(logged) == 12 and logged[-1] < logged[0]


def test_sft_trainer_keeps_its_own_metrics_and_refuses_other_losses(tiny, tmp_path):
    """The KD term is added to SFTTrainer's own loss: its metrics (token count, entropy, accuracy, aux) stay as TRL
    computes them, next to kd_loss / ce_loss; a loss TRL computes differently is refused rather than mixed wrongly."""
    trainer = _trainer(tiny, tmp_path, max_steps=2, router_aux_loss_coef=0.01)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(logged) == 2
    assert {"ce_loss", "entropy", "mean_token_accuracy", "num_tokens", "aux_loss"} <= set(logged[-1])
    assert logged[-1]["num_tokens"] == trainer._total_train_tokens > 0
    with pytest.raises(ValueError, match="loss_type='nll'"):
        _trainer(tiny, tmp_path, loss_type="dft")
    assert not _trainer(tiny, tmp_path, loss_type="dft", ce_mix=1.0).kd_enabled


def test_cached_teacher_equals_online_and_is_validated(tiny, tmp_path):
    cache_dir = str(tmp_path / "cache")
    online = _trainer(tiny, tmp_path)
    made = _trainer(tiny, tmp_path, teacher_cache_dir=cache_dir)  # runs the teacher once, writes the cache
    assert made.teacher_model is None and os.path.isdir(cache_dir)
    reused = _trainer(tiny, tmp_path, teacher=False, teacher_cache_dir=cache_dir)  # no teacher needed any more
    losses = []
    for trainer in (online, made, reused):
        trainer.model.eval()
        losses.append(trainer.compute_loss(trainer.model, _first_batch(trainer)).item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[1] == pytest.approx(losses[2], abs=1e-6)
    with pytest.raises(ValueError, match="other data"):  # a different formatting gives different rows
        _trainer(tiny, tmp_path, teacher=False, teacher_cache_dir=cache_dir, max_length=32)


def test_a_cache_made_for_another_loss_is_refused(tiny, tmp_path):
    # (cached == online for every kd_loss, in both trainers: tests/test_kd_trainers.py)
    cache_dir = str(tmp_path / "cache-sampled")
    _trainer(tiny, tmp_path, kd_loss="sampled", teacher_cache_dir=cache_dir)  # makes the cache
    with pytest.raises(ValueError, match="kd_loss='topk'"):
        _trainer(tiny, tmp_path, teacher=False, kd_loss="topk", teacher_cache_dir=cache_dir)


def test_a_bf16_student_trains_fp32_master_weights_and_is_saved_in_bf16(tiny, tmp_path):
    import json

    trainer = SFTDistillationTrainer(
        model=SlimMoeForCausalLM.from_pretrained(tiny["student"], dtype=torch.bfloat16),
        teacher_model=SlimMoeForCausalLM.from_pretrained(tiny["teacher"], dtype=torch.bfloat16),
        args=_config(tmp_path, max_steps=2, kd_loss="sampled"), train_dataset=tiny["sft"],
        processing_class=tiny["tokenizer"])
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["dtype"] == "bfloat16"
    saved = SlimMoeForCausalLM.from_pretrained(tmp_path / "saved", dtype="auto")
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}


def test_clear_errors_before_training(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        _trainer(tiny, tmp_path, teacher=False)
    other = build_tiny_chat_model(str(tmp_path / "other"), tiny["tokenizer"], vocab_size=len(tiny["tokenizer"]) + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        SFTDistillationTrainer(model=SlimMoeForCausalLM.from_pretrained(tiny["student"]),
                               teacher_model=SlimMoeForCausalLM.from_pretrained(other), args=_config(tmp_path),
                               train_dataset=tiny["sft"], processing_class=tiny["tokenizer"])
    with pytest.raises(ValueError, match="ce_mix"):
        _config(tmp_path, ce_mix=1.5)
    from hf_slimmoe.posttrain import run_recipe

    with pytest.raises(FileNotFoundError, match="No model directory"):  # before any data or model loading
        run_recipe("sft", _write_yaml(tmp_path, {"model_name_or_path": str(tmp_path / "missing"), "use_cpu": True,
                                                 "bf16": False, "output_dir": str(tmp_path / "o")}))
    with pytest.raises(ValueError, match="Unknown key"):
        parse_recipe("sft", _write_yaml(tmp_path, {"model_name_or_path": "x", "no_such_field": 1}))


def _write_yaml(tmp_path, values) -> str:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_plain_sft_when_ce_mix_is_one(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, teacher=False, ce_mix=1.0)
    assert not trainer.kd_enabled and trainer.teacher_model is None
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged[-1] < logged[0]


def test_lora_trains_only_adapters_and_merges_into_a_checkpoint(tiny, tmp_path):
    from peft import PeftModel
    from trl import ModelConfig

    args = ModelConfig(model_name_or_path=tiny["student"], use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                       lora_target_parameters=list(EXPERT_PARAMETERS))
    base = SlimMoeForCausalLM.from_pretrained(tiny["student"])
    original = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(0)
    trainer = SFTDistillationTrainer(
        model=base, teacher_model=SlimMoeForCausalLM.from_pretrained(tiny["teacher"]),
        args=_config(tmp_path, max_steps=6),
        train_dataset=tiny["sft"], processing_class=tiny["tokenizer"], peft_config=lora_config(args),
    )
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("experts" in n for n in trainable)  # the fused expert parameters got adapters too
    trainer.train()
    model = trainer.model.eval()
    for name, value in model.get_base_model().state_dict().items():  # base weights are untouched
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in original:
            torch.testing.assert_close(value, original[key], rtol=0, atol=0)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapters moved

    input_ids = torch.tensor([tiny["tokenizer"]("def f(x): return x")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    out = str(tmp_path / "lora")
    save_lora(model, out, tiny["tokenizer"], merge=True)
    merged = SlimMoeForCausalLM.from_pretrained(out).eval()
    reloaded = PeftModel.from_pretrained(SlimMoeForCausalLM.from_pretrained(tiny["student"]), out + "/adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).chat_template is not None


def test_dpo_loss_goes_down(tiny, tmp_path):
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=10, per_device_train_batch_size=8,
                       learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, bf16=False,
                       activation_checkpointing=False, report_to="none", save_strategy="no", use_cpu=True,
                       max_length=96, seed=0)
    trainer = DPOTrainer(model=SlimMoeForCausalLM.from_pretrained(tiny["student"]),
                         ref_model=SlimMoeForCausalLM.from_pretrained(tiny["student"]), args=config,
                         train_dataset=tiny["preference"], processing_class=tiny["tokenizer"])
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert history[0]["loss"] == pytest.approx(0.6931, abs=0.02)  # policy == reference at the start
    assert sum(h["loss"] for h in history[-3:]) / 3 < 0.5
    assert history[-1]["rewards/margins"] > 0


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """The project's local Hub stand-in on 127.0.0.1, with `huggingface_hub` pointed at it."""
    import sys

    from huggingface_hub import constants

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hub_server import LocalHub

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_TOKEN", "hf_posttrainTestToken")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    with LocalHub(token="hf_posttrainTestToken", user="tester") as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        yield server


def test_cli_sft_then_dpo_chain_writes_complete_cards_and_publishes(tiny, tmp_path, monkeypatch, local_hub):
    import yaml

    from hf_slimmoe.cli import main

    monkeypatch.chdir(os.path.dirname(RECIPES))
    sft_dir, dpo_dir = str(tmp_path / "sft"), str(tmp_path / "dpo")
    with open(os.path.join(RECIPES, "tiny-sft.yaml")) as f:
        recipe = yaml.safe_load(f)
    recipe["hub"] = {"push_to_hub": True, "repo_id": "{user}/tiny-slimmoe-{stage}", "private": True}
    common = ["--max_steps", "3", "--max_train_samples", "16", "--logging_steps", "1"]
    assert main(["sft", _write_yaml(tmp_path, recipe), "--tiny_init", "true", "--model_name_or_path",
                 str(tmp_path / "m" / "student"), "--teacher_model_name_or_path", str(tmp_path / "m" / "teacher"),
                 "--output_dir", sft_dir, *common]) == 0
    assert local_hub.commits("tester/tiny-slimmoe-sft")  # published with its card, like a compression stage
    assert main(["dpo", "recipes/tiny-dpo.yaml", "--model_name_or_path", sft_dir, "--output_dir", dpo_dir,
                 *common]) == 0
    for directory, method, parent in ((sft_dir, "sft", str(tmp_path / "m" / "student")), (dpo_dir, "dpo", sft_dir)):
        with open(os.path.join(directory, "stage.json")) as f:
            stage = json.load(f)
        assert stage["method"] == method and stage["parent"] == parent and stage["training"]["steps"] == 3
        assert method != "sft" or {"topk_kl", "perplexity", "eval_kd_loss"} <= set(stage["eval"])
        assert os.path.isfile(os.path.join(directory, "README.md"))
        assert os.path.isfile(os.path.join(directory, "training_args.json"))
        assert not os.path.exists(os.path.join(directory, "training_args.bin"))  # no pickle in a published repo
        SlimMoeForCausalLM.from_pretrained(directory)
        assert AutoTokenizer.from_pretrained(directory).chat_template.strip() == CHAT_TEMPLATE
    assert stage["teacher"] is None


def test_real_recipes_parse():
    for kind, name in (("sft", "sft.yaml"), ("dpo", "dpo.yaml")):
        _, _, config, hub = parse_recipe(kind, os.path.join(RECIPES, name), ["--bf16", "false", "--use_cpu", "true"])
        assert hub["push_to_hub"] and "{stage}" in hub["repo_id"]
        assert config.weight_decay == 1e-4
    _, _, config, _ = parse_recipe("sft", os.path.join(RECIPES, "sft.yaml"), ["--bf16", "false", "--use_cpu", "true"])
    assert (config.learning_rate, config.top_k, config.ce_mix) == (2e-6, 8, 0.0)
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * 64 == 1536


