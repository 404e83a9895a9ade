"""A recipe's data: its `data:` sources read as documents (`read_source`, `source_files`, `check_source`) and
packed into blocks of `data.block_size` tokens (`load_blocks`); the evaluation rows of `slimmoe eval`
(`load_eval_data`). The loaders and collators they build on are `hf_slimmoe.utils.data`.
"""

from __future__ import annotations

import glob as globlib
import logging
import os

from ..utils.config_io import expand_path
from ..utils.data import TEXT_SUFFIXES_JSONL, is_disk_dataset, load_token_dataset, pack, read_text_file, select_split
from .recipe import DataSource, Recipe, demo_settings

logger = logging.getLogger(__name__)


def source_files(source: DataSource, key: str, recipe_dir: str | None) -> list[str]:
    """The local files of a `text_files` source (its glob patterns' matches, sorted, or its paths), all existing."""
    if source.glob is not None:
        patterns = [source.glob] if isinstance(source.glob, str) else list(source.glob)
        files = set()
        for pattern in patterns:
            expanded = expand_path(pattern, recipe_dir)
            matches = globlib.glob(expanded, recursive=True)
            if not matches:
                raise FileNotFoundError(f"{key}.glob {pattern!r} ({expanded}) matches no file.")
            files.update(matches)
        return sorted(files)
    files = [expand_path(p, recipe_dir) for p in source.paths]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{key}.paths: no such file(s): {', '.join(missing[:5])}.")
    return files


def check_source(source: DataSource, key: str, recipe_dir: str | None) -> None:
    """Raise when a local data source does not exist (Hub datasets are only checked when loaded)."""
    if source.type == "text_files":
        source_files(source, key, recipe_dir)
    elif source.type == "disk" and not os.path.isdir(expand_path(source.path, recipe_dir)):
        raise FileNotFoundError(f"{key}.path {source.path!r} is not a directory saved with datasets.save_to_disk.")


def read_source(source: DataSource, key: str, recipe_dir: str | None):
    """A `datasets.Dataset` of documents with the column `source.text_field` (or of pre-tokenized `input_ids`);
    `text_files` are read whole, one document a file."""
    import datasets

    if source.type == "text_files":
        texts = [read_text_file(path) for path in source_files(source, key, recipe_dir)]
        dataset = datasets.Dataset.from_dict({source.text_field: texts})
    elif source.type == "disk":
        path = expand_path(source.path, recipe_dir)
        dataset = select_split(datasets.load_from_disk(path), source.split, f"{key}.path {source.path!r}")
    else:
        dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    if source.text_field not in dataset.column_names and "input_ids" not in dataset.column_names:
        raise ValueError(f"{key}.text_field {source.text_field!r} is not a column of {source.path or source.glob} "
                         f"(columns: {dataset.column_names}).")
    if source.max_examples is not None:
        dataset = dataset.select(range(min(source.max_examples, len(dataset))))
    return dataset


def load_blocks(recipe: Recipe, tokenizer) -> dict:
    """Packed `train`, `eval` (or None) and `calibration` datasets of a recipe, each a column `input_ids`."""
    d, recipe_dir = recipe.data, recipe.directory
    blocks = {}
    for name in ("train", "eval", "calibration"):
        source = getattr(d, name)
        if source is None:
            blocks[name] = blocks["train"] if name == "calibration" else None
            continue
        dataset = read_source(source, f"data.{name}", recipe_dir)
        if "input_ids" in dataset.column_names:  # pre-tokenized blocks (e.g. a packed load_from_disk dataset): as is
            dataset = dataset.select_columns(["input_ids"])
        else:
            dataset = pack(dataset, tokenizer, d.block_size, source.text_field, d.num_proc)
        if len(dataset) == 0:
            raise ValueError(f"data.{name} gives no block of data.block_size={d.block_size} tokens; add text or "
                             "lower data.block_size.")
        blocks[name] = dataset
    if d.train_blocks is not None:
        blocks["train"] = blocks["train"].select(range(min(d.train_blocks, len(blocks["train"]))))
        if d.calibration is None:
            blocks["calibration"] = blocks["train"]
    if blocks["eval"] is not None and d.eval_blocks is not None:
        blocks["eval"] = blocks["eval"].select(range(min(d.eval_blocks, len(blocks["eval"]))))
    blocks["calibration"] = blocks["calibration"].select(range(min(d.calibration_blocks, len(blocks["calibration"]))))
    logger.info("Data: %d train, %s eval, %d calibration blocks of %d tokens", len(blocks["train"]),
                len(blocks["eval"]) if blocks["eval"] is not None else "no", len(blocks["calibration"]), d.block_size)
    return blocks


def eval_source(data: str | None) -> DataSource | None:
    """The documents `load_eval_data` packs: the demo's held-out modules for `data=None`, the files of a plain
    directory or `data` itself; `None` for row data (a `.jsonl` file or a `save_to_disk` directory)."""
    if data is None:
        return DataSource(**demo_settings()["compress"]["data"]["eval"])
    if not os.path.exists(data):
        raise FileNotFoundError(f"No evaluation data at {data}: pass a text/.jsonl file or a directory.")
    if data.endswith(TEXT_SUFFIXES_JSONL) or is_disk_dataset(data):
        return None
    if os.path.isdir(data):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(data) for name in names
                       if not name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{data} holds no file to evaluate on.")
        return DataSource(paths=files)
    return DataSource(paths=[data])


def load_eval_data(tokenizer, data: str | None = None, block_size: int = 128, max_blocks: int | None = None,
                   text_column: str = "text"):
    """
    Evaluation rows of `input_ids` (what `slimmoe eval` evaluates).

    `data`: `None` (the demo's held-out standard-library modules, see `hf_slimmoe/recipes/demo.yaml`), a
    `save_to_disk` directory (rows of `input_ids`, possibly with a teacher cache, or text) or a `.jsonl` file (one row
    per record, truncated to `block_size`), any other file (`.txt`, `.py`) or a plain directory of such files (read
    whole, tokenized and packed into `block_size`-token blocks). At most `max_blocks` rows are kept, the first ones.
    """
    if block_size < 1:
        raise ValueError(f"--block-size {block_size}: block_size must be at least 1 token.")
    source = eval_source(data)
    if source is None:
        dataset = load_token_dataset(data, tokenizer, text_column, max_length=block_size)
    else:
        documents = read_source(source, "data", None)
        # pack a growing prefix of the documents until it gives max_blocks blocks: the same first blocks as packing
        # them all (one stream, joined in order), without tokenizing text that is not evaluated
        count = len(documents) if max_blocks is None else min(len(documents), 4)
        while True:
            dataset = pack(documents.select(range(count)), tokenizer, block_size, source.text_field)
            if count == len(documents) or len(dataset) >= max_blocks:
                break
            count = min(len(documents), count * 2)
        if len(dataset) == 0:
            raise ValueError(f"{data or 'the held-out data'} gives no block of {block_size} tokens; "
                             "lower --block-size.")
    if max_blocks is not None:
        dataset = dataset.select(range(min(max_blocks, len(dataset))))
    return dataset


__all__ = [
    "source_files",
    "check_source",
    "read_source",
    "load_blocks",
    "eval_source",
    "load_eval_data",
]
