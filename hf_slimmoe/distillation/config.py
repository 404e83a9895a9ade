"""`DistillationConfig`: the `TrainingArguments` of [`DistillationTrainer`]."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .settings import DistillationSettings


@dataclass
class DistillationConfig(DistillationSettings, TrainingArguments):
    r"""
    Configuration class for [`DistillationTrainer`]: SlimMoE's knowledge distillation of a (pruned) MoE student
    from its original teacher.

    Extends [`~transformers.TrainingArguments`]; with [`~transformers.HfArgumentParser`] every field is also a
    command-line flag and a YAML key of `slimmoe distill`.

    Parameters:
        > Parameters that control the teacher

        teacher_model_name_or_path (`str`, *optional*):
            Teacher checkpoint directory or Hub id, loaded when the trainer gets no `teacher_model` object. Leave
            unset when the dataset carries the teacher cache `kd_loss` reads (see [`cache_teacher_samples`] and
            [`cache_teacher_topk`]).

        teacher_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments of `AutoModelForCausalLM.from_pretrained` for a teacher given as a path or Hub id (a JSON
            string on the command line), as TRL's `GKDConfig` has them. Default: `{"dtype": <the student's dtype>}`.

        > Parameters that control the student

        model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments of `AutoModelForCausalLM.from_pretrained` for a student given as a path or Hub id, as
            TRL's configs have them (e.g. `{"dtype": "bfloat16"}`).

        > Parameters that control the loss

        The KD fields of [`KDSettings`] (`kd_loss`, `kd_samples`, `kd_samples_seed`, `top_k`, `temperature`,
        `renormalize`, `kd_chunk_size`, `kd_chunk_bytes`) and of [`DistillationSettings`] (`aux_loss_coef`,
        `ce_weight`), declared once for `slimmoe distill`, `slimmoe sft` and the recipes; and:

        eval_full_kl (`bool`, *optional*, defaults to `True`):
            When the trainer has a teacher model, evaluation also reports `eval_full_kl`, the full-vocabulary
            KL(teacher || student), computed chunked; it runs the teacher on the evaluation batches even when they
            carry a cache.

        > Parameters that control the learning-rate schedule

        lr_schedule_steps (`int`, *optional*):
            Steps of the learning-rate schedule this run is a part of (default: this run's own `max_steps`). With
            `lr_schedule_start`, consecutive runs follow one schedule (warmup once, then one `lr_scheduler_type`
            decay), as a multi-stage compression does with `stages.lr_schedule: continue`.
        lr_schedule_start (`int`, *optional*, defaults to `0`):
            The step of that schedule at which this run starts.

        > Parameters that differ from `TrainingArguments`

        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            The cache columns (`teacher_sample_ids`, `teacher_topk_ids`, ...) are not arguments of the model's
            forward, so columns are kept and the trainer's collator selects what it needs.
        logging_steps (`float`, *optional*, defaults to `10`):
            Distillation runs are short on tiny models; log more often than the parent's 500.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher checkpoint directory or Hub id; unset when the dataset carries a teacher cache."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "from_pretrained keyword arguments of a teacher given as a path (JSON)."}
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "from_pretrained keyword arguments of a student given as a path (JSON)."}
    )
    eval_full_kl: bool = field(
        default=True, metadata={"help": "Report eval_full_kl (full-vocabulary KL) when the teacher is online."}
    )
    lr_schedule_steps: int | None = field(
        default=None, metadata={"help": "Steps of the schedule this run is part of (default: this run's steps)."}
    )
    lr_schedule_start: int = field(default=0, metadata={"help": "The step of that schedule this run starts at."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the trainer's collator selects what it needs."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

    def __post_init__(self):
        super().__post_init__()
        self.check_kd_settings()
        for name in ("teacher_model_init_kwargs", "model_init_kwargs"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, json.loads(getattr(self, name)))
        if self.lr_schedule_steps is not None:
            if self.lr_scheduler_type == "reduce_lr_on_plateau":
                raise ValueError("lr_schedule_steps needs a schedule of steps, not reduce_lr_on_plateau.")
            if not 0 <= self.lr_schedule_start < self.lr_schedule_steps:
                raise ValueError(f"lr_schedule_start must be in [0, lr_schedule_steps={self.lr_schedule_steps}), "
                                 f"got {self.lr_schedule_start}.")
        elif self.lr_schedule_start:
            raise ValueError("lr_schedule_start needs lr_schedule_steps.")


__all__ = ["DistillationConfig"]
