"""Teacher top-k cache: one batched pass of the teacher, stored as dataset columns and reused by every stage.

SlimMoE distills every stage from the same original teacher, so its top-k ids and log-probabilities per token are
computed once ([`cache_teacher_topk`]) and stored next to the tokens. Each row also stores a fingerprint of its
`input_ids`; [`check_teacher_cache`] refuses a cache whose rows do not match their tokens.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from ..data import collate_tokens, rows_of
from ..distributed import barrier, rank_and_world
from ..modeling_utils import teacher_topk_from_model

logger = logging.getLogger(__name__)

TOPK_IDS_COLUMN = "teacher_topk_ids"
TOPK_LOGPROBS_COLUMN = "teacher_topk_logprobs"
FINGERPRINT_COLUMN = "teacher_topk_fingerprint"
CACHE_COLUMNS = (TOPK_IDS_COLUMN, TOPK_LOGPROBS_COLUMN, FINGERPRINT_COLUMN)

_CACHE_FEATURES = Features(
    {
        TOPK_IDS_COLUMN: List(List(Value("int32"))),
        TOPK_LOGPROBS_COLUMN: List(List(Value("float32"))),
        FINGERPRINT_COLUMN: Value("string"),
    }
)


def input_ids_fingerprint(input_ids) -> str:
    """Hex digest (16 characters) of a row's token ids, stored beside its cached teacher top-k."""
    array = np.asarray(input_ids, dtype=np.int64)
    return hashlib.blake2b(array.tobytes(), digest_size=8).hexdigest()


def _shard_path(work_dir: str, index: int) -> str:
    return os.path.join(work_dir, f"shard-{index:05d}.parquet")


def check_teacher_cache(dataset: Dataset, vocab_size: int | None = None, top_k: int | None = None) -> None:
    """
    Check that `dataset` carries a teacher top-k cache that matches its rows, before any training compute.

    Raises:
        `ValueError`: a cache column is missing, a row's fingerprint does not match its `input_ids` (the cache was
        built for other data, or the data was re-tokenized, shuffled or filtered after caching), the cache holds
        fewer than `top_k` entries per token, a row's cache length differs from its tokens, or a cached id is
        outside the student's vocabulary.
    """
    missing = [c for c in CACHE_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset has no teacher cache columns {missing}: build them with `cache_teacher_topk` / "
            "`slimmoe cache-teacher`, or give the trainer a teacher model."
        )
    bad_rows = [index for index, (expected, cached) in
                enumerate(zip(_fingerprints(dataset), dataset[FINGERPRINT_COLUMN])) if expected != cached]
    if bad_rows:
        raise ValueError(
            f"The teacher cache does not match its dataset: {len(bad_rows)} of {len(dataset)} rows have input_ids "
            f"whose fingerprint differs from the cached one (first rows: {bad_rows[:5]}). Rebuild the cache for "
            "this dataset with `slimmoe cache-teacher`, and do not re-tokenize, shuffle or filter it after caching."
        )
    if len(dataset) == 0:
        return
    table = dataset.with_format("arrow").select_columns(["input_ids", TOPK_IDS_COLUMN])[:]
    positions = table.column(TOPK_IDS_COLUMN).combine_chunks()  # list<list<int32>>: rows -> positions -> k
    if pc.any(pc.not_equal(pc.list_value_length(positions), pc.list_value_length(table.column("input_ids")))).as_py():
        raise ValueError("Some rows have a different number of cached positions than tokens; rebuild the cache.")
    per_position = positions.flatten()  # list<int32> per token
    lengths = pc.list_value_length(per_position)
    cached_k = pc.min(lengths).as_py() if len(per_position) else 0
    if top_k is not None and cached_k is not None and cached_k < top_k:
        raise ValueError(f"The teacher cache stores k={cached_k} tokens per position but top_k={top_k} was asked; "
                         f"use top_k <= {cached_k} or rebuild the cache with a larger top_k.")
    if vocab_size is not None and len(per_position):
        max_id = pc.max(per_position.flatten()).as_py()
        if max_id is not None and max_id >= vocab_size:
            raise ValueError(
                f"The teacher cache holds token id {max_id}, outside the student's vocabulary of {vocab_size}: "
                "teacher and student vocabularies must match."
            )


def _fingerprints(dataset: Dataset, batch_size: int = 1024) -> list[str]:
    """Fingerprints of every row's `input_ids`, read in batches."""
    fingerprints = []
    for batch in dataset.select_columns(["input_ids"]).iter(batch_size=batch_size):
        fingerprints.extend(input_ids_fingerprint(ids) for ids in batch["input_ids"])
    return fingerprints


def cache_teacher_topk(
    teacher: torch.nn.Module,
    dataset: Dataset,
    top_k: int = 8,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    shard_size: int = 512,
    chunk_size: int = 1024,
    pad_token_id: int = 0,
) -> Dataset:
    """
    Run the teacher once over `dataset` and add its top-k ids and log-probabilities per token as columns.

    Adds `teacher_topk_ids` (`int32`, per row `(T, k)`), `teacher_topk_logprobs` (`float32`, `(T, k)`, relative to
    the teacher's full vocabulary at temperature 1) and `teacher_topk_fingerprint` (a digest of the row's
    `input_ids`, checked before training). Position `t` holds the teacher's prediction of token `t + 1`.

    Args:
        teacher (`torch.nn.Module`): the teacher causal LM; run in eval mode without gradients on its device.
        dataset (`datasets.Dataset`): rows with `input_ids` (and optionally `attention_mask`).
        top_k (`int`, *optional*, defaults to `8`): tokens kept per position.
        batch_size (`int`, *optional*, defaults to `8`): rows per teacher forward (right-padded).
        output_dir (`str`, *optional*): where to save the cached dataset (`datasets.save_to_disk`). Work goes to
            `<output_dir>.partial/` in parquet shards of `shard_size` rows, so re-running after an interruption
            continues from the last finished shard; an existing, matching `output_dir` is loaded and returned.
            Called by every process of a distributed run (`torchrun` / `accelerate launch`), the shards are split
            over the ranks (rank `r` builds shards `r, r + world_size, ...`, each writing its own files), the main
            process joins them in order and saves `output_dir`, and every rank returns it: the same rows, bit for
            bit, as one process computes. Several processes need `output_dir`.
        shard_size (`int`, *optional*, defaults to `512`): rows per resumable shard.
        chunk_size (`int`, *optional*, defaults to `1024`): tokens projected to the vocabulary at a time.
        pad_token_id (`int`, *optional*, defaults to `0`): id used to right-pad a batch (masked out).

    Returns:
        `datasets.Dataset`: `dataset` with the three cache columns (replacing any previous ones).
    """
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"The dataset has no 'input_ids' column (columns: {dataset.column_names}); tokenize it first.")
    vocab_size = teacher.get_output_embeddings().weight.size(0)
    if not 0 < top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be between 1 and the teacher's vocabulary size ({vocab_size}).")
    dataset = dataset.remove_columns([c for c in CACHE_COLUMNS if c in dataset.column_names])
    rank, world = rank_and_world()
    if world > 1 and output_dir is None:
        raise ValueError("cache_teacher_topk on several processes needs output_dir: every rank writes its shards "
                         "there and the main process joins them.")
    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        if os.path.isdir(output_dir):
            cached = load_from_disk(output_dir)
            check_teacher_cache(cached, vocab_size=vocab_size, top_k=top_k)
            if cached[FINGERPRINT_COLUMN] != _fingerprints(dataset):
                raise ValueError(f"{output_dir} holds a teacher cache for other data; remove it or pick another path.")
            logger.info("Reusing the teacher cache at %s", output_dir)
            return cached
        work_dir = output_dir + ".partial"
        os.makedirs(work_dir, exist_ok=True)

    was_training = teacher.training
    teacher.eval()
    device = teacher.get_output_embeddings().weight.device
    num_shards = (len(dataset) + shard_size - 1) // shard_size
    mine = range(rank, num_shards, world)  # several processes: shard i is built by rank i % world_size
    shards, reused = [], 0
    progress = tqdm(total=sum(min(shard_size, len(dataset) - i * shard_size) for i in mine),
                    desc="Caching teacher top-k", unit="row")
    try:
        for shard_index in mine:
            rows = dataset.select(range(shard_index * shard_size, min((shard_index + 1) * shard_size, len(dataset))))
            path = _shard_path(work_dir, shard_index) if output_dir is not None else None
            if path is not None and os.path.exists(path):
                shard = Dataset.from_parquet(path, features=_CACHE_FEATURES)
                if shard[FINGERPRINT_COLUMN] == _fingerprints(rows):
                    shards.append(shard)
                    reused += 1
                    progress.update(len(rows))
                    continue
                logger.warning("Shard %s does not match the dataset; recomputing it.", path)
            columns = {name: [] for name in CACHE_COLUMNS}
            inputs = rows.select_columns([c for c in ("input_ids", "attention_mask") if c in rows.column_names])
            for features in (rows_of(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)):
                batch = collate_tokens(features, pad_token_id, labels=False)  # (b, T) each
                ids, logprobs = teacher_topk_from_model(
                    teacher, batch["input_ids"].to(device), batch["attention_mask"].to(device), top_k,
                    chunk_size=chunk_size,
                )  # (b, T, k) each
                ids, logprobs = ids.to(torch.int32).cpu().numpy(), logprobs.cpu().numpy()
                for row, feature in enumerate(features):
                    length = len(feature["input_ids"])
                    columns[TOPK_IDS_COLUMN].append(ids[row, :length])
                    columns[TOPK_LOGPROBS_COLUMN].append(logprobs[row, :length])
                    columns[FINGERPRINT_COLUMN].append(input_ids_fingerprint(feature["input_ids"]))
                progress.update(len(features))
            shard = Dataset.from_dict(columns, features=_CACHE_FEATURES)
            if path is not None:
                shard.to_parquet(path + ".tmp")
                os.replace(path + ".tmp", path)
            shards.append(shard)
    finally:
        progress.close()
        teacher.train(was_training)
    logger.info("Teacher top-k cache: rank %d of %d built %d shard(s) and reused %d finished one(s)", rank, world,
                len(mine) - reused, reused)
    if world > 1:  # the main process joins every rank's shards, in order, and saves; the others load the result
        barrier()
        if rank != 0:
            barrier()
            return load_from_disk(output_dir)
        shards = [Dataset.from_parquet(_shard_path(work_dir, i), features=_CACHE_FEATURES) for i in range(num_shards)]

    cache = concatenate_datasets(shards) if shards else Dataset.from_dict({c: [] for c in CACHE_COLUMNS},
                                                                         features=_CACHE_FEATURES)
    result = concatenate_datasets([dataset, cache], axis=1)
    if output_dir is not None:
        tmp_dir = output_dir + ".tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        result.save_to_disk(tmp_dir)
        os.replace(tmp_dir, output_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
        result = load_from_disk(output_dir)
        logger.info("Saved the teacher top-k cache (%d rows, k=%d) to %s", len(result), top_k, output_dir)
        if world > 1:
            barrier()
    return result
