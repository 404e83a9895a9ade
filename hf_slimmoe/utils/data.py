"""The one data layer of hf_slimmoe: text, jsonl and `datasets` directories become token rows, and rows become batches.

Every command and stage reads its data here:

- [`read_text_file`] / [`read_texts`]: local text, refused with the file named when it is not text (a NUL byte, or
  more than `MAX_UNDECODABLE_SHARE` of its bytes not UTF-8);
- [`load_disk_dataset`]: a `datasets.save_to_disk` directory (a `DatasetDict` gives its `split`, see there);
- [`load_token_dataset`]: rows of `input_ids` from any of these (text is tokenized and truncated, one row a line or
  record; rows that already have `input_ids` are used as they are, so a teacher cache built on them stays valid);
- [`read_source`], [`pack`] and [`load_blocks`]: a recipe's `data:` sources as documents, packed into blocks of
  `block_size` tokens joined by EOS;
- [`collate_tokens`] / [`TokenCollator`] and [`batches`]: right-padding with TRL's `pad`.

The edge cases, decided once for every caller:

- Text rows shorter than two tokens are dropped when text is tokenized (they hold no next token to predict or
  distill); tokenized datasets are kept row for row.
- A `DatasetDict` gives the requested split (default `"train"`); without that split, its only split, else an error
  listing the splits.
- Teacher columns are generic: every per-position column whose name starts with `teacher_` (`teacher_topk_ids`,
  `teacher_topk_logprobs`, `teacher_sample_ids`, ...) is kept with its rows, truncated with them and padded with 0
  to the batch's length. Per-row values (the `teacher_topk_fingerprint` string) are not batched.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

TEACHER_PREFIX = "teacher_"
MAX_UNDECODABLE_SHARE = 0.1  # a file with more bytes that are not UTF-8 than this is refused as not text
TEXT_SUFFIXES_JSONL = (".jsonl", ".json")


# ------------------------------------------------------------------------------------------------------ text
def decode_text(data: bytes, path: str) -> str:
    """`data` decoded as UTF-8. Raises `ValueError` naming `path` when it is not text: a NUL byte, or more than
    `MAX_UNDECODABLE_SHARE` of its bytes undecodable; a few undecodable bytes become U+FFFD with a warning."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{path} is not text (a NUL byte at offset {nul}): pass a UTF-8 text file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    escaped = data.decode("utf-8", errors="surrogateescape")
    bad = sum(1 for ch in escaped if "\udc80" <= ch <= "\udcff")  # one surrogate per undecodable byte
    if bad > MAX_UNDECODABLE_SHARE * len(data):
        raise ValueError(f"{path} is not text: {bad} of its {len(data)} bytes are not UTF-8; pass a UTF-8 text file "
                         "(re-encode it first if it is text in another encoding).")
    logger.warning("%s: %d bytes are not UTF-8 and were replaced by U+FFFD.", path, bad)
    return data.decode("utf-8", errors="replace")


def read_text_file(path: str) -> str:
    """The whole file at `path` as text (see [`decode_text`] for what is refused)."""
    with open(path, "rb") as f:
        return decode_text(f.read(), path)


def read_texts(path: str, text_column: str = "text") -> list[str]:
    """
    The examples of a local text file: one per non-empty line of a `.txt` file (or any other text file), or the
    `text_column` field of each record of a `.jsonl` / `.json` file (one JSON object per line).

    Raises `ValueError` naming the file (and line) for a file that is not text, a line that is not JSON or has no
    `text_column`, or a file without any example.
    """
    text = read_text_file(path)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # universal newlines, as open() reads them
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(TEXT_SUFFIXES_JSONL):
            texts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not a JSON object ({e.msg}); a .jsonl file holds one per line.") \
                from None
        if not isinstance(row, dict) or text_column not in row:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}:{number} has no {text_column!r} field (fields: {fields}); pass --text-column.")
        texts.append(row[text_column])
    if not texts:
        raise ValueError(f"{path} holds no text (no non-empty line); pass a file with at least one example.")
    return texts


# ------------------------------------------------------------------------------------------------- datasets
def select_split(dataset, split: str | None, name: str):
    """`dataset` itself, or for a `DatasetDict` its `split` (default `"train"`; without it, its only split)."""
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        return dataset
    if (split or "train") in dataset:
        return dataset[split or "train"]
    if split is None and len(dataset) == 1:
        return dataset[next(iter(dataset))]
    raise ValueError(f"{name} holds the splits {list(dataset)} but no {split or 'train'!r} split; name one.")


def load_disk_dataset(path: str, split: str | None = None):
    """The `datasets.Dataset` saved at `path` with `save_to_disk` (the `split` of a `DatasetDict`, see
    [`select_split`])."""
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a directory written by datasets' save_to_disk.") from None
    return select_split(dataset, split, path)


def is_disk_dataset(path: str) -> bool:
    """Whether `path` is a directory written by `save_to_disk` (a `Dataset` or a `DatasetDict`)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_info.json", "state.json",
                                                                      "dataset_dict.json"))


def load_dataset_splits(path: str, config: str | None = None, split: str = "train") -> dict:
    """
    The splits (`{name: Dataset}`) of untokenized data for TRL's trainers: a `save_to_disk` directory (a `Dataset`
    there is the split `split`), a local `.json` / `.jsonl` / `.parquet` / `.csv` file (the split `split`), or a Hub
    dataset id with its `config`.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(path) and is_disk_dataset(path):
        dataset = load_from_disk(path)
        return dict(dataset) if isinstance(dataset, DatasetDict) else {split: dataset}
    if os.path.isfile(path):
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(
            os.path.splitext(path)[1])
        if builder is None:
            raise ValueError(f"Cannot read {path}: use a .json, .jsonl, .parquet or .csv file.")
        return dict(load_dataset(builder, data_files={split: path}))
    return dict(load_dataset(path, config))


def load_tokenizer(path: str | None, required: bool = True):
    """`AutoTokenizer.from_pretrained(path)`; without one there, `None` or (`required`) a `ValueError`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        if not required:
            return None
        raise ValueError(f"No tokenizer could be loaded from {path} ({error}); pass --tokenizer, or data with "
                         "input_ids.") from None


def tokenize_texts(texts: Sequence[str], tokenizer, max_length: int, name: str):
    """A `Dataset` of `input_ids`: each text tokenized and truncated to `max_length` tokens; rows of fewer than two
    tokens are dropped (nothing to predict)."""
    from datasets import Dataset

    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 tokens.")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    rows = [ids for ids in encoded if len(ids) > 1]
    if not rows:
        raise ValueError(f"{name} gives no example of at least two tokens.")
    if len(rows) < len(encoded):
        logger.info("%s: dropped %d examples of fewer than two tokens", name, len(encoded) - len(rows))
    return Dataset.from_dict({"input_ids": rows})


def load_token_dataset(path: str, tokenizer=None, text_column: str = "text", max_length: int = 512,
                       split: str | None = None):
    """
    A `Dataset` with `input_ids` from a `save_to_disk` directory, a `.jsonl` / `.json` file or a text file.

    A dataset that already has `input_ids` is returned unchanged (so a teacher cache built on it stays valid); text
    (a `text_column` column, `.jsonl` records or the lines of a text file) is tokenized with `tokenizer` and truncated
    to `max_length` tokens, see [`tokenize_texts`].
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"No data at {path}: pass a save_to_disk dataset directory or a .jsonl/.txt file.")
    if os.path.isdir(path):
        dataset = load_disk_dataset(path, split)
        if "input_ids" in dataset.column_names:
            return dataset
        if text_column not in dataset.column_names:
            raise ValueError(f"{path} has neither 'input_ids' nor a {text_column!r} column "
                             f"(columns: {dataset.column_names}); pass --text-column.")
        texts = dataset[text_column]
    else:
        texts = read_texts(path, text_column)
    if tokenizer is None:
        raise ValueError(f"{path} holds text: a tokenizer is needed (pass --tokenizer or put one in the model dir).")
    return tokenize_texts(texts, tokenizer, max_length, path)


def teacher_columns(dataset) -> list[str]:
    """The per-position teacher columns of `dataset` (lists per row, name starting with `teacher_`)."""
    from datasets import LargeList, List
    from datasets import Sequence as SequenceFeature

    return [name for name, feature in dataset.features.items()
            if name.startswith(TEACHER_PREFIX) and isinstance(feature, (List, LargeList, SequenceFeature))]


def truncate_rows(dataset, max_length: int):
    """`input_ids` (+ `attention_mask`, `labels`) and the teacher columns cut to their first `max_length` positions."""
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    columns += teacher_columns(dataset)
    if all(len(ids) <= max_length for ids in dataset["input_ids"]):
        return dataset.select_columns(columns)
    return dataset.select_columns(columns).map(lambda row: {c: row[c][:max_length] for c in columns},
                                               desc=f"Truncating to {max_length} tokens")


# ---------------------------------------------------------------------------------------------- recipe sources


def pack(dataset, tokenizer, block_size: int, text_field: str, num_proc: int | None = None):
    """Tokenize documents, end each with EOS and cut the stream into `input_ids` blocks of `block_size` tokens:
    TRL's `pack_dataset(strategy="wrapped")` over each map batch of 1000 documents, whose short last block is
    dropped."""
    from trl.data_utils import pack_dataset

    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be at least 1 token.")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def tokenize(batch):
        encoded = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        return {"input_ids": [ids + eos for ids in encoded]}

    documents = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                            desc="Tokenizing")
    blocks = pack_dataset(documents, block_size, strategy="wrapped",
                          map_kwargs={"batch_size": 1000, "num_proc": num_proc,
                                      "desc": f"Packing into {block_size}-token blocks"})
    return blocks.filter(lambda rows: [len(r) == block_size for r in rows], input_columns="input_ids", batched=True,
                         num_proc=num_proc, desc="Dropping each batch's short last block")


# ------------------------------------------------------------------------------------------------- collation
def pad(rows: Sequence, padding_value: float, length: int | None = None, dtype: torch.dtype | None = None
        ) -> torch.Tensor:
    """TRL's `pad` (right) of rows `(T_i, ...)` into one `(B, T, ...)` tensor; with `length`, rows are cut to it and
    the batch spans exactly `length` positions."""
    from trl.trainer.utils import pad as trl_pad

    tensors = [torch.as_tensor(row, dtype=dtype)[:length] for row in rows]
    return trl_pad(tensors, padding_value, pad_to_multiple_of=length)  # rows <= length: padded to exactly length


def is_teacher_value(name: str, value: Any) -> bool:
    """Whether a row's `name: value` is a per-position teacher column (a sequence under a `teacher_` name)."""
    return name.startswith(TEACHER_PREFIX) and not isinstance(value, (str, bytes)) and hasattr(value, "__len__")


def collate_teacher_columns(features: Sequence[dict], length: int) -> dict[str, torch.Tensor]:
    """The per-position teacher columns of `features`, each padded with 0 to `(B, length, ...)`: integer columns as
    int64, floating ones as float32."""
    batch = {}
    for name, value in features[0].items():
        if not is_teacher_value(name, value):
            continue
        padded = pad([f[name] for f in features], 0, length=length)
        batch[name] = padded.float() if padded.is_floating_point() else padded.long()
    return batch


def collate_tokens(features: Sequence[dict], pad_token_id: int = 0, labels: bool = True) -> dict[str, torch.Tensor]:
    """
    Right-pad rows of `input_ids` (+ optional `attention_mask`, `labels` and teacher columns) into one batch.

    Returns `input_ids` and `attention_mask` `(B, T)` int64, with `labels` also `labels` `(B, T)`: the rows' own
    `labels` padded with -100 when they have them, else `input_ids` with padding at -100; and every per-position
    teacher column `(B, T, ...)` (see [`collate_teacher_columns`]).
    """
    ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
    input_ids = pad(ids, pad_token_id)  # (B, T)
    masks = [torch.ones_like(row) if f.get("attention_mask") is None else f["attention_mask"]
             for f, row in zip(features, ids)]
    batch = {"input_ids": input_ids, "attention_mask": pad(masks, 0, length=input_ids.size(1), dtype=torch.long)}
    if labels and features[0].get("labels") is not None:  # e.g. prompt tokens at -100: only the rest is distilled
        batch["labels"] = pad([f["labels"] for f in features], -100, length=input_ids.size(1), dtype=torch.long)
    elif labels:
        batch["labels"] = input_ids.masked_fill(batch["attention_mask"] == 0, -100)
    batch.update(collate_teacher_columns(features, input_ids.size(1)))
    return batch


@dataclass
class TokenCollator:
    """A `data_collator` for `Trainer`: [`collate_tokens`] with `pad_token_id` (and `labels`)."""

    pad_token_id: int = 0
    labels: bool = True

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_tokens(features, self.pad_token_id, self.labels)


def rows_of(columns: dict[str, list]) -> list[dict[str, Any]]:
    """A batch of columns (`dataset[a:b]`) as a list of rows."""
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*(columns[n] for n in names))]


def batches(dataset, batch_size: int, pad_token_id: int = 0, labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """`dataset`'s rows (`input_ids` + optional `attention_mask` / teacher columns) in padded batches of
    `batch_size`, in order (see [`collate_tokens`])."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    columns = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "labels")
               or c in teacher_columns(dataset)]
    dataset = dataset.select_columns(columns)
    return [collate_tokens(rows_of(dataset[i:i + batch_size]), pad_token_id, labels)
            for i in range(0, len(dataset), batch_size)]


def load_calibration_batches(
    data: str,
    tokenizer_path: str | None = None,
    max_length: int = 512,
    num_examples: int | None = None,
    batch_size: int = 4,
    text_column: str = "text",
) -> list[dict[str, torch.Tensor]]:
    """
    Calibration batches for `compute_sensitivity` from `data` (any form [`load_token_dataset`] reads; a dataset's
    cached teacher columns come along and spare the teacher forward; text is tokenized with the tokenizer at
    `tokenizer_path`). The first `num_examples` rows (all if `None`), cut to `max_length` tokens, right-padded into
    batches of `batch_size` with an `attention_mask`.
    """
    if batch_size < 1 or max_length < 1 or (num_examples is not None and num_examples < 1):
        raise ValueError(f"batch_size ({batch_size}), max_length ({max_length}) and num_examples ({num_examples}) "
                         "must be positive.")
    tokenizer = load_tokenizer(tokenizer_path, required=False) if tokenizer_path is not None else None
    dataset = load_token_dataset(data, tokenizer, text_column, max_length)
    if num_examples is not None:
        dataset = dataset.select(range(min(num_examples, len(dataset))))
    dataset = truncate_rows(dataset, max_length).filter(lambda ids: len(ids) > 0, input_columns="input_ids")
    if len(dataset) == 0:
        raise ValueError(f"{data} holds no non-empty calibration examples.")
    result = batches(dataset, batch_size, getattr(tokenizer, "pad_token_id", None) or 0)
    logger.info("Calibration: %d examples in %d batches from %s", len(dataset), len(result), data)
    return result


__all__ = [
    "TEACHER_PREFIX",
    "TokenCollator",
    "batches",
    "collate_tokens",
    "decode_text",
    "is_disk_dataset",
    "load_calibration_batches",
    "load_dataset_splits",
    "load_disk_dataset",
    "load_token_dataset",
    "load_tokenizer",
    "pack",
    "pad",
    "read_text_file",
    "read_texts",
    "select_split",
    "teacher_columns",
    "tokenize_texts",
    "truncate_rows",
]
