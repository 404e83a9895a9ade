"""Post-training of a compressed SlimMoE model: SFT with top-k distillation, DPO and LoRA, on TRL and PEFT.

- [`SFTDistillationTrainer`] is `trl.SFTTrainer` (chat templates, packing, completion-only / assistant-only loss,
  every dataset format) whose loss mixes the usual cross-entropy with the top-k KD loss against an instruct teacher
  (SlimMoE post-training: top-8 logits distillation from the post-trained teacher), either online or from a cached
  top-k pass over the formatted SFT data.
- DPO is `trl.DPOTrainer` unchanged (reference model handling as TRL does it); [`run_dpo`] wires it to a recipe.
- LoRA is PEFT's `LoraConfig`, optionally on the fused expert parameters (`target_parameters`), trained with the SFT
  trainer and merged back into a checkpoint that `from_pretrained` loads ([`run_sft`] with `use_lora=True`).

Every output directory gets a `stage.json` (lineage: parent model, teacher, training numbers) and a generated card.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from datasets import Dataset, load_from_disk
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .data import is_teacher_value, load_dataset_splits, pad
from .distillation.losses import topk_kl_loss
from .distillation.teacher_cache import FINGERPRINT_COLUMN, cache_teacher_topk, check_teacher_cache
from .modeling_utils import (backbone, causal_lm, check_same_vocabulary, forward_hidden, teacher_topk_from_hidden,
                             vocab_size)

logger = logging.getLogger(__name__)

TEACHER_TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
BUILTIN_DOCSTRINGS = "builtin:stdlib-docstrings"


# ------------------------------------------------------------------------------------------------------ configs
@dataclass
class SFTDistillationConfig(SFTConfig):
    r"""
    Configuration for [`SFTDistillationTrainer`]: every field of `trl.SFTConfig` plus the distillation fields.

    Parameters that control the teacher:
        teacher_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Instruct teacher (Hub id or directory) loaded when the trainer gets no `teacher_model`. It must share the
            student's vocabulary. `None` with no teacher top-k columns in the data means plain SFT (`ce_mix=1`).
        teacher_cache_dir (`str` or `None`, *optional*, defaults to `None`):
            Directory of a cached teacher top-k pass over the *formatted* (tokenized, masked, packed) training data.
            If it holds a cache made for the same data, `top_k` and `temperature`, it is read and no teacher runs;
            otherwise the teacher makes it once before training (then it is released).

    Parameters that control the loss:
        top_k (`int`, *optional*, defaults to `8`):
            Teacher tokens kept per position (the paper's top-8 logits distillation).
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of teacher and student in the KD term (no `T**2` factor).
        ce_mix (`float`, *optional*, defaults to `0.0`):
            Mixing weight: `loss = ce_mix * CE + (1 - ce_mix) * KD + router_aux_loss_coef * aux`. CE and KD
            are both per-token means over the same tokens (the completion / assistant tokens TRL keeps in
            `labels`). `0.0` is the paper's pure top-k KD; `1.0` is plain `SFTTrainer`.
        renormalize_topk (`bool`, *optional*, defaults to `False`):
            Renormalize the teacher's top-k probabilities to sum to 1 instead of keeping them relative to the full
            vocabulary.
        kd_chunk_size (`int`, *optional*, defaults to `1024`):
            Tokens projected to the vocabulary at a time in the KD loss and the teacher top-k.

    Defaults that differ from `SFTConfig`: `learning_rate=2e-6` and `weight_decay=1e-4` (paper, Appendix A.5).
    """

    learning_rate: float = field(default=2e-6, metadata={"help": "AdamW learning rate (paper: 2e-6 for SFT)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (paper: 1e-4 for SFT)."})
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Instruct teacher (Hub id or directory) sharing the student's vocabulary."}
    )
    teacher_cache_dir: str | None = field(
        default=None, metadata={"help": "Directory of the cached teacher top-k pass over the formatted data."}
    )
    top_k: int = field(default=8, metadata={"help": "Teacher tokens kept per position."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KD term."})
    ce_mix: float = field(
        default=0.0, metadata={"help": "loss = ce_mix * CE + (1 - ce_mix) * KD + aux; 1.0 is plain SFT."}
    )
    renormalize_topk: bool = field(default=False, metadata={"help": "Renormalize the teacher top-k to sum to 1."})
    kd_chunk_size: int = field(default=1024, metadata={"help": "Tokens projected to the vocabulary at a time."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ce_mix <= 1.0:
            raise ValueError(f"ce_mix={self.ce_mix} must be between 0 and 1.")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be at least 1.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be positive.")


@dataclass
class PostTrainArguments:
    r"""
    Model, data and LoRA arguments of `slimmoe sft | dpo | lora` (the trainer's own config holds the rest).

    Parameters that control the model:
        model_name_or_path (`str`):
            Model to train (a compression stage, an SFT output, or a Hub id).
        ref_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            DPO reference model; `None` lets TRL use a frozen copy of the model (or the adapter-free base with LoRA).
        dtype (`str`, *optional*, defaults to `"auto"`):
            `torch_dtype` the models are loaded in (`"auto"`, `"bfloat16"`, `"float32"`, ...).
        tiny_init (`bool`, *optional*, defaults to `False`):
            CPU demo only: when `model_name_or_path` (and the teacher) do not exist, build tiny random SlimMoE models
            there with a BPE tokenizer trained on this machine's Python standard library.

    Parameters that control the data:
        dataset_name (`str`):
            Hub dataset id, a local `.json`/`.jsonl`/`.parquet` file, a `save_to_disk` directory, or
            `builtin:stdlib-docstrings` (instruction / preference pairs built from the local Python standard library).
        dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Dataset configuration name.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Training split.
        dataset_test_split (`str` or `None`, *optional*, defaults to `None`):
            Evaluation split, if any.
        max_train_samples (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first examples of the training split.

    Parameters that control LoRA (`slimmoe lora`, or `use_lora: true`):
        use_lora (`bool`, *optional*, defaults to `False`):
            Train LoRA adapters instead of all weights.
        lora_r (`int`, *optional*, defaults to `16`), lora_alpha (`int`, *optional*, defaults to `32`),
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            LoRA rank, scale numerator and dropout.
        lora_target_modules (`list[str]`, *optional*, defaults to the attention projections):
            `nn.Linear` modules that get adapters.
        lora_target_experts (`bool`, *optional*, defaults to `False`):
            Also adapt the fused expert parameters `mlp.experts.gate_up_proj` / `down_proj` (PEFT `target_parameters`).
        merge_lora (`bool`, *optional*, defaults to `True`):
            Save the merged model in `output_dir` (a complete checkpoint) and the adapter in `output_dir/adapter`.
    """

    model_name_or_path: str = field(metadata={"help": "Model to train (stage dir, SFT output or Hub id)."})
    dataset_name: str = field(
        default=BUILTIN_DOCSTRINGS, metadata={"help": f"Hub id, local file/dir, or {BUILTIN_DOCSTRINGS}."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "DPO reference model."})
    dtype: str = field(default="auto", metadata={"help": "torch dtype the models are loaded in."})
    tiny_init: bool = field(default=False, metadata={"help": "Build tiny random models when paths are missing."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "nn.Linear modules that get LoRA adapters."},
    )
    lora_target_experts: bool = field(
        default=False, metadata={"help": "Also adapt mlp.experts.gate_up_proj / down_proj (target_parameters)."}
    )
    merge_lora: bool = field(default=True, metadata={"help": "Save the merged model; adapter in output_dir/adapter."})

    def lora_config(self):
        """The `peft.LoraConfig` these arguments describe, or `None` without `use_lora`."""
        if not self.use_lora:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules),
            target_parameters=list(EXPERT_PARAMETERS) if self.lora_target_experts else None,
            task_type="CAUSAL_LM",
        )


# ------------------------------------------------------------------------------------------------- trainer
@dataclass
class _TeacherTopkCollator:
    """Wraps TRL's collator: pads the per-position `teacher_*` columns like `input_ids` (right, or flattened)."""

    collator: Callable
    padding_free: bool

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        names = [name for name, value in examples[0].items() if is_teacher_value(name, value)]
        if not names:
            return self.collator(examples)
        cached = [{name: torch.as_tensor(ex.pop(name)) for name in names} for ex in examples]
        batch = self.collator(examples)
        length = batch["input_ids"].size(1)
        for name in names:
            rows = [c[name] for c in cached]  # each (T_i, k)
            batch[name] = pad([torch.cat(rows)] if self.padding_free else rows, 0, length=length)  # (B, T, k)
        return batch


class SFTDistillationTrainer(SFTTrainer):
    """
    `trl.SFTTrainer` whose loss mixes cross-entropy with the top-k KD loss against an instruct teacher.

    Everything `SFTTrainer` does (chat template, completion-only / assistant-only labels, packing, padding-free,
    PEFT, the MoE load-balancing loss) is unchanged; only `compute_loss` differs:

        loss = ce_mix * CE + (1 - ce_mix) * KD + router_aux_loss_coef * aux

    CE and KD are sums over the tokens whose label is not `-100` (so only completion / assistant tokens count)
    divided by the same token count (`num_items_in_batch` under gradient accumulation), so both scale like TRL's
    loss. The student runs once, through the accelerate wrapper, with TRL's fused LM head (CE and metrics); its last
    hidden state feeds the chunked [`topk_kl_loss`], so no `(tokens, vocab)` logits are built. The teacher (eval mode,
    no grad, prepared like TRL's DPO reference model) runs on the same batch, or its top-k is read from the
    `teacher_topk_ids` / `teacher_topk_logprobs` columns of a cached pass (`args.teacher_cache_dir`).

    Args:
        model: student (a model or a path), as for `SFTTrainer`.
        teacher_model (`PreTrainedModel`, `str` or `None`): instruct teacher; defaults to
            `args.teacher_model_name_or_path`.
        args ([`SFTDistillationConfig`]): configuration.
        **kwargs: every other `SFTTrainer` argument (`train_dataset`, `processing_class`, `peft_config`, ...).
    """

    _tag_names = ["trl", "sft", "slimmoe", "distillation"]

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: PreTrainedModel | str | None = None,
        args: SFTDistillationConfig | None = None,
        **kwargs,
    ):
        if not isinstance(args, SFTDistillationConfig):
            raise ValueError("SFTDistillationTrainer needs `args=SFTDistillationConfig(...)`.")
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if isinstance(teacher_model, str):
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, **(args.model_init_kwargs or {}))
        if teacher_model is not None and isinstance(model, PreTrainedModel):
            check_same_vocabulary(model, teacher_model)  # before any data preparation
        super().__init__(model, args=args, **kwargs)
        self.data_collator = _TeacherTopkCollator(self.data_collator, padding_free=bool(args.padding_free))
        if teacher_model is not None:
            check_same_vocabulary(self.accelerator.unwrap_model(self.model), teacher_model)
            teacher_model.eval().requires_grad_(False)
        self.kd_enabled = args.ce_mix < 1.0
        train = self.train_dataset
        if self.kd_enabled and args.teacher_cache_dir is not None and train is not None:
            self.train_dataset = self._attach_teacher_cache(train, teacher_model, args.teacher_cache_dir)
            if self.eval_dataset is None:
                teacher_model = None  # the cache replaces the teacher (kept only to evaluate online)
        elif self.kd_enabled and self._has_cache(train) and FINGERPRINT_COLUMN in train.column_names:
            check_teacher_cache(train, vocab_size=vocab_size(self.accelerator.unwrap_model(self.model)), top_k=args.top_k)
        self.teacher_model = None
        if self.kd_enabled and teacher_model is None and not self._has_cache(self.train_dataset):
            raise ValueError(
                "SFT distillation (ce_mix < 1) needs a teacher: pass `teacher_model`, set "
                "`teacher_model_name_or_path`, or give a dataset with cached `teacher_topk_ids` / "
                "`teacher_topk_logprobs` "
                "columns; set `ce_mix=1.0` for plain SFT."
            )
        self._forward_redirection = _ForwardRedirection()
        if self.kd_enabled and teacher_model is not None:
            if self.is_deepspeed_enabled:
                self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
            elif self.is_fsdp_enabled:
                self.teacher_model = prepare_fsdp(teacher_model, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

    # --- data -------------------------------------------------------------------------------------------------
    @staticmethod
    def _has_cache(dataset) -> bool:
        return dataset is not None and all(c in (dataset.column_names or []) for c in TEACHER_TOPK_COLUMNS)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # A dataset that already carries the teacher top-k is formatted already (the cache is taken after TRL's
        # preparation): re-tokenizing, truncating or packing it would break its alignment with the cache.
        if self._has_cache(dataset):
            if "labels" not in dataset.column_names:
                raise ValueError(f"The {dataset_name} dataset has teacher top-k columns but no `labels` column.")
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *TEACHER_TOPK_COLUMNS]))

    def _attach_teacher_cache(self, dataset: Dataset, teacher: PreTrainedModel | None, cache_dir: str) -> Dataset:
        """Read (or make once, with the teacher) the top-k cache of the formatted dataset; returns it with the cache."""
        if "seq_lengths" in dataset.column_names:
            raise ValueError(
                "`teacher_cache_dir` needs unpacked data (each cached row is one sequence): set `packing=False`, or "
                "drop `teacher_cache_dir` to run the teacher online on the packed batches."
            )
        if self.args.temperature != 1.0:
            raise ValueError(
                f"The teacher cache stores log-probabilities at temperature 1, but temperature={self.args.temperature}:"
                " drop `teacher_cache_dir` to run the teacher online, or use temperature 1."
            )
        student_vocab = vocab_size(self.accelerator.unwrap_model(self.model))
        if not os.path.isdir(cache_dir):
            if teacher is None:
                raise ValueError(
                    f"No teacher cache in {cache_dir} and no teacher to make one: set `teacher_model_name_or_path`."
                )
            if self.accelerator.is_main_process:
                teacher.to(self.accelerator.device)
                cache_teacher_topk(
                    teacher, dataset, top_k=self.args.top_k, batch_size=self.args.per_device_eval_batch_size,
                    output_dir=cache_dir, chunk_size=self.args.kd_chunk_size,
                    pad_token_id=self.processing_class.pad_token_id or 0,
                )
            self.accelerator.wait_for_everyone()
        cached = load_from_disk(cache_dir)
        if len(cached) != len(dataset) or cached["input_ids"] != dataset["input_ids"]:
            raise ValueError(
                f"The teacher cache in {cache_dir} was made for other data than this run's formatted training set "
                "(different rows or tokens); delete it or point `teacher_cache_dir` elsewhere."
            )
        check_teacher_cache(cached, vocab_size=student_vocab, top_k=self.args.top_k)
        logger.info("Distilling from the teacher top-k cache in %s", cache_dir)
        return cached.remove_columns([c for c in cached.column_names if c not in dataset.column_names
                                      and c not in TEACHER_TOPK_COLUMNS])

    # --- loss -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _online_teacher_topk(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "output_router_logits")}
        unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        # `logits_to_keep=1`: the teacher's full logits are never built, its top-k is taken from its hidden states
        _, hidden = forward_hidden(self.teacher_model, backbone(unwrapped), **teacher_inputs, logits_to_keep=1)
        return teacher_topk_from_hidden(
            hidden[:, :-1], unwrapped.get_output_embeddings(), self.args.top_k, self.args.temperature,
            self.args.kd_chunk_size,
        )

    def _student_forward(
        self, student: torch.nn.Module, inputs: dict[str, Any], teacher_ids: torch.Tensor,
        teacher_logprobs: torch.Tensor,
    ) -> tuple[Any, torch.Tensor]:
        """Student forward with TRL's fused LM head, and the KD sum from its last hidden state (inside the wrapper)."""
        outputs, hidden = forward_hidden(student, backbone(student), **inputs, fused_lm_head=True)
        lm_head = causal_lm(student).get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):  # FSDP2 shards: gather the head once for the chunked projection
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3
            kd_sum = topk_kl_loss(
                hidden[:, :-1].to(weight.device), weight, bias, teacher_ids, teacher_logprobs, outputs.label_mask,
                temperature=self.args.temperature, renormalize=self.args.renormalize_topk,
                chunk_size=self.args.kd_chunk_size, reduction="sum",
            )  # (B, T-1) positions: position t predicts token t + 1
        return outputs, kd_sum

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.kd_enabled:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "shift_labels" in inputs:
            raise ValueError(
                "SFTDistillationTrainer does not support context or sequence parallelism (pre-shifted labels): the KD "
                "term aligns teacher and student positions within each sequence."
            )
        mode = "train" if self.model.training else "eval"
        cached = [inputs.pop(name, None) for name in TEACHER_TOPK_COLUMNS]
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        if cached[0] is not None:
            k = self.args.top_k  # a cache may hold more tokens per position than asked; they are sorted
            teacher_ids, teacher_logprobs = cached[0][:, :-1, :k], cached[1][:, :-1, :k]
        elif self.teacher_model is not None:
            teacher_ids, teacher_logprobs = self._online_teacher_topk(inputs)
        else:
            raise ValueError(
                "This batch has no cached teacher top-k and the trainer has no teacher: give the evaluation data "
                "cached `teacher_topk_*` columns too, or pass a teacher model."
            )
        unwrapped = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward, so DDP prepares its gradient sync and FSDP gathers the student's shards
        outputs, kd_sum = self._forward_redirection(
            model, unwrapped, self._student_forward, unwrapped, inputs, teacher_ids, teacher_logprobs
        )
        mask = outputs.label_mask  # (B, T-1): next-token label is not -100
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        num_tokens = torch.as_tensor(num_tokens, device=kd_sum.device).clamp(min=1)
        ce_sum = -outputs.log_probs.sum()
        loss = (self.args.ce_mix * ce_sum + (1.0 - self.args.ce_mix) * kd_sum) / num_tokens
        # As in `SFTTrainer.compute_loss`: the token count covers all ranks and DDP averages the gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        num_valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
        for name, value in (("kd_loss", kd_sum), ("ce_loss", ce_sum)):  # per-token means over this micro-batch
            total = self.accelerator.gather_for_metrics(value.detach()).sum()
            self._metrics[mode][name].append((total / num_valid).item() if num_valid > 0 else 0.0)
        for name, per_token in (("entropy", outputs.entropy), ("mean_token_accuracy", outputs.is_top1)):
            total = self.accelerator.gather_for_metrics(per_token.detach().float().sum()).sum()
            self._metrics[mode][name].append((total / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train" and "attention_mask" in inputs:
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        elif mode == "train":
            self._total_train_tokens += inputs["input_ids"].numel() * self.accelerator.num_processes
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss


# ------------------------------------------------------------------------------------------------ local data
_DOCSTRING_MODULES = ("json", "textwrap", "string", "shlex", "fnmatch", "glob", "posixpath", "base64", "heapq",
                      "bisect", "functools", "statistics", "random", "difflib", "csv", "tempfile")
# Phi-style turns written as plain text, so it works with any tokenizer that has an EOS token; the assistant turn
# is wrapped in {% generation %} so `assistant_only_loss=True` works too. Also shipped as recipes/templates/chat.jinja.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _stdlib_docstrings(modules: tuple[str, ...] = _DOCSTRING_MODULES, max_chars: int = 240) -> list[tuple[str, str]]:
    """(qualified name, first paragraph of the docstring) of the public functions of some stdlib modules, sorted."""
    import importlib

    pairs = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, obj in sorted(inspect.getmembers(module, inspect.isfunction)):
            doc = inspect.getdoc(obj)
            if name.startswith("_") or not doc or getattr(obj, "__module__", None) != module.__name__:
                continue
            paragraph = " ".join(doc.split("\n\n")[0].split())[:max_chars]
            if len(paragraph) >= 20:
                pairs.append((f"{module_name}.{name}", paragraph))
    return pairs


def docstring_datasets(seed: int = 0) -> tuple[Dataset, Dataset]:
    """
    Offline instruction and preference data from this machine's Python standard library.

    Returns `(sft, preference)`: conversational prompt-completion pairs "Write the docstring of the Python function
    `module.name`." -> the docstring's first paragraph, and the same prompts with `chosen` the real docstring and
    `rejected` the docstring of another function.
    """
    pairs = _stdlib_docstrings()
    if len(pairs) < 2:
        raise ValueError("Found fewer than two documented standard-library functions to build the local data from.")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    prompts = [[{"role": "user", "content": f"Write the docstring of the Python function `{name}`."}]
               for name, _ in pairs]
    answers = [[{"role": "assistant", "content": doc}] for _, doc in pairs]
    sft = Dataset.from_dict({"prompt": prompts, "completion": answers})
    rejected = [answers[order[i]] if order[i] != i else answers[(i + 1) % len(pairs)] for i in range(len(pairs))]
    preference = Dataset.from_dict({"prompt": prompts, "chosen": answers, "rejected": rejected})
    return sft, preference


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a few local standard-library sources, with a Phi-style chat template."""
    import importlib

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [open(importlib.import_module(m).__file__, encoding="utf-8").read() for m in _DOCSTRING_MODULES[:6]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|end|>", pad_token="<|pad|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )


def build_tiny_chat_model(directory: str, tokenizer=None, seed: int = 0, **config_overrides) -> str:
    """Save a tiny random SlimMoE model and a tiny tokenizer to `directory` (CPU demos and tests); returns it."""
    from .configuration_slimmoe import SlimMoeConfig
    from .modeling_slimmoe import SlimMoeForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer()
    values = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    values.update(config_overrides)
    torch.manual_seed(seed)
    SlimMoeForCausalLM(SlimMoeConfig(**values)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_train_eval(args: PostTrainArguments, kind: str) -> tuple[Dataset, Dataset | None]:
    """The training (and optional evaluation) split named by `args`; `kind` is `"sft"` or `"preference"`."""
    if args.dataset_name == BUILTIN_DOCSTRINGS:
        sft, preference = docstring_datasets()
        data = (sft if kind == "sft" else preference).train_test_split(test_size=0.1, seed=0)
        train, test = data["train"], data["test"] if args.dataset_test_split else None
    else:
        path = args.dataset_name
        splits = load_dataset_splits(path, args.dataset_config, args.dataset_train_split)
        if args.dataset_train_split not in splits:
            raise ValueError(f"{path} has no split {args.dataset_train_split!r}; it has {list(splits)}.")
        train = splits[args.dataset_train_split]
        test = splits[args.dataset_test_split] if args.dataset_test_split else None
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    return _format_columns(train, kind), None if test is None else _format_columns(test, kind)


# Columns TRL reads, by dataset format, most specific first (e.g. UltraChat has `messages` and a plain `prompt`)
_FORMATS = {
    "sft": (("messages",), ("prompt", "completion"), ("text",)),
    "preference": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
}


def _format_columns(dataset: Dataset, kind: str) -> Dataset:
    """Keep the columns of the first TRL dataset format `dataset` has, so extra columns cannot change its format."""
    if "input_ids" in dataset.column_names:  # already tokenized: TRL uses it as is
        return dataset
    for columns in _FORMATS[kind]:
        if all(c in dataset.column_names for c in columns):
            extra = [c for c in dataset.column_names if c not in columns and c not in ("tools", "labels")]
            if extra:
                logger.info("Using the %s columns of the dataset; ignoring %s", "/".join(columns), extra)
            return dataset.remove_columns(extra)
    raise ValueError(
        f"The dataset has columns {dataset.column_names}, none of the {kind} formats TRL reads: "
        + "; ".join(" + ".join(f) for f in _FORMATS[kind]) + "."
    )


# -------------------------------------------------------------------------------------------------- running
def _check_model_paths(**paths: str | None) -> None:
    """Fail before any work on a local model path that does not exist (a Hub id is `owner/name`)."""
    for what, path in paths.items():
        if path and not os.path.isdir(path) and (path.count("/") != 1 or path.startswith((".", "/"))):
            raise FileNotFoundError(
                f"No model directory at {path} ({what}): make it first (for the tiny recipes, "
                "`slimmoe compress recipes/tiny-cpu.yaml` then `slimmoe sft recipes/tiny-sft.yaml`), or pass "
                "`--tiny_init true` with new paths to build tiny random models."
            )


def _load_model(path: str, args: PostTrainArguments, **kwargs) -> PreTrainedModel:
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def _maybe_tiny_init(args: PostTrainArguments, *paths: str | None) -> None:
    if not args.tiny_init:
        return
    paths = [p for p in paths if p]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing and len(missing) != len(paths):
        raise ValueError(
            f"tiny_init builds the student and the teacher together (one tokenizer), but only {missing} are missing: "
            "point both paths to new directories, or to existing models."
        )
    tokenizer = build_tiny_tokenizer() if missing else None
    for seed, path in enumerate(missing):
        logger.info("tiny_init: building a tiny random SlimMoE model and tokenizer in %s", path)
        build_tiny_chat_model(path, tokenizer, seed=seed)


def _finish(output_dir: str, method: str, parent: str, teacher: str | None, trainer, args: PostTrainArguments,
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
        "datasets": [args.dataset_name],
        "license": license_,
    }
    with open(os.path.join(output_dir, "stage.json"), "w") as f:
        json.dump(stage, f, indent=2)
    # the training arguments as JSON rather than Trainer's pickled training_args.bin: a published repo holds no pickle
    with open(os.path.join(output_dir, "training_args.json"), "w") as f:
        f.write(trainer.args.to_json_string())
    if os.path.isfile(os.path.join(output_dir, "training_args.bin")):
        os.remove(os.path.join(output_dir, "training_args.bin"))
    try:
        from .hub import HubSettings, publish_stage, write_model_card
    except ImportError as e:  # hub.py is a sibling module being written in parallel
        logger.warning("No model card written for %s: hf_slimmoe.hub is not available (%s).", output_dir, e)
        return
    write_model_card(output_dir)
    if hub:
        settings = HubSettings.from_dict(hub)
        if settings.push_to_hub:
            publish_stage(output_dir, settings)


def _resume(config) -> str | None:
    if config.resume_from_checkpoint:
        return config.resume_from_checkpoint
    return get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None


def run_sft(args: PostTrainArguments, config: SFTDistillationConfig, hub: dict[str, Any] | None = None) -> str:
    """SFT with top-k KD (and LoRA when `args.use_lora`): train, save a complete model to `config.output_dir`."""
    _maybe_tiny_init(args, args.model_name_or_path, config.teacher_model_name_or_path)
    _check_model_paths(model_name_or_path=args.model_name_or_path,
                       teacher_model_name_or_path=config.teacher_model_name_or_path)
    train, test = load_train_eval(args, "sft")
    model = _load_model(args.model_name_or_path, args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    teacher = None
    cached = config.teacher_cache_dir and os.path.isdir(config.teacher_cache_dir) and test is None
    if config.teacher_model_name_or_path and config.ce_mix < 1.0 and not cached:
        teacher = _load_model(config.teacher_model_name_or_path, args, trust_remote_code=config.trust_remote_code)
    trainer = SFTDistillationTrainer(
        model=model, teacher_model=teacher, args=config, train_dataset=train, eval_dataset=test,
        processing_class=tokenizer, peft_config=args.lora_config(),
    )
    trainer.train(resume_from_checkpoint=_resume(config))
    if test is not None:
        trainer.evaluate()
    method = "lora" if args.use_lora else "sft"
    training = {"top_k": config.top_k, "temperature": config.temperature, "ce_mix": config.ce_mix}
    if args.use_lora:
        training.update(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_target_modules=args.lora_target_modules,
                        lora_target_experts=args.lora_target_experts)
        save_lora(trainer.model, config.output_dir, tokenizer, merge=args.merge_lora)
    else:
        trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        _finish(config.output_dir, method, args.model_name_or_path, config.teacher_model_name_or_path, trainer, args,
                training, hub)
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


def run_dpo(args: PostTrainArguments, config: DPOConfig, hub: dict[str, Any] | None = None) -> str:
    """DPO with `trl.DPOTrainer` on the SFT model; the reference model is handled as TRL does it."""
    _maybe_tiny_init(args, args.model_name_or_path)
    _check_model_paths(model_name_or_path=args.model_name_or_path, ref_model_name_or_path=args.ref_model_name_or_path)
    train, test = load_train_eval(args, "preference")
    model = _load_model(args.model_name_or_path, args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    # TRL would reload the policy from its path as the reference, but resolves the class by name in `transformers`,
    # which has no SlimMoeForCausalLM: load that frozen copy here (with LoRA the adapter-free base stays the reference)
    ref_path = args.ref_model_name_or_path or (None if args.use_lora else args.model_name_or_path)
    ref_model = _load_model(ref_path, args) if ref_path else None
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=config, train_dataset=train, eval_dataset=test,
        processing_class=tokenizer, peft_config=args.lora_config(),
    )
    trainer.train(resume_from_checkpoint=_resume(config))
    if test is not None:
        trainer.evaluate()
    if args.use_lora:
        save_lora(trainer.model, config.output_dir, tokenizer, merge=args.merge_lora)
    else:
        trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        training = {"beta": config.beta, "loss_type": list(config.loss_type)}
        if args.use_lora:
            training.update(lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                            lora_target_modules=args.lora_target_modules, lora_target_experts=args.lora_target_experts)
        _finish(config.output_dir, "dpo", args.model_name_or_path, None, trainer, args, training, hub)
    return config.output_dir


# ---------------------------------------------------------------------------------------------------- recipes
def parse_recipe(
    kind: str, recipe: str | None, overrides: list[str] | None = None
) -> tuple[PostTrainArguments, SFTDistillationConfig | DPOConfig, dict[str, Any] | None]:
    """
    Parse a post-training recipe (YAML) and command-line overrides into `(PostTrainArguments, config, hub)`.

    `kind` is `"sft"`, `"lora"` (SFT with `use_lora=True`) or `"dpo"`. The YAML's keys are the fields of
    [`PostTrainArguments`] and of [`SFTDistillationConfig`] / `trl.DPOConfig`, flat, plus an optional `hub:` mapping
    of `hf_slimmoe.hub.HubSettings` keys. Flags (`--learning_rate 1e-5`) override the YAML; an unknown key raises.
    """
    import yaml
    from trl import TrlParser

    if kind not in ("sft", "lora", "dpo"):
        raise ValueError(f"Unknown post-training kind {kind!r}; use 'sft', 'lora' or 'dpo'.")
    values: dict[str, Any] = {}
    if recipe is not None:
        if not os.path.isfile(recipe):
            raise FileNotFoundError(f"No recipe file at {recipe}.")
        with open(recipe) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{recipe} must hold a YAML mapping of config fields.")
    hub = values.pop("hub", None)
    if hub is not None:
        from .hub import HubSettings

        HubSettings.from_dict(hub)  # validate before any work
    config_cls = DPOConfig if kind == "dpo" else SFTDistillationConfig
    parser = TrlParser((PostTrainArguments, config_cls))
    unknown = parser.set_defaults_with_config(**values)
    if unknown:
        keys = ", ".join(k.lstrip("-") for k in unknown[::2])
        raise ValueError(f"Unknown key(s) in {recipe}: {keys}; `slimmoe {kind} RECIPE --help` lists the fields.")
    args, config = parser.parse_args_into_dataclasses(args=list(overrides or []))
    if kind == "lora":
        args.use_lora = True
    return args, config, hub


def run_recipe(kind: str, recipe: str | None, overrides: list[str] | None = None) -> str:
    """`slimmoe sft | lora | dpo RECIPE.yaml [--field value ...]`: parse, train, save, card, publish; returns it."""
    args, config, hub = parse_recipe(kind, recipe, overrides)
    if kind == "dpo":
        return run_dpo(args, config, hub)
    return run_sft(args, config, hub)
