"""Running post-training: load the models and data a recipe names, train, save a complete model directory (merged
LoRA included), write its `stage.json` and card, and publish it when the recipe asks."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer, ModelConfig

from .chat_data import load_train_eval
from .config import PostTrainScriptArguments, SFTDistillationConfig, lora_config
from .tiny import maybe_tiny_init
from .trainer import SFTDistillationTrainer

logger = logging.getLogger(__name__)


def _check_model_paths(**paths: str | None) -> None:
    """Fail before any work on a missing `model_name_or_path`, or a local model path that does not exist (a Hub id is
    `owner/name`)."""
    if not paths.get("model_name_or_path"):
        raise ValueError("model_name_or_path is required (a recipe key, or --model_name_or_path).")
    for what, path in paths.items():
        if path and not os.path.isdir(path) and (path.count("/") != 1 or path.startswith((".", "/"))):
            raise FileNotFoundError(
                f"No model directory at {path} ({what}): make it first (for the tiny recipes, "
                "`slimmoe compress recipes/tiny-cpu.yaml` then `slimmoe sft recipes/tiny-sft.yaml`), or pass "
                "`--tiny_init true` with new paths to build tiny random models."
            )


def _load_model(path: str, model_args: ModelConfig, **kwargs) -> PreTrainedModel:
    """`from_pretrained` with the `dtype` and `attn_implementation` of `model_args`."""
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=model_args.attn_implementation,
                                                **kwargs)


def _lora_training(peft_config) -> dict[str, Any]:
    """The LoRA numbers recorded in stage.json."""
    targets = peft_config.target_modules
    return {"lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
            "lora_target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
            "lora_target_parameters": list(peft_config.target_parameters or [])}


def _finish(output_dir: str, method: str, parent: str, teacher: str | None, trainer, dataset_name: str,
            training: dict[str, Any], hub: dict[str, Any] | None) -> None:
    """Write stage.json and the model card into `output_dir`, and publish it when the recipe asks."""
    state = trainer.state
    last = state.log_history[-1] if state.log_history else {}
    eval_metrics = {k: v for k, v in last.items()
                    if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second", "num_tokens"))}
    if "eval_kd_loss" in eval_metrics:  # the top-k KD loss value, named as the compression stages name it
        eval_metrics["topk_kl"] = eval_metrics["eval_kd_loss"]
    if "eval_ce_loss" in eval_metrics:
        eval_metrics["perplexity"] = math.exp(min(eval_metrics["eval_ce_loss"], 50.0))
    parent_stage = os.path.join(parent, "stage.json")
    license_ = None
    if os.path.isfile(parent_stage):
        with open(parent_stage) as f:
            license_ = json.load(f).get("license")
    stage = {
        "method": method,
        "parent": parent,
        "teacher": teacher,
        "training": {"tokens": int(getattr(trainer, "_total_train_tokens", 0)), "steps": state.global_step,
                     "learning_rate": trainer.args.learning_rate, **training},
        "eval": eval_metrics,
        "datasets": [dataset_name],
        "license": license_,
    }
    with open(os.path.join(output_dir, "stage.json"), "w") as f:
        json.dump(stage, f, indent=2)
    # the training arguments as JSON rather than Trainer's pickled training_args.bin: a published repo holds no pickle
    with open(os.path.join(output_dir, "training_args.json"), "w") as f:
        f.write(trainer.args.to_json_string())
    if os.path.isfile(os.path.join(output_dir, "training_args.bin")):
        os.remove(os.path.join(output_dir, "training_args.bin"))
    from ..hub import HubSettings, publish_stage, write_model_card

    write_model_card(output_dir)
    if hub:
        settings = HubSettings.from_dict(hub)
        if settings.push_to_hub:
            publish_stage(output_dir, settings)


def _resume(config) -> str | None:
    if config.resume_from_checkpoint:
        return config.resume_from_checkpoint
    return get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None


def _train_and_save(trainer, tokenizer, peft_config, merge_lora: bool) -> None:
    """Train (resuming from the newest checkpoint), evaluate when there is evaluation data, and save the model to
    `output_dir`: the whole model, or with LoRA the adapter and (`merge_lora`) the merged model."""
    trainer.train(resume_from_checkpoint=_resume(trainer.args))
    if trainer.eval_dataset is not None:
        trainer.evaluate()
    if peft_config is not None:
        save_lora(trainer.model, trainer.args.output_dir, tokenizer, merge=merge_lora)
    else:
        trainer.save_model(trainer.args.output_dir)


def run_sft(script_args: PostTrainScriptArguments, model_args: ModelConfig, config: SFTDistillationConfig,
            hub: dict[str, Any] | None = None) -> str:
    """SFT with top-k KD (and LoRA with `model_args.use_peft`): train, save a complete model to `config.output_dir`."""
    student_path, teacher_path = model_args.model_name_or_path, config.teacher_model_name_or_path
    maybe_tiny_init(script_args, student_path, teacher_path)
    _check_model_paths(model_name_or_path=student_path, teacher_model_name_or_path=teacher_path)
    train, test = load_train_eval(script_args, "sft")
    model = _load_model(student_path, model_args, revision=model_args.model_revision)
    tokenizer = AutoTokenizer.from_pretrained(student_path, revision=model_args.model_revision)
    teacher = None
    cached = config.teacher_cache_dir and os.path.isdir(config.teacher_cache_dir) and test is None
    if teacher_path and config.ce_mix < 1.0 and not cached:
        teacher = _load_model(teacher_path, model_args, trust_remote_code=config.trust_remote_code)
    peft_config = lora_config(model_args)
    trainer = SFTDistillationTrainer(
        model=model, teacher_model=teacher, args=config, train_dataset=train, eval_dataset=test,
        processing_class=tokenizer, peft_config=peft_config,
    )
    _train_and_save(trainer, tokenizer, peft_config, script_args.merge_lora)
    training = {"kd_loss": config.kd_loss, "kd_samples": config.kd_samples if config.kd_loss == "sampled" else None,
                "top_k": config.top_k, "temperature": config.temperature, "ce_mix": config.ce_mix}
    if peft_config is not None:
        training.update(_lora_training(peft_config))
    if trainer.accelerator.is_main_process:
        _finish(config.output_dir, "lora" if peft_config is not None else "sft", student_path, teacher_path, trainer,
                script_args.dataset_name, training, hub)
    return config.output_dir


def save_lora(model, output_dir: str, tokenizer=None, merge: bool = True) -> str:
    """
    Save a PEFT model's adapter to `output_dir/adapter` and, with `merge`, the merged model to `output_dir`.

    The merged directory is a complete checkpoint (`from_pretrained` gives the model with the adapter folded in,
    expert parameters included); `PeftModel.from_pretrained(base, output_dir + "/adapter")` gives the adapter model.
    """
    adapter_dir = os.path.join(output_dir, "adapter")
    model.save_pretrained(adapter_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter_dir)
    if merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    return output_dir


def run_dpo(script_args: PostTrainScriptArguments, model_args: ModelConfig, config: DPOConfig,
            hub: dict[str, Any] | None = None) -> str:
    """DPO with `trl.DPOTrainer` on the SFT model; the reference model is handled as TRL does it."""
    path = model_args.model_name_or_path
    maybe_tiny_init(script_args, path)
    _check_model_paths(model_name_or_path=path, ref_model_name_or_path=script_args.ref_model_name_or_path)
    train, test = load_train_eval(script_args, "preference")
    model = _load_model(path, model_args, revision=model_args.model_revision)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    # TRL would reload the policy from its path as the reference, but resolves the class by name in `transformers`,
    # which has no SlimMoeForCausalLM: load that frozen copy here (with LoRA the adapter-free base stays the reference)
    ref_path = script_args.ref_model_name_or_path or (None if model_args.use_peft else path)
    ref_model = _load_model(ref_path, model_args) if ref_path else None
    peft_config = lora_config(model_args)
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=config, train_dataset=train, eval_dataset=test,
        processing_class=tokenizer, peft_config=peft_config,
    )
    _train_and_save(trainer, tokenizer, peft_config, script_args.merge_lora)
    if trainer.accelerator.is_main_process:
        training = {"beta": config.beta, "loss_type": list(config.loss_type)}
        if peft_config is not None:
            training.update(_lora_training(peft_config))
        _finish(config.output_dir, "dpo", path, None, trainer, script_args.dataset_name, training, hub)
    return config.output_dir


__all__ = ["run_dpo", "run_sft", "save_lora"]
