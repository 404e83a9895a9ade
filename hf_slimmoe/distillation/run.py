"""Distillation from paths: load data, student and teacher, train, save. What `slimmoe distill` runs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer

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


def load_token_dataset(path: str, tokenizer=None, text_column: str = "text", max_length: int = 512) -> Dataset:
    """
    A dataset with `input_ids` from a `save_to_disk` directory or a `.jsonl` / `.txt` file.

    Datasets that already have `input_ids` are returned unchanged (so a teacher cache built on them stays valid);
    text is tokenized with `tokenizer` and truncated to `max_length` tokens.
    """
    from ..pruning.calibration import _read_texts

    if not os.path.exists(path):
        raise FileNotFoundError(f"No data at {path}: pass a save_to_disk dataset directory or a .jsonl/.txt file.")
    if os.path.isdir(path):
        dataset = load_from_disk(path)
        if isinstance(dataset, DatasetDict):
            raise ValueError(f"{path} holds a DatasetDict with splits {list(dataset)}; pass one split's directory.")
        if "input_ids" in dataset.column_names:
            return dataset
        if text_column not in dataset.column_names:
            raise ValueError(f"{path} has neither 'input_ids' nor a {text_column!r} column "
                             f"(columns: {dataset.column_names}); pass --text_column.")
        texts = dataset[text_column]
    else:
        texts = _read_texts(path, text_column)
    if tokenizer is None:
        raise ValueError(f"{path} holds text: a tokenizer is needed (pass --tokenizer or put one in the student dir).")
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    rows = [ids for ids in encoded["input_ids"] if len(ids) > 1]
    if not rows:
        raise ValueError(f"{path} gave no example with at least two tokens.")
    return Dataset.from_dict({"input_ids": rows})


def _maybe_tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def run_distill(script_args: DistillScriptArguments, config: DistillationConfig) -> dict[str, float]:
    """Distill `script_args.student` into `config.output_dir`; returns the final evaluation metrics (if any)."""
    tokenizer = _maybe_tokenizer(script_args.tokenizer or script_args.student)
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
