"""The KD core (`hf_slimmoe.distillation.kd`) through both trainers that use it: `DistillationTrainer` (compression)
and `SFTDistillationTrainer` (post-training). One set of tests, run against each: every `kd_loss` reads the same
targets from a cache as from the online teacher, and gradient accumulation gives the big batch's update."""

import pytest
import torch

from hf_slimmoe import SlimMoeForCausalLM
from hf_slimmoe.distillation import (DistillationConfig, DistillationTrainer, cache_teacher_samples,
                                     cache_teacher_topk)
from hf_slimmoe.posttrain import (SFTDistillationConfig, SFTDistillationTrainer, build_tiny_chat_model,
                                  build_tiny_tokenizer, docstring_datasets)

TRAINERS = ("distill", "sft")
KD_LOSSES = ("sampled", "topk_tail", "topk", "full")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny student / teacher pair (router noise off, so training-mode routing is deterministic), the chat data
    the SFT trainer formats and token rows for the distillation trainer."""
    root = tmp_path_factory.mktemp("kd")
    tokenizer = build_tiny_tokenizer()
    noise = dict(router_jitter_noise=0.0, input_jitter_noise=0.0)
    student = build_tiny_chat_model(str(root / "student"), tokenizer, seed=0, **noise)
    teacher = build_tiny_chat_model(str(root / "teacher"), tokenizer, seed=1, **noise)
    sft, _ = docstring_datasets()
    sft = sft.select(range(8))
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, len(tokenizer), (int(torch.randint(20, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(8)]
    from datasets import Dataset

    return {"root": root, "tokenizer": tokenizer, "student": student, "teacher": teacher, "sft": sft,
            "tokens": Dataset.from_dict({"input_ids": rows})}


def make_trainer(kind, tiny, tmp_path, kd_loss, cached=False, **overrides):
    """A trainer of `kind` on the 8 rows, with the teacher online or (`cached`) only its cache for `kd_loss`."""
    torch.manual_seed(0)
    student = SlimMoeForCausalLM.from_pretrained(tiny["student"])
    teacher = SlimMoeForCausalLM.from_pretrained(tiny["teacher"])
    values = dict(output_dir=str(tmp_path / f"{kind}-out"), per_device_train_batch_size=8, max_steps=1,
                  learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none",
                  save_strategy="no", use_cpu=True, seed=0, kd_loss=kd_loss, kd_samples=8, top_k=8,
                  disable_tqdm=True)
    values.update(overrides)
    if kind == "distill":
        data = tiny["tokens"]
        if cached:
            make = cache_teacher_samples if kd_loss == "sampled" else cache_teacher_topk
            size = {"num_samples": 8} if kd_loss == "sampled" else {"top_k": 8}
            data = make(teacher, data, batch_size=8, pad_token_id=tiny["tokenizer"].pad_token_id, **size)
            teacher = None
        args = DistillationConfig(aux_loss_coef=0.0, **values)
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                   processing_class=tiny["tokenizer"])
    values.update(max_length=96, bf16=False, router_aux_loss_coef=0.0, dataloader_num_workers=0, shuffle_dataset=False,
                  activation_checkpointing=False)
    if cached:
        values["teacher_cache_dir"] = str(tmp_path / f"sft-cache-{kd_loss}")
        SFTDistillationTrainer(model=student, teacher_model=teacher, args=SFTDistillationConfig(**values),
                               train_dataset=tiny["sft"], processing_class=tiny["tokenizer"])  # makes the cache
        teacher = None
    return SFTDistillationTrainer(model=student, teacher_model=teacher, args=SFTDistillationConfig(**values),
                                  train_dataset=tiny["sft"], processing_class=tiny["tokenizer"])


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize("kd_loss", KD_LOSSES)
@pytest.mark.parametrize("kind", TRAINERS)
def test_the_cached_teacher_gives_the_online_loss_and_gradient(tiny, tmp_path, kind, kd_loss):
    online = make_trainer(kind, tiny, tmp_path, kd_loss)
    loss = online.compute_loss(online.model, first_batch(online))
    loss.backward()
    assert loss.item() > 0 and online.model.lm_head.weight.grad.abs().sum() > 0
    if kd_loss == "full":  # no cache holds the full distribution
        with pytest.raises(ValueError, match="kd_loss='full'"):
            make_trainer(kind, tiny, tmp_path, kd_loss, cached=True)
        return
    cached = make_trainer(kind, tiny, tmp_path, kd_loss, cached=True)
    assert cached.teacher_model is None
    cached_loss = cached.compute_loss(cached.model, first_batch(cached))
    cached_loss.backward()
    torch.testing.assert_close(cached_loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.model.lm_head.weight.grad, online.model.lm_head.weight.grad, atol=1e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("kd_loss", ["sampled", "topk"])
@pytest.mark.parametrize("kind", TRAINERS)
def test_gradient_accumulation_gives_the_big_batch_update(tiny, tmp_path, kind, kd_loss):
    """One SGD step on 8 rows, as one batch and as 2 x 4 and 4 x 2 accumulated micro-batches (KD + 0.5 x CE: each
    sum over tokens is divided by the whole accumulated batch's count)."""
    mix = {"ce_weight": 0.5} if kind == "distill" else {"ce_mix": 0.5}
    params = []
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        trainer = make_trainer(kind, tiny, tmp_path, kd_loss, per_device_train_batch_size=batch_size,
                               gradient_accumulation_steps=accumulation, **mix)
        assert {"slimmoe", "distillation"} <= set(trainer.model.model_tags)  # the trainer's _tag_names
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert not torch.equal(params[0], torch.cat([p.flatten() for p in
                                                 SlimMoeForCausalLM.from_pretrained(tiny["student"]).parameters()]))
    torch.testing.assert_close(params[1], params[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(params[2], params[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", TRAINERS)
def test_models_given_as_paths_load_with_their_init_kwargs(tiny, tmp_path, kind):
    """TRL's convention: `model_init_kwargs` / `teacher_model_init_kwargs` (a dict, or JSON on the command line)."""
    common = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, kd_loss="full",
                  teacher_model_init_kwargs='{"dtype": "bfloat16"}', model_init_kwargs={"dtype": "bfloat16"})
    if kind == "distill":
        trainer = DistillationTrainer(model=tiny["student"], teacher_model=tiny["teacher"],
                                      args=DistillationConfig(**common), train_dataset=tiny["tokens"])
    else:  # (the student as a path goes through TRL's create_model_from_path, which needs a transformers class)
        student = SlimMoeForCausalLM.from_pretrained(tiny["student"], dtype=torch.bfloat16)
        trainer = SFTDistillationTrainer(model=student, teacher_model=tiny["teacher"],
                                         args=SFTDistillationConfig(**common, max_length=96, bf16=False,
                                                                    activation_checkpointing=False),
                                         train_dataset=tiny["sft"], processing_class=tiny["tokenizer"])
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    assert teacher.dtype == torch.bfloat16  # the student trains float32 master weights of its bfloat16 load
    assert trainer.save_dtype == torch.bfloat16
