"""`DistillationTrainer`: train a (pruned) MoE student on KD from its teacher plus the MoE load-balancing loss."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import transformers
from datasets import Dataset
from packaging.version import Version
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer
from trl.models.utils import _ForwardRedirection

from ..architectures import get_architecture
from ..utils.data import TokenCollator, pad
from ..utils.distributed import call_through_forward, is_sharded, shard_decoder_layers, use_fsdp_on_cpu_ranks
from ..utils.modeling import (
    backbone,
    check_same_vocabulary,
    read_stored_layout,
    vocab_size,
)
from .config import DistillationConfig
from .kd import cached_targets, head_tensors, kd_sum, online_targets, target_kind
from .losses import chunked_cross_entropy, chunked_student_topk_stats, full_kl_loss, topk_kl_loss, topk_tail_kl
from .teacher_cache import (
    KIND_FOR_LOSS,
    SAMPLE_PACKED_COLUMN,
    SamplePacking,
    cache_kinds,
    check_teacher_cache,
    sample_packing,
    unpack_samples,
)

logger = logging.getLogger(__name__)
_KIND_LABEL = {"topk": "top-k", "samples": "samples"}


@dataclass
class DistillationCollator(TokenCollator):
    """
    The default collator of `DistillationTrainer`: right-pads `input_ids` (+ optional `attention_mask`, row `labels`,
    teacher columns) and returns `input_ids`, `attention_mask` and `labels` `(B, T)` (the rows' own `labels` when they
    have them, -100 marks tokens that are not distilled; else `input_ids` with padding at -100) and every teacher
    column `(B, T, k)` (`teacher_topk_ids` / `teacher_topk_logprobs`, `teacher_sample_ids`). KD, CE and the evaluation
    metrics count position `t` when `labels[t + 1] != -100`.

    Packed teacher samples (`teacher_sample_packed`, see `cache_teacher_samples`) are padded as bytes and unpacked
    here into `teacher_sample_ids` `(B, T, S)`, vectorized over the batch, with `sample_packing` (what the cache's
    record says, `sample_packing(dataset)`; the trainer passes its training set's). A samples cache made before ids
    were packed arrives as `teacher_sample_ids` and is padded as it is.
    """

    sample_packing: SamplePacking | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        packed = None
        if features and SAMPLE_PACKED_COLUMN in features[0]:  # bytes stay uint8 until unpacked
            features = [dict(f) for f in features]
            packed = [torch.as_tensor(f.pop(SAMPLE_PACKED_COLUMN), dtype=torch.uint8) for f in features]
        batch = super().__call__(features)
        if packed is not None:
            batch[SAMPLE_PACKED_COLUMN] = pad(packed, 0, length=batch["input_ids"].size(1))  # (B, T, width)
        return unpack_samples(batch, self.sample_packing)


def use_fp32_master_weights(model: torch.nn.Module) -> torch.dtype | None:
    """
    Cast a student loaded in bfloat16 / float16 to float32 in place, so the optimizer updates float32 master weights
    (an update below bfloat16's resolution is not rounded away); the forward still runs in bfloat16 / float16 under
    the Trainer's autocast when `bf16` / `fp16` is set. Returns the dtype the model was loaded in (what its saved
    checkpoints should hold), or `None` when it was already float32.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = sorted((d for d in dtypes if d != torch.float32), key=str)
    if not low:
        return None
    model.float()
    logger.info("Training the student with float32 master weights (loaded in %s; saved in %s).", low[0], low[0])
    return low[0]


class MasterWeightsSaving:
    """
    Trainer mixin for a student trained with float32 master weights ([`use_fp32_master_weights`]): checkpoints for
    resuming (`_internal_call`) keep float32; a final `save_model` writes the student in `self.save_dtype`, the dtype
    it was loaded in (`None`: as it is).
    """

    save_dtype: torch.dtype | None = None
    _saving_dtype: torch.dtype | None = None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._saving_dtype = None if _internal_call else self.save_dtype
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._saving_dtype = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        dtype = self._saving_dtype
        if dtype is None:
            return super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        state_dict = model.state_dict() if state_dict is None else state_dict
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # config.json names the dtype of the saved weights, not the training one
            trained = model.config.dtype
            model.config.dtype = dtype
            model.config.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)
            model.config.dtype = trained


def _shifted(schedule, start: int, step: int) -> float:
    return schedule(start + step)


class DistillationTrainer(MasterWeightsSaving, Trainer):
    """
    Trainer for SlimMoE distillation: the student learns `KD + aux_loss_coef * aux (+ ce_weight * CE)`.

    KD is the objective `args.kd_loss` names ([`sampled_kd_loss`], [`topk_tail_kl_loss`], [`topk_kl_loss`] or
    [`full_kl_loss`]) between the teacher's next-token distribution and the student's, computed from the student's
    last hidden states in chunks; aux is the MoE load-balancing loss on the student's router logits. The teacher
    either runs online (eval mode, no gradients) or is absent, in which case every batch must carry the teacher cache
    the loss reads (samples from [`cache_teacher_samples`], or top-k from [`cache_teacher_topk`]). Inputs are
    validated before any training compute: matching vocabularies, `top_k` within the vocabulary, and a cache that
    matches its dataset, the loss, k / S, temperature and (when given) the teacher.

    The student's backbone and loss run inside the DDP/FSDP wrapper's forward (through `_ForwardRedirection`), so
    `torchrun` / `accelerate launch` work unchanged. Under FSDP (`args.fsdp` with `fsdp_version: 2`, or an `accelerate
    launch` FSDP config) the student is sharded by accelerate and the online teacher one unit per decoder layer, on
    CPU ranks too (where accelerate alone would use DDP). A student loaded in bfloat16 / float16 trains float32 master
    weights (with the `bf16` / `fp16` autocast of the arguments) and is saved back in its dtype by `save_model`;
    resumable checkpoints keep float32. With gradient accumulation, the KD (and CE) loss of each
    micro-batch is a sum over its counted tokens divided by the count over the whole global batch
    (`num_items_in_batch`), so accumulation gives the loss and gradients of the equivalent big batch; the aux loss,
    which is not additive over tokens, is averaged over micro-batches.

    `evaluate()` reads the teacher's top-k (from the evaluation data's top-k cache, or online) and adds `eval_kl`
    (mean per-token KL to the teacher over its top-k tokens plus one "rest of the vocabulary" outcome, see
    [`topk_tail_kl`]: a true divergence, >= 0; also the `eval_loss`, plus the aux term), `eval_topk_kl` (the top-k
    loss of Eq. 3, which goes negative once the student is more confident on the top-k than the teacher),
    `eval_top1_agreement` (student argmax equals the teacher's top-1), `eval_perplexity` (exp of the student's
    next-token cross-entropy) and, with a teacher model and `args.eval_full_kl`, `eval_full_kl` (full-vocabulary KL).

    Args:
        model (`str` or `PreTrainedModel`): the student, or its path.
        teacher_model (`str` or `PreTrainedModel`, *optional*): the teacher, or its path; defaults to
            `args.teacher_model_name_or_path`; may be `None` when the datasets carry the teacher caches.
        args ([`DistillationConfig`], *optional*): training configuration.
        train_dataset, eval_dataset (`datasets.Dataset`): rows with `input_ids` (+ optional `attention_mask`, + the
            cache columns when there is no teacher).
        data_collator (*optional*): defaults to [`DistillationCollator`] with the tokenizer's pad id.
        **kwargs: forwarded to [`~transformers.Trainer`] (`processing_class`, `callbacks`, ...).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by num_items_in_batch: Trainer must not divide again
    _tag_names = ["hf_slimmoe", "slimmoe", "distillation"]  # on the model's card and pushes

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: str | PreTrainedModel | None = None,
        args: DistillationConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        data_collator=None,
        **kwargs,
    ):
        if args is None:
            args = DistillationConfig(output_dir="distillation_output")
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        if teacher_model is None and args.teacher_model_name_or_path is not None:
            teacher_model = args.teacher_model_name_or_path
        if isinstance(teacher_model, str):
            init_kwargs = {"dtype": model.dtype, **(args.teacher_model_init_kwargs or {})}
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, **init_kwargs)
        self._validate(model, teacher_model, args, train_dataset, eval_dataset)
        self.sample_packing = self._sample_packing(train_dataset, eval_dataset)
        # float32 master weights for a student that trains (DeepSpeed keeps its own; an evaluation-only trainer, e.g.
        # of the teacher itself, leaves the model as it is); `save_model` writes the dtype the student came in
        trains = train_dataset is not None and model is not teacher_model and not args.deepspeed
        self.save_dtype = use_fp32_master_weights(model) if trains else None
        read_stored_layout(model)  # resume and load_best_model_at_end read the layout save_pretrained writes

        if data_collator is None:
            processing_class = kwargs.get("processing_class")
            pad_token_id = getattr(processing_class, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(model.config, "pad_token_id", None) or 0
            data_collator = DistillationCollator(pad_token_id=pad_token_id, sample_packing=self.sample_packing)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, **kwargs,
        )
        if Version(transformers.__version__) < Version("5.19.0"):  # before Trainer.loss_is_scaled_for_ga (as TRL)
            self.model_accepts_loss_kwargs = True
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self._forward_redirection = _ForwardRedirection()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._eval_sums: torch.Tensor | None = None
        self._sharded_param_groups: list[list[torch.nn.Parameter]] | None = None  # see `create_optimizer`

        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            teacher_model.eval()
            if self.is_fsdp_enabled:  # one unit per decoder layer, as the student (accelerate's evaluation-mode
                # prepare would leave a whole teacher on every rank); one loaded into shards already stays as it is
                sharded = is_sharded(teacher_model)
                self.teacher_model = teacher_model if sharded else shard_decoder_layers(teacher_model)
            elif self.is_deepspeed_enabled:
                self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            else:
                self.teacher_model = teacher_model.to(self.args.device)

    def create_accelerator_and_postprocess(self) -> None:
        """The parent's, then FSDP2 on CPU ranks too when `args.fsdp` or an `accelerate launch` FSDP config asks for
        it (accelerate alone trains with DDP there, see [`use_fsdp_on_cpu_ranks`])."""
        super().create_accelerator_and_postprocess()
        if use_fsdp_on_cpu_ranks(self.accelerator, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True

    @staticmethod
    def _validate(model, teacher_model, args, train_dataset, eval_dataset) -> None:
        if args.aux_loss_coef > 0:  # the load-balancing loss needs a supported MoE family (any model without it)
            arch = get_architecture(model.config)
            if arch.aux_loss is None:
                logger.warning("aux_loss_coef=%g is ignored: %s models train without a load-balancing loss.",
                               args.aux_loss_coef, arch.model_type)
        student_vocab = vocab_size(model)
        if args.top_k > student_vocab:
            raise ValueError(f"top_k={args.top_k} is larger than the student's vocabulary ({student_vocab}).")
        if teacher_model is not None:
            check_same_vocabulary(model, teacher_model)
        if args.kd_loss == "full" and teacher_model is None:
            raise ValueError(
                "kd_loss='full' computes the full-vocabulary KL from the teacher's logits, so it needs the teacher "
                "online (`teacher_model` or `teacher_model_name_or_path`); from a cache use kd_loss='sampled' "
                "(cache_teacher_samples) or 'topk_tail' / 'topk' (cache_teacher_topk)."
            )
        datasets = {"train_dataset": (train_dataset, args.kd_loss)}
        evals = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
        for key, dataset in evals.items():  # evaluation reads the teacher's top-k (eval_kl)
            datasets["eval_dataset" if key is None else f"eval_dataset[{key!r}]"] = (dataset, "topk_tail")
        for name, (dataset, kd_loss) in datasets.items():
            if not isinstance(dataset, Dataset):
                continue
            if "input_ids" not in dataset.column_names:
                raise ValueError(f"{name} has no 'input_ids' column (columns: {dataset.column_names}).")
            if kd_loss != "full":
                DistillationTrainer._validate_cache(name, dataset, kd_loss, teacher_model, args, student_vocab)

    @staticmethod
    def _sample_packing(train_dataset, eval_dataset) -> SamplePacking | None:
        """The packing of the datasets' teacher samples (`None`: unpacked or none); one packing for all of them, as
        one collator unpacks every batch."""
        datasets = [train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset])]
        packings = {sample_packing(d) for d in datasets if isinstance(d, Dataset)} - {None}
        if len(packings) > 1:
            raise ValueError("The datasets carry teacher samples packed in different ways "
                             f"({sorted(map(str, packings))}); one collator unpacks every batch: drop the samples "
                             "columns of the evaluation data.")
        return next(iter(packings), None)

    @staticmethod
    def _validate_cache(name, dataset, kd_loss, teacher_model, args, vocab_size) -> None:
        """The cache `kd_loss` reads must be there and match, unless the teacher runs online for it."""
        kind, present = KIND_FOR_LOSS[kd_loss], cache_kinds(dataset)
        if kind not in present and teacher_model is not None:
            if present:
                logger.info("%s carries a %s cache that kd_loss=%r does not read; the teacher runs online.", name,
                            " and ".join(present), kd_loss)
            return
        try:
            check_teacher_cache(dataset, vocab_size=vocab_size, top_k=args.top_k if kind == "topk" else None,
                                kd_loss=kd_loss, num_samples=args.kd_samples if kind == "samples" else None,
                                temperature=args.temperature, teacher=teacher_model)
        except ValueError as error:
            if teacher_model is None and not present:
                raise ValueError(
                    f"{name} carries no teacher {_KIND_LABEL[kind]} cache (read by kd_loss={kd_loss!r}) and no "
                    "teacher model was given: pass `teacher_model` (or `teacher_model_name_or_path`), or cache the "
                    f"teacher first with `cache_teacher_{'topk' if kind == 'topk' else 'samples'}` / "
                    "`slimmoe cache-teacher`."
                ) from error
            raise ValueError(f"{name}: {error}") from error

    # ------------------------------------------------------------------------------------------------ the loss
    def _teacher_targets(self, inputs: dict[str, torch.Tensor], evaluation: bool = False) -> dict[str, Any]:
        """
        What the loss (or, with `evaluation`, the metrics) reads from the teacher, from the batch's cache or online:
        `"topk"`: ids and log-probabilities `(B, T, k)`; `"samples"`: ids `(B, T, S)`; `"full"`: the teacher's
        hidden states `(B, T, H_t)` with its `lm_head` weight and bias.
        """
        args = self.args
        unpack_samples(inputs, self.sample_packing)  # done by DistillationCollator already, unless another collates
        needed = {"topk"} if evaluation else {target_kind(args.kd_loss)}
        if evaluation and args.eval_full_kl and self.teacher_model is not None:
            needed.add("full")
        targets = cached_targets(inputs, needed, args)
        missing = needed - set(targets)
        if not missing:
            return targets
        if self.teacher_model is None:
            raise ValueError(f"The batch carries no teacher {', '.join(sorted(missing))} cache and the trainer has no "
                             "teacher model.")
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        teacher.eval()
        # an FSDP2-sharded teacher gathers its root (embeddings, LM head) inside its own forward
        targets.update(call_through_forward(teacher, self._online_targets, teacher, inputs, missing))
        return targets

    @torch.no_grad()
    def _online_targets(self, teacher, inputs: dict[str, torch.Tensor], missing: set[str]) -> dict[str, Any]:
        """The `missing` teacher targets (see `kd.online_targets`) from one forward of the teacher's backbone."""
        hidden = backbone(teacher)(input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"]).last_hidden_state  # (B, T, H_t)
        return online_targets(teacher, hidden, missing, self.args, inputs["input_ids"], inputs["attention_mask"],
                              epoch=int(self.state.epoch or 0))

    def create_optimizer(self, model=None):
        """
        The parent's optimizer. For a student that is FSDP2-sharded already (evaluated before training, or loaded into
        shards), its parameter lists are kept to be put back by `create_scheduler`, which the Trainer calls right
        after `accelerator.prepare(model, optimizer)`: that prepare re-points the optimizer at "the sharded parameters"
        by their local data pointers, and every empty shard (a parameter with fewer rows than there are ranks, e.g.
        Qwen3-Next's `shared_expert_gate` `(1, H)`) has pointer 0, so they collide and the optimizer ends up holding
        one of them several times and not the others (its full state dict then gathers mismatched tensors). The
        parameters of a sharded student are the right ones already.
        """
        optimizer = super().create_optimizer(model)
        sharded = is_sharded(self.model)
        self._sharded_param_groups = [list(g["params"]) for g in optimizer.param_groups] if sharded else None
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With `args.lr_schedule_steps`, this run's step `t` takes the learning rate of step `lr_schedule_start + t`
        of one schedule over `lr_schedule_steps` steps; otherwise the parent's schedule over this run's steps. (First,
        a sharded student's parameters go back into the optimizer, see `create_optimizer`.)"""
        if self._sharded_param_groups is not None:
            for group, params in zip(self.optimizer.param_groups, self._sharded_param_groups):
                group["params"] = params
            self._sharded_param_groups = None
        if self.args.lr_schedule_steps is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        whole = super().create_scheduler(self.args.lr_schedule_steps, optimizer)  # a LambdaLR (see the config)
        start = self.args.lr_schedule_start
        self.lr_scheduler = LambdaLR(whole.optimizer, [partial(_shifted, f, start) for f in whole.lr_lambdas])
        return self.lr_scheduler

    def _eval_stats(self, hidden, weight, bias, targets: dict[str, Any], mask) -> dict[str, torch.Tensor]:
        """Sums over counted tokens of the evaluation metrics (see the class docstring)."""
        args = self.args
        ids, logprobs = targets["topk"]
        flat_mask = mask.reshape(-1)
        k = ids.size(-1)
        flat_ids = ids[:, :-1].reshape(-1, k)[flat_mask].to(weight.device)  # (N, k)
        teacher_lp = logprobs[:, :-1].reshape(-1, k)[flat_mask].to(weight.device)  # (N, k)
        student_top1, student_lp = chunked_student_topk_stats(
            hidden.reshape(-1, hidden.size(-1))[flat_mask], weight, bias, flat_ids, args.temperature,
            args.kd_chunk_size, args.kd_chunk_bytes,
        )
        stats = {
            "agree": (student_top1 == flat_ids[:, 0]).sum(),
            "kl_sum": topk_tail_kl(teacher_lp, student_lp).sum(),
            "topk_sum": topk_kl_loss(hidden, weight, bias, ids[:, :-1], logprobs[:, :-1], mask,
                                     temperature=args.temperature, renormalize=args.renormalize,
                                     chunk_size=args.kd_chunk_size, reduction="sum",
                                     chunk_bytes=args.kd_chunk_bytes),
        }
        if "full" in targets:
            teacher_hidden, teacher_weight, teacher_bias = targets["full"]
            stats["full_kl_sum"] = full_kl_loss(hidden, weight, bias, teacher_hidden[:, :-1], teacher_weight,
                                                teacher_bias, mask, temperature=args.temperature,
                                                chunk_size=args.kd_chunk_size, reduction="sum",
                                                chunk_bytes=args.kd_chunk_bytes)
        return stats

    def _student_losses(
        self, student: PreTrainedModel, inputs: dict[str, torch.Tensor], targets: dict[str, Any],
        evaluation: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Student backbone + chunked losses; runs inside the wrapper's forward. Returns raw sums over tokens."""
        args = self.args
        arch = get_architecture(student.config) if args.aux_loss_coef > 0 else None
        aux_loss = arch and arch.aux_loss_function()  # the family's own load-balancing loss (None: trained without)
        want_aux = aux_loss is not None
        outputs = backbone(student)(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_router_logits=want_aux
        )
        hidden = outputs.last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts token t+1
        labels = inputs["labels"][:, 1:]  # (B, T-1)
        mask = labels != -100
        with head_tensors(student) as (weight, bias):  # the one policy for sharded heads (see `kd.head_tensors`)
            hidden = hidden.to(weight.device)
            zero = torch.zeros((), device=weight.device)
            result = {"num_tokens": mask.sum(), "aux": zero, "ce_sum": zero}
            if want_aux:
                result["aux"] = aux_loss(
                    outputs.router_logits, arch.num_experts_of(student.config), arch.top_k_of(student.config),
                    inputs["attention_mask"],
                )
            if args.ce_weight > 0 or evaluation:
                result["ce_sum"] = chunked_cross_entropy(
                    hidden, weight, bias, labels, chunk_size=args.kd_chunk_size, reduction="sum",
                    chunk_bytes=args.kd_chunk_bytes,
                )
            if evaluation:
                result.update(self._eval_stats(hidden, weight, bias, targets, mask))
            else:
                result["kd_sum"] = kd_sum(hidden, weight, bias, targets, mask, args)
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        targets = self._teacher_targets(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward, so DDP prepares gradient sync and FSDP gathers the student's shards; the
        # redirection bypasses the autocast accelerate patches into the model's forward, so it is entered here.
        with self.accelerator.autocast():
            parts = self._forward_redirection(model, unwrapped, self._student_losses, unwrapped, inputs, targets)
        local_tokens = parts["num_tokens"].clamp(min=1)
        if model.training and num_items_in_batch is not None:
            # Sum / tokens of the global batch; times the ranks, since DDP averages gradients over them.
            ranks = args.world_size if args.average_tokens_across_devices and args.world_size > 1 else 1
            denominator = num_items_in_batch.to(parts["kd_sum"].device) / ranks
            kd = parts["kd_sum"] / denominator
            ce = parts["ce_sum"] / denominator
            aux = parts["aux"] / self.current_gradient_accumulation_steps
        else:
            kd, ce, aux = parts["kd_sum"] / local_tokens, parts["ce_sum"] / local_tokens, parts["aux"]
        loss = kd + args.ce_weight * ce + args.aux_loss_coef * aux

        mode = "train" if model.training else "eval"
        self._metrics[mode]["kd_loss"].append((parts["kd_sum"] / local_tokens).item())
        if args.aux_loss_coef > 0:
            self._metrics[mode]["aux_loss"].append(parts["aux"].item())
        if args.ce_weight > 0:
            self._metrics[mode]["ce_loss"].append((parts["ce_sum"] / local_tokens).item())
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------------------------------ evaluation
    _EVAL_SUMS = ("topk_sum", "num_tokens", "agree", "ce_sum", "kl_sum", "full_kl_sum", "full_tokens")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            targets = self._teacher_targets(inputs, evaluation=True)
            unwrapped = self.accelerator.unwrap_model(model)
            with self.accelerator.autocast():
                parts = self._forward_redirection(model, unwrapped, self._student_losses, unwrapped, inputs, targets,
                                                  True)
        parts["full_tokens"] = parts["num_tokens"] if "full_kl_sum" in parts else torch.zeros_like(
            parts["num_tokens"])
        parts.setdefault("full_kl_sum", torch.zeros_like(parts["kl_sum"]))
        sums = torch.stack([parts[name].to(parts["kl_sum"].device) for name in self._EVAL_SUMS]).double()
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums.to(self._eval_sums.device)
        tokens = parts["num_tokens"].clamp(min=1)
        loss = parts["kl_sum"] / tokens + self.args.aux_loss_coef * parts["aux"]
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        sums = self._eval_sums if self._eval_sums is not None else torch.zeros(
            len(self._EVAL_SUMS), dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum")
        topk_sum, tokens, agree, ce_sum, kl_sum, full_kl_sum, full_tokens = sums.tolist()
        tokens = max(tokens, 1.0)
        output.metrics[f"{metric_key_prefix}_kl"] = kl_sum / tokens
        output.metrics[f"{metric_key_prefix}_topk_kl"] = topk_sum / tokens
        output.metrics[f"{metric_key_prefix}_top1_agreement"] = agree / tokens
        output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(ce_sum / tokens, 50.0))
        if full_tokens > 0:
            output.metrics[f"{metric_key_prefix}_full_kl"] = full_kl_sum / full_tokens
        self._metrics["eval"].clear()
        self._eval_sums = None
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the separate loss terms averaged since the last log
            for key, values in self._metrics["train"].items():
                if values:
                    logs[key] = sum(values) / len(values)
            self._metrics["train"].clear()
        super().log(logs, start_time)


__all__ = ["DistillationCollator", "DistillationTrainer", "MasterWeightsSaving", "use_fp32_master_weights"]
