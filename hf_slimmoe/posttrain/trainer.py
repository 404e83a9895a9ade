"""[`SFTDistillationTrainer`]: `trl.SFTTrainer` whose loss mixes cross-entropy with a KD loss (`kd_loss`, as in
compression) against an instruct teacher (SlimMoE post-training: top-8 logits distillation from the post-trained
teacher), run online or read from a cached teacher pass (samples or top-k) over the formatted SFT data."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl import SFTTrainer
from trl.models import prepare_deepspeed, prepare_fsdp

from ..distillation.kd import cached_targets, head_tensors, kd_sum, online_targets, target_kind
from ..distillation.teacher_cache import (
    FINGERPRINT_COLUMN,
    KIND_FOR_LOSS,
    SAMPLE_FINGERPRINT_COLUMN,
    SAMPLE_IDS_COLUMN,
    SAMPLE_PACKED_COLUMN,
    TOPK_IDS_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    SamplePacking,
    cache_teacher_samples,
    cache_teacher_topk,
    check_teacher_cache,
    sample_packing,
    unpack_samples,
)
from ..distillation.trainer import MasterWeightsSaving, use_fp32_master_weights
from ..utils.data import TEACHER_PREFIX, is_teacher_value, pad
from ..utils.modeling import (
    backbone,
    causal_lm,
    check_same_vocabulary,
    forward_hidden,
    read_stored_layout,
    vocab_size,
)
from .config import SFTDistillationConfig

logger = logging.getLogger(__name__)

TEACHER_TOPK_COLUMNS = (TOPK_IDS_COLUMN, TOPK_LOGPROBS_COLUMN)
# what each kind of cache holds, in every layout it may have (samples: packed ids, or unpacked as made before packing)
TEACHER_CACHE_LAYOUTS = {"topk": (TEACHER_TOPK_COLUMNS,), "samples": ((SAMPLE_PACKED_COLUMN,), (SAMPLE_IDS_COLUMN,))}
TEACHER_CACHE_COLUMNS = {kind: tuple(c for columns in layouts for c in columns)
                         for kind, layouts in TEACHER_CACHE_LAYOUTS.items()}


# ------------------------------------------------------------------------------------------------- trainer
@dataclass
class _TeacherCacheCollator:
    """Wraps TRL's collator: pads the per-position `teacher_*` columns like `input_ids` (right, or flattened), and
    unpacks packed teacher samples into `teacher_sample_ids` `(B, T, S)` with `sample_packing`."""

    collator: Callable
    padding_free: bool
    sample_packing: SamplePacking | None = None

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
        return unpack_samples(batch, self.sample_packing)


class SFTDistillationTrainer(MasterWeightsSaving, SFTTrainer):
    """
    `trl.SFTTrainer` whose loss mixes cross-entropy with a KD loss (`args.kd_loss`) against an instruct teacher.

    Everything `SFTTrainer` does (chat template, completion-only / assistant-only labels, packing, padding-free,
    PEFT, the MoE load-balancing loss, its loss normalization and metrics) is unchanged, and a fully fine-tuned
    student loaded in bfloat16 / float16 trains float32 master weights and is saved back in its dtype (as
    [`DistillationTrainer`] does); the loss becomes

        loss = ce_mix * CE + (1 - ce_mix) * KD + router_aux_loss_coef * aux

    `SFTTrainer.compute_loss` computes `CE + aux` and its metrics as usual; while it runs, a forward hook on the
    student (inside the accelerate wrapper's forward) takes the backbone's last hidden state and computes the KD sum
    with the chunked loss `kd_loss` names (no `(tokens, vocab)` logits), and [`kd_loss_correction`] then adds
    `(1 - ce_mix) * (KD - CE)`, with KD and CE sums over the tokens whose label is not `-100` scaled like TRL's CE
    term (by the token count, `num_items_in_batch` under gradient accumulation, and the ranks). The teacher (eval
    mode, no grad, prepared like TRL's DPO reference model) runs on the same batch, or what the loss reads is taken
    from the `teacher_sample_ids` or `teacher_topk_*` columns of a cached pass (`args.teacher_cache_dir`).

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
            init_kwargs = args.teacher_model_init_kwargs if args.teacher_model_init_kwargs is not None else \
                args.model_init_kwargs
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, **(init_kwargs or {}))
        if teacher_model is not None and isinstance(model, PreTrainedModel):
            check_same_vocabulary(model, teacher_model)  # before any data preparation
        super().__init__(model, args=args, **kwargs)
        if self.args.deepspeed is None and not hasattr(self.model, "peft_config"):  # full fine-tuning: fp32 masters
            self.save_dtype = use_fp32_master_weights(self.model)  # (LoRA adapters are float32 already)
            read_stored_layout(self.model)  # resume and load_best_model_at_end read save_pretrained's layout
        self.data_collator = _TeacherCacheCollator(self.data_collator, padding_free=bool(args.padding_free))
        if teacher_model is not None:
            check_same_vocabulary(self.accelerator.unwrap_model(self.model), teacher_model)
            teacher_model.eval().requires_grad_(False)
        self.kd_enabled = args.ce_mix < 1.0
        if self.kd_enabled and (args.loss_type != "nll" or self.label_smoother is not None
                                or self.compute_loss_func is not None):
            raise ValueError("SFT distillation (ce_mix < 1) mixes the KD term into TRL's NLL loss: use loss_type='nll'"
                             ", no label smoothing and no compute_loss_func, or ce_mix=1.0 for plain SFT.")
        train = self.train_dataset
        if self.kd_enabled and args.teacher_cache_dir is not None and train is not None:
            self.train_dataset = self._attach_teacher_cache(train, teacher_model, args.teacher_cache_dir)
            if self.eval_dataset is None:
                teacher_model = None  # the cache replaces the teacher (kept only to evaluate online)
        elif self.kd_enabled and self._has_cache(train, args.kd_loss) and (
                FINGERPRINT_COLUMN in train.column_names or SAMPLE_FINGERPRINT_COLUMN in train.column_names):
            self._check_cache(train, teacher_model)
        if isinstance(self.train_dataset, Dataset):  # how the cache (if any) packs its teacher samples
            self.data_collator.sample_packing = sample_packing(self.train_dataset)
        self.teacher_model = None
        if self.kd_enabled and teacher_model is None and not self._has_cache(self.train_dataset, args.kd_loss):
            raise ValueError(
                "SFT distillation (ce_mix < 1) needs a teacher: pass `teacher_model`, set "
                "`teacher_model_name_or_path`, or give a dataset with the teacher cache columns kd_loss="
                f"{args.kd_loss!r} reads (`teacher_sample_*` or `teacher_topk_*`); set `ce_mix=1.0` for plain SFT."
            )
        if self.kd_enabled and teacher_model is not None:
            if self.is_deepspeed_enabled:
                self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
            elif self.is_fsdp_enabled:
                self.teacher_model = prepare_fsdp(teacher_model, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

    # --- data -------------------------------------------------------------------------------------------------
    @staticmethod
    def _has_cache(dataset, kd_loss: str | None = None) -> bool:
        """Whether `dataset` carries the cache columns `kd_loss` reads (any kind's when `kd_loss` is None)."""
        kinds = TEACHER_CACHE_LAYOUTS if kd_loss is None else {k: v for k, v in TEACHER_CACHE_LAYOUTS.items()
                                                               if k == KIND_FOR_LOSS.get(kd_loss)}
        return dataset is not None and any(all(c in (dataset.column_names or []) for c in columns)
                                           for layouts in kinds.values() for columns in layouts)

    def _check_cache(self, dataset: Dataset, teacher: PreTrainedModel | None) -> None:
        args = self.args
        check_teacher_cache(
            dataset, vocab_size=vocab_size(self.accelerator.unwrap_model(self.model)),
            top_k=args.top_k if args.kd_loss != "sampled" else None, kd_loss=args.kd_loss,
            num_samples=args.kd_samples if args.kd_loss == "sampled" else None, temperature=args.temperature,
            teacher=teacher,
        )

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # A dataset that already carries a teacher cache is formatted already (the cache is taken after TRL's
        # preparation): re-tokenizing, truncating or packing it would break its alignment with the cache.
        if self._has_cache(dataset):
            if "labels" not in dataset.column_names:
                raise ValueError(f"The {dataset_name} dataset has teacher cache columns but no `labels` column.")
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        cache_columns = [c for columns in TEACHER_CACHE_COLUMNS.values() for c in columns]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *cache_columns]))

    def _attach_teacher_cache(self, dataset: Dataset, teacher: PreTrainedModel | None, cache_dir: str) -> Dataset:
        """Read (or make once, with the teacher) the cache `kd_loss` reads (teacher samples or top-k) of the formatted
        dataset; returns the dataset with the cache."""
        args = self.args
        if "seq_lengths" in dataset.column_names:
            raise ValueError(
                "`teacher_cache_dir` needs unpacked data (each cached row is one sequence): set `packing=False`, or "
                "drop `teacher_cache_dir` to run the teacher online on the packed batches."
            )
        if args.kd_loss != "sampled" and args.temperature != 1.0:
            raise ValueError(
                "The teacher top-k cache stores log-probabilities at temperature 1, but "
                f"temperature={args.temperature}: drop `teacher_cache_dir` to run the teacher online, or use "
                "temperature 1 (or kd_loss='sampled')."
            )
        if not os.path.isdir(cache_dir):
            if teacher is None:
                raise ValueError(
                    f"No teacher cache in {cache_dir} and no teacher to make one: set `teacher_model_name_or_path`."
                )
            if self.accelerator.is_main_process:
                teacher.to(self.accelerator.device)
                common = {"batch_size": args.per_device_eval_batch_size, "output_dir": cache_dir,
                          "chunk_size": args.kd_chunk_size, "pad_token_id": self.processing_class.pad_token_id or 0}
                if args.kd_loss == "sampled":
                    cache_teacher_samples(teacher, dataset, num_samples=args.kd_samples, temperature=args.temperature,
                                          seed=args.kd_samples_seed, **common)
                else:
                    cache_teacher_topk(teacher, dataset, top_k=args.top_k, **common)
            self.accelerator.wait_for_everyone()
        cached = load_from_disk(cache_dir)
        if len(cached) != len(dataset) or cached["input_ids"] != dataset["input_ids"]:
            raise ValueError(
                f"The teacher cache in {cache_dir} was made for other data than this run's formatted training set "
                "(different rows or tokens); delete it or point `teacher_cache_dir` elsewhere."
            )
        self._check_cache(cached, teacher)
        logger.info("Distilling from the teacher cache in %s", cache_dir)
        keep = TEACHER_CACHE_COLUMNS[KIND_FOR_LOSS[args.kd_loss]]
        return cached.remove_columns([c for c in cached.column_names if c not in dataset.column_names
                                      and c not in keep])

    # --- loss -------------------------------------------------------------------------------------------------
    def _teacher_targets(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """What `kd_loss` reads from the teacher for the batch, `(B, T, *)` (see `distillation.kd`): the cached columns
        (popped from `inputs` with every other `teacher_*` column) or the online teacher's."""
        cached = {name: inputs.pop(name) for name in [n for n in inputs if n.startswith(TEACHER_PREFIX)]}
        kind = target_kind(self.args.kd_loss)
        targets = cached_targets(cached, {kind}, self.args)
        if targets:
            return targets
        if self.teacher_model is None:
            raise ValueError(
                f"This batch has no cached teacher columns for kd_loss={self.args.kd_loss!r} and the trainer has no "
                "teacher: give the evaluation data the same cache, or pass a teacher model."
            )
        teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "output_router_logits")}
        unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():  # `logits_to_keep=1`: the teacher's full logits are never built
            _, hidden = forward_hidden(self.teacher_model, backbone(unwrapped), **teacher_inputs, use_cache=False,
                                       logits_to_keep=1)
        return online_targets(unwrapped, hidden, {kind}, self.args, inputs["input_ids"], inputs.get("attention_mask"),
                              epoch=int(self.state.epoch or 0))

    def _kd_sum(self, student: torch.nn.Module, hidden: torch.Tensor, targets: dict[str, Any],
                mask: torch.Tensor) -> torch.Tensor:
        """Sum of the `kd_loss` objective over the positions of `mask` (`(B, T-1)`: the next-token label is not
        -100), from the student's last hidden state `(B, T, H)`; position t predicts token t + 1."""
        with head_tensors(causal_lm(student)) as (weight, bias):  # the one policy for sharded heads
            return kd_sum(hidden[:, :-1].to(weight.device), weight, bias, targets, mask, self.args)

    @contextmanager
    def _kd_hook(self, model: torch.nn.Module, targets: Any):
        """While `SFTTrainer.compute_loss` runs: forward hooks on the student that keep its first fused forward's
        outputs and the KD sum computed from its backbone's last hidden state (inside the wrapper's forward, so
        DDP / FSDP see the KD term as part of the forward). Yields the dict they fill (`outputs`, `kd_sum`)."""
        student = self.accelerator.unwrap_model(model)
        found: dict[str, Any] = {}

        def keep_hidden(module, args, output):
            found.setdefault("hidden", output[0])

        def add_kd(module, args, kwargs, output):
            if kwargs.get("fused_lm_head") and "kd_sum" not in found:
                found["outputs"] = output
                found["kd_sum"] = self._kd_sum(student, found.pop("hidden"), targets, output.label_mask)

        handles = [backbone(student).register_forward_hook(keep_hidden),
                   student.register_forward_hook(add_kd, with_kwargs=True)]
        try:
            yield found
        finally:
            for handle in handles:
                handle.remove()

    def kd_loss_correction(self, kd_sum: torch.Tensor, outputs: Any, num_items_in_batch=None) -> torch.Tensor:
        """`(1 - ce_mix) * (KD - CE)`, with the sums scaled as `SFTTrainer.compute_loss` scales its CE term: added to
        its `CE + aux`, it gives `ce_mix * CE + (1 - ce_mix) * KD + aux`. Logs the per-token `kd_loss` / `ce_loss`."""
        ce_sum = -outputs.log_probs.sum()
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        scale = 1.0 / torch.as_tensor(num_tokens, device=kd_sum.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = scale * (self.accelerator.num_processes // self.get_tp_size())
        mode = "train" if self.model.training else "eval"
        num_valid = self.accelerator.gather_for_metrics(outputs.label_mask.sum()).sum()
        for name, value in (("kd_loss", kd_sum), ("ce_loss", ce_sum)):  # per-token means over this micro-batch
            total = self.accelerator.gather_for_metrics(value.detach()).sum()
            self._metrics[mode][name].append((total / num_valid).item() if num_valid > 0 else 0.0)
        return (1.0 - self.args.ce_mix) * (kd_sum - ce_sum) * scale

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.kd_enabled:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "shift_labels" in inputs:
            raise ValueError(
                "SFTDistillationTrainer does not support context or sequence parallelism (pre-shifted labels): the KD "
                "term aligns teacher and student positions within each sequence."
            )
        targets = self._teacher_targets(inputs)
        with self._kd_hook(model, targets) as found:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + self.kd_loss_correction(found["kd_sum"], found["outputs"], num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


__all__ = ["SFTDistillationTrainer"]
