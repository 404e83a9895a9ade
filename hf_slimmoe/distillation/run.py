"""Distillation from paths: load data, student and teacher, train, save. What `slimmoe distill` runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM

from ..utils.data import load_token_dataset, load_tokenizer
from .config import DistillationConfig
from .trainer import DistillationTrainer

logger = logging.getLogger(__name__)


@dataclass
class DistillScriptArguments:
    r"""
    Paths of `slimmoe distill` (the training hyper-parameters are the fields of [`DistillationConfig`]).

    Parameters:
        student (`str`):
            Student checkpoint directory (a pruned SlimMoE stage, or any PhiMoE/SlimMoE checkpoint).
        dataset (`str`):
            Training data: a `datasets.save_to_disk` directory with `input_ids` (and, for a cached teacher, the
            cache `kd_loss` reads, from `slimmoe cache-teacher --kd-loss ...`) or a `text_column`; or a `.jsonl` /
            `.txt` file
            (one example per line) tokenized with the student's tokenizer.
        eval_dataset (`str`, *optional*):
            Held-out data in the same forms (a cached one carries the teacher's top-k); evaluation reports `eval_kl`,
            `eval_top1_agreement`, `eval_perplexity` (and `eval_full_kl` with an online teacher).
        tokenizer (`str`, *optional*):
            Tokenizer directory for text data; defaults to the student directory.
        text_column (`str`, *optional*, defaults to `"text"`):
            Text field of `.jsonl` files and text datasets.
        max_length (`int`, *optional*, defaults to `512`):
            Tokens kept per example of text data (tokenized data is used as is, so a cache stays valid).
    """

    student: str | None = field(default=None, metadata={"help": "Student checkpoint directory (required)."})
    dataset: str | None = field(
        default=None, metadata={"help": "save_to_disk directory, .jsonl or .txt training data (required)."}
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out data, same forms as --dataset."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer directory (default: the student)."})
    text_column: str = field(default="text", metadata={"help": "Text field of .jsonl files / text datasets."})
    max_length: int = field(default=512, metadata={"help": "Tokens kept per example of text data."})

    def __post_init__(self):
        if self.student is None or self.dataset is None:
            raise ValueError("`student` and `dataset` are required (as flags or YAML keys).")


def run_distill(script_args: DistillScriptArguments, config: DistillationConfig) -> dict[str, float]:
    """Distill `script_args.student` into `config.output_dir`; returns the final evaluation metrics (if any)."""
    tokenizer = load_tokenizer(script_args.tokenizer or script_args.student, required=False)
    train_dataset = load_token_dataset(script_args.dataset, tokenizer, script_args.text_column,
                                       script_args.max_length)
    eval_dataset = None
    if script_args.eval_dataset is not None:
        eval_dataset = load_token_dataset(script_args.eval_dataset, tokenizer, script_args.text_column,
                                          script_args.max_length)
    student = AutoModelForCausalLM.from_pretrained(script_args.student)
    trainer = DistillationTrainer(
        model=student, teacher_model=None, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        logger.info("Saved the distilled student to %s", config.output_dir)
    return metrics


__all__ = ["DistillScriptArguments", "run_distill"]
