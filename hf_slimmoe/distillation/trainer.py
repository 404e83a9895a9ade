"""`DistillationTrainer`: train a (pruned) MoE student on top-k KD from its teacher plus the MoE load-balancing loss."""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer
from transformers.models.phimoe.modeling_phimoe import load_balancing_loss_func
from trl.models.utils import _ForwardRedirection

from ..data import TokenCollator
from ..modeling_utils import backbone, check_same_vocabulary, teacher_topk_from_model, vocab_size
from .config import DistillationConfig
from .losses import chunked_cross_entropy, chunked_student_topk_stats, topk_kl_loss, topk_tail_kl
from .teacher_cache import (
    CACHE_COLUMNS,
    TOPK_IDS_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    check_teacher_cache,
)

logger = logging.getLogger(__name__)


# The default collator of `DistillationTrainer`: right-pads `input_ids` (+ optional `attention_mask`, row `labels`,
# teacher columns) and returns `input_ids`, `attention_mask` and `labels` `(B, T)` (the rows' own `labels` when they
# have them, -100 marks tokens that are not distilled; else `input_ids` with padding at -100) and every teacher column
# `(B, T, k)`. KD, CE and the evaluation metrics count position `t` when `labels[t + 1] != -100`.
DistillationCollator = TokenCollator


class DistillationTrainer(Trainer):
    """
    Trainer for SlimMoE distillation: the student learns `KD + aux_loss_coef * aux (+ ce_weight * CE)`.

    KD is [`topk_kl_loss`] between the teacher's top-k next-token distribution and the student's, computed from the
    student's last hidden states in chunks; aux is the MoE load-balancing loss on the student's router logits. The
    teacher either runs online (eval mode, no gradients) or is absent, in which case every batch must carry a
    teacher top-k cache built by [`cache_teacher_topk`]. Inputs are validated before any training compute: matching
    vocabularies, `top_k` within the vocabulary, and a cache that matches its dataset.

    The student's backbone and loss run inside the DDP/FSDP wrapper's forward (through `_ForwardRedirection`), so
    `torchrun` / `accelerate launch` work unchanged. With gradient accumulation, the KD (and CE) loss of each
    micro-batch is a sum over its counted tokens divided by the count over the whole global batch
    (`num_items_in_batch`), so accumulation gives the loss and gradients of the equivalent big batch; the aux loss,
    which is not additive over tokens, is averaged over micro-batches.

    `evaluate()` adds `eval_kl` (mean per-token KL to the teacher over its top-k tokens plus one "rest of the
    vocabulary" outcome, see [`topk_tail_kl`]: a true divergence, >= 0), `eval_topk_kl` (the top-k training loss
    itself, Eq. 3, which goes negative once the student is more confident on the top-k than the teacher),
    `eval_top1_agreement` (student argmax equals the teacher's top-1) and `eval_perplexity` (exp of the student's
    next-token cross-entropy).

    Args:
        model (`str` or `PreTrainedModel`): the student, or its path.
        teacher_model (`str` or `PreTrainedModel`, *optional*): the teacher, or its path; defaults to
            `args.teacher_model_name_or_path`; may be `None` when the datasets carry a teacher cache.
        args ([`DistillationConfig`], *optional*): training configuration.
        train_dataset, eval_dataset (`datasets.Dataset`): rows with `input_ids` (+ optional `attention_mask`, + the
            cache columns when there is no teacher).
        data_collator (*optional*): defaults to [`DistillationCollator`] with the tokenizer's pad id.
        **kwargs: forwarded to [`~transformers.Trainer`] (`processing_class`, `callbacks`, ...).
    """

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
            model = AutoModelForCausalLM.from_pretrained(model)
        if teacher_model is None and args.teacher_model_name_or_path is not None:
            teacher_model = args.teacher_model_name_or_path
        if isinstance(teacher_model, str):
            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=model.dtype)
        self._validate(model, teacher_model, args, train_dataset, eval_dataset)

        if data_collator is None:
            processing_class = kwargs.get("processing_class")
            pad_token_id = getattr(processing_class, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(model.config, "pad_token_id", None) or 0
            data_collator = DistillationCollator(pad_token_id=pad_token_id)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, **kwargs,
        )
        # compute_loss normalizes by `num_items_in_batch` itself: Trainer must not divide again by the GA steps.
        self.model_accepts_loss_kwargs = True
        self._forward_redirection = _ForwardRedirection()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._eval_sums: torch.Tensor | None = None

        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            teacher_model.eval()
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            else:
                self.teacher_model = teacher_model.to(self.args.device)

    @staticmethod
    def _validate(model, teacher_model, args, train_dataset, eval_dataset) -> None:
        student_vocab = vocab_size(model)
        if args.top_k > student_vocab:
            raise ValueError(f"top_k={args.top_k} is larger than the student's vocabulary ({student_vocab}).")
        if teacher_model is not None:
            check_same_vocabulary(model, teacher_model)
        datasets = {"train_dataset": train_dataset}
        if isinstance(eval_dataset, dict):
            datasets.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
        else:
            datasets["eval_dataset"] = eval_dataset
        for name, dataset in datasets.items():
            if not isinstance(dataset, Dataset):
                continue
            if "input_ids" not in dataset.column_names:
                raise ValueError(f"{name} has no 'input_ids' column (columns: {dataset.column_names}).")
            has_cache = any(c in dataset.column_names for c in CACHE_COLUMNS)
            if has_cache or teacher_model is None:
                try:
                    check_teacher_cache(dataset, vocab_size=student_vocab, top_k=args.top_k)
                except ValueError as error:
                    if teacher_model is None and not has_cache:
                        raise ValueError(
                            f"{name} carries no teacher top-k cache and no teacher model was given: pass "
                            "`teacher_model` (or `teacher_model_name_or_path`), or cache the teacher first with "
                            "`cache_teacher_topk` / `slimmoe cache-teacher`."
                        ) from error
                    raise ValueError(f"{name}: {error}") from error
                if args.temperature != 1.0:
                    raise ValueError(
                        f"{name} carries a teacher cache, whose log-probabilities are at temperature 1, but "
                        f"temperature={args.temperature}; use temperature=1.0 or an online teacher."
                    )

    # ------------------------------------------------------------------------------------------------ the loss
    def _teacher_targets(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-k ids `(B, T, k)` and log-probabilities `(B, T, k)`, from the batch's cache or online."""
        top_k = self.args.top_k
        if TOPK_IDS_COLUMN in inputs:
            return inputs[TOPK_IDS_COLUMN][..., :top_k], inputs[TOPK_LOGPROBS_COLUMN][..., :top_k]
        if self.teacher_model is None:
            raise ValueError("The batch carries no teacher cache and the trainer has no teacher model.")
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        teacher.eval()
        return teacher_topk_from_model(
            teacher, inputs["input_ids"], inputs["attention_mask"], top_k, self.args.temperature,
            self.args.kd_chunk_size,
        )

    def _student_losses(
        self, student: PreTrainedModel, inputs: dict[str, torch.Tensor], teacher_ids, teacher_logprobs,
        eval_stats: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Student backbone + chunked losses; runs inside the wrapper's forward. Returns raw sums over tokens."""
        args = self.args
        want_aux = args.aux_loss_coef > 0
        outputs = backbone(student)(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_router_logits=want_aux
        )
        hidden = outputs.last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts token t+1
        labels = inputs["labels"][:, 1:]  # (B, T-1)
        mask = labels != -100
        lm_head = student.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        hidden = hidden.to(weight.device)
        result = {
            "kd_sum": topk_kl_loss(
                hidden, weight, bias, teacher_ids[:, :-1], teacher_logprobs[:, :-1], mask,
                temperature=args.temperature, renormalize=args.renormalize, chunk_size=args.kd_chunk_size,
                reduction="sum",
            ),
            "num_tokens": mask.sum(),
        }
        zero = torch.zeros((), device=weight.device)
        if want_aux:
            result["aux"] = load_balancing_loss_func(
                outputs.router_logits, student.config.num_local_experts, student.config.num_experts_per_tok,
                inputs["attention_mask"],
            )
        else:
            result["aux"] = zero
        if args.ce_weight > 0 or eval_stats:
            result["ce_sum"] = chunked_cross_entropy(
                hidden, weight, bias, labels, chunk_size=args.kd_chunk_size, reduction="sum"
            )
        else:
            result["ce_sum"] = zero
        if eval_stats:
            flat_mask = mask.reshape(-1)
            k = teacher_ids.size(-1)
            ids = teacher_ids[:, :-1].reshape(-1, k)[flat_mask].to(weight.device)  # (N, k)
            teacher_lp = teacher_logprobs[:, :-1].reshape(-1, k)[flat_mask].to(weight.device)  # (N, k)
            student_top1, student_lp = chunked_student_topk_stats(
                hidden.reshape(-1, hidden.size(-1))[flat_mask], weight, bias, ids, args.temperature,
                args.kd_chunk_size,
            )
            result["agree"] = (student_top1 == ids[:, 0]).sum()
            result["kl_sum"] = topk_tail_kl(teacher_lp, student_lp).sum()
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        teacher_ids, teacher_logprobs = self._teacher_targets(inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward, so DDP prepares gradient sync and FSDP gathers the student's shards.
        parts = self._forward_redirection(
            model, unwrapped, self._student_losses, unwrapped, inputs, teacher_ids, teacher_logprobs
        )
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
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            teacher_ids, teacher_logprobs = self._teacher_targets(inputs)
            unwrapped = self.accelerator.unwrap_model(model)
            parts = self._forward_redirection(
                model, unwrapped, self._student_losses, unwrapped, inputs, teacher_ids, teacher_logprobs, True
            )
        sums = torch.stack([parts["kd_sum"], parts["num_tokens"], parts["agree"], parts["ce_sum"],
                            parts["kl_sum"]]).double()
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums.to(self._eval_sums.device)
        tokens = parts["num_tokens"].clamp(min=1)
        loss = parts["kd_sum"] / tokens + self.args.aux_loss_coef * parts["aux"]
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        sums = self._eval_sums if self._eval_sums is not None else torch.zeros(5, dtype=torch.float64,
                                                                               device=self.args.device)
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum")
        kd_sum, tokens, agree, ce_sum, kl_sum = sums.tolist()
        tokens = max(tokens, 1.0)
        output.metrics[f"{metric_key_prefix}_kl"] = kl_sum / tokens
        output.metrics[f"{metric_key_prefix}_topk_kl"] = kd_sum / tokens
        output.metrics[f"{metric_key_prefix}_top1_agreement"] = agree / tokens
        output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(ce_sum / tokens, 50.0))
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
