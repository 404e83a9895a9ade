"""`DistillationConfig`: the `TrainingArguments` of [`DistillationTrainer`]."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class DistillationConfig(TrainingArguments):
    r"""
    Configuration class for [`DistillationTrainer`]: SlimMoE's top-k knowledge distillation of a (pruned) MoE
    student from its original teacher.

    Extends [`~transformers.TrainingArguments`]; with [`~transformers.HfArgumentParser`] every field is also a
    command-line flag and a YAML key of `slimmoe distill`.

    Parameters:
        > Parameters that control the teacher

        teacher_model_name_or_path (`str`, *optional*):
            Teacher checkpoint directory or Hub id, loaded when the trainer gets no `teacher_model` object. Leave
            unset when the dataset carries a teacher top-k cache (see [`cache_teacher_topk`]).

        > Parameters that control the loss

        top_k (`int`, *optional*, defaults to `8`):
            Number of teacher tokens per position kept by the KD loss (the paper's top-8). With a cached teacher it
            must not exceed the cache's k; the first `top_k` cached entries are used.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of teacher and student in the KD loss. A teacher cache stores log-probabilities at
            temperature 1, so other values need an online teacher.
        renormalize (`bool`, *optional*, defaults to `False`):
            Renormalize the teacher's top-k probabilities to sum to 1. The default keeps them relative to the full
            vocabulary (the other probabilities set to 0), as in the paper.
        aux_loss_coef (`float`, *optional*, defaults to `0.01`):
            Weight of the MoE load-balancing loss computed on the student's router logits (Phi-3.5-MoE's
            `router_aux_loss_coef`). `0` disables it and skips returning router logits.
        ce_weight (`float`, *optional*, defaults to `0.0`):
            Weight of an optional next-token cross-entropy on the data's own tokens, added to the KD loss.
        kd_chunk_size (`int`, *optional*, defaults to `1024`):
            Tokens projected to the vocabulary at a time by the chunked KD loss (memory vs. kernel size).

        > Parameters that differ from `TrainingArguments`

        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            The cache columns `teacher_topk_ids` / `teacher_topk_logprobs` are not arguments of the model's
            forward, so columns are kept and the trainer's collator selects what it needs.
        logging_steps (`float`, *optional*, defaults to `10`):
            Distillation runs are short on tiny models; log more often than the parent's 500.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher checkpoint directory or Hub id; unset when the dataset carries a teacher cache."},
    )
    top_k: int = field(default=8, metadata={"help": "Teacher tokens kept per position by the KD loss."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KD loss."})
    renormalize: bool = field(
        default=False, metadata={"help": "Renormalize the teacher top-k probabilities to sum to 1."}
    )
    aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight of the student's MoE load-balancing loss (0 disables it)."}
    )
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of an optional next-token cross-entropy loss."})
    kd_chunk_size: int = field(default=1024, metadata={"help": "Tokens projected to the vocabulary at a time."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns: the trainer's collator selects what it needs."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

    def __post_init__(self):
        super().__post_init__()
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be at least 1.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be positive.")
        if self.aux_loss_coef < 0 or self.ce_weight < 0:
            raise ValueError(
                f"aux_loss_coef={self.aux_loss_coef} and ce_weight={self.ce_weight} must be non-negative."
            )
        if self.kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size={self.kd_chunk_size} must be at least 1.")
