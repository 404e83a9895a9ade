"""Calibration batches for `compute_sensitivity`, from a tokenized dataset directory or a text/jsonl file."""

from __future__ import annotations

import json
import logging
import os

import torch

logger = logging.getLogger(__name__)

_TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")


def _pad(rows: list[list], length: int, value) -> list[list]:
    return [list(row) + [value] * (length - len(row)) for row in rows]


def collate_calibration(examples: list[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad examples (`input_ids`, optional cached teacher columns) into one batch with an `attention_mask`."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.tensor(_pad([e["input_ids"] for e in examples], length, pad_token_id)),  # [B, T]
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"]))
                                        for e in examples]),  # [B, T]
    }
    if all(examples[0].get(c) is not None for c in _TEACHER_COLUMNS):
        k = len(examples[0]["teacher_topk_ids"][0])
        batch["teacher_topk_ids"] = torch.tensor(
            _pad([e["teacher_topk_ids"] for e in examples], length, [0] * k))  # [B, T, k]
        batch["teacher_topk_logprobs"] = torch.tensor(
            _pad([e["teacher_topk_logprobs"] for e in examples], length, [0.0] * k), dtype=torch.float32)
    return batch


def _read_texts(path: str, text_column: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith((".jsonl", ".json")):
                row = json.loads(line)
                if text_column not in row:
                    raise ValueError(f"{path}:{number} has no {text_column!r} field (fields: {sorted(row)}); "
                                     "pass --text-column.")
                texts.append(row[text_column])
            else:
                texts.append(line.rstrip("\n"))
    return texts


def load_calibration_batches(
    data: str,
    tokenizer_path: str | None = None,
    max_length: int = 512,
    num_examples: int | None = None,
    batch_size: int = 4,
    text_column: str = "text",
) -> list[dict[str, torch.Tensor]]:
    """
    Calibration batches from `data`:

    - a directory written by `datasets.Dataset.save_to_disk` with an `input_ids` column (and optionally the cached
      `teacher_topk_ids` / `teacher_topk_logprobs` columns of `cache_teacher_topk`, which spare the teacher forward);
    - a `.txt` file (one example per non-empty line) or a `.jsonl` file (one JSON object with `text_column` per line),
      tokenized with the tokenizer at `tokenizer_path`.

    The first `num_examples` examples (all if `None`) are truncated to `max_length` tokens and right-padded into
    batches of `batch_size` with an `attention_mask`.
    """
    if batch_size < 1 or max_length < 1 or (num_examples is not None and num_examples < 1):
        raise ValueError(f"batch_size ({batch_size}), max_length ({max_length}) and num_examples ({num_examples}) "
                         "must be positive.")
    if not os.path.exists(data):
        raise FileNotFoundError(f"No calibration data at {data}: pass a `save_to_disk` dataset directory with "
                                "input_ids, or a .txt/.jsonl file.")
    pad_token_id = 0
    if os.path.isdir(data):
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(data)
        if isinstance(dataset, DatasetDict):
            dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset))]
        if "input_ids" not in dataset.column_names:
            raise ValueError(f"The dataset at {data} has no input_ids column (columns: {dataset.column_names}); "
                             "tokenize it first, or pass a .txt/.jsonl file.")
        if num_examples is not None:
            dataset = dataset.select(range(min(num_examples, len(dataset))))
        columns = ["input_ids"] + [c for c in _TEACHER_COLUMNS if c in dataset.column_names]
        examples = [{c: row[c][:max_length] for c in columns} for row in dataset.select_columns(columns)]
    else:
        from transformers import AutoTokenizer

        if tokenizer_path is None:
            raise ValueError(f"{data} is a text file: pass a tokenizer (the model directory's) to tokenize it.")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except (OSError, ValueError) as error:
            raise ValueError(f"No tokenizer could be loaded from {tokenizer_path} to tokenize {data} ({error}); "
                             "pass --tokenizer, or a dataset directory with input_ids.") from error
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        texts = _read_texts(data, text_column)[:num_examples]
        examples = [{"input_ids": ids} for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
                    if ids]
    examples = [e for e in examples if len(e["input_ids"]) > 0]
    if not examples:
        raise ValueError(f"{data} holds no non-empty calibration examples.")
    batches = [collate_calibration(examples[i:i + batch_size], pad_token_id)
               for i in range(0, len(examples), batch_size)]
    logger.info("Calibration: %d examples in %d batches from %s", len(examples), len(batches), data)
    return batches


__all__ = ["load_calibration_batches", "collate_calibration"]
