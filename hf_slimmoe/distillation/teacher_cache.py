"""Teacher caches: one batched pass of the teacher, stored as dataset columns and reused by every stage.

SlimMoE distills every stage from the same original teacher, so what the KD loss needs from it is computed once and
stored next to the tokens, in one of two kinds:

- **top-k** ([`cache_teacher_topk`], for `kd_loss="topk"` / `"topk_tail"` and for evaluation): per token the teacher's
  top-k ids and their log-probabilities relative to its full vocabulary.
- **samples** ([`cache_teacher_samples`], for `kd_loss="sampled"`): per token `S` ids drawn from the teacher's
  distribution at temperature `T`, packed in `ceil(log2 V)` bits each ([`SamplePacking`]: 15 bytes per token for
  S=8 at Phi's 32,064, 18 at Qwen3's 151,936 or 248,320). Caches made before ids were packed (a
  `teacher_sample_ids` column of `uint16` / `int32` ids) are still read as they are; the record says which layout a
  cache has, and a layout it does not describe is refused, never guessed.

Each row also stores a fingerprint of its `input_ids`, and the dataset's `info.description` records what made the
cache (kind, teacher fingerprint, vocabulary, k or S, temperature, seed, id packing). [`check_teacher_cache`] refuses
a cache whose rows do not match their tokens, or that was made for another loss, teacher, k, S or temperature, naming
both values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from ..utils.data import collate_tokens, rows_of
from ..utils.distributed import all_reduce_max, barrier, call_through_forward, full_tensor, is_sharded, rank_and_world

# teacher_topk* (computed in utils.modeling, shared with scoring) are part of this package's API, re-exported here
from ..utils.modeling import backbone, teacher_topk, teacher_topk_from_hidden, teacher_topk_from_model, vocab_size
from .losses import teacher_samples_from_hidden, threshold_samples_from_hidden

logger = logging.getLogger(__name__)

TOPK_IDS_COLUMN = "teacher_topk_ids"
TOPK_LOGPROBS_COLUMN = "teacher_topk_logprobs"
FINGERPRINT_COLUMN = "teacher_topk_fingerprint"
CACHE_COLUMNS = (TOPK_IDS_COLUMN, TOPK_LOGPROBS_COLUMN, FINGERPRINT_COLUMN)
SAMPLE_IDS_COLUMN = "teacher_sample_ids"  # unpacked ids (B, T, S): what the collator gives the loss; old caches' too
SAMPLE_PACKED_COLUMN = "teacher_sample_packed"  # packed ids, `SamplePacking.width` bytes per position
SAMPLE_FINGERPRINT_COLUMN = "teacher_sample_fingerprint"
SAMPLE_WEIGHTS_COLUMN = "teacher_sample_weights"  # (B, T, S) weights of threshold samples: what the loss reads
SAMPLE_CODES_COLUMN = "teacher_sample_weight_codes"  # threshold samples: a byte per slot (0: a draw of weight tau)
SAMPLE_TAU_COLUMN = "teacher_sample_tau"  # threshold samples: tau, one float32 per position
THRESHOLD_COLUMNS = (SAMPLE_CODES_COLUMN, SAMPLE_TAU_COLUMN)
SAMPLINGS = ("systematic", "threshold")
SAMPLE_COLUMNS = (SAMPLE_PACKED_COLUMN, SAMPLE_FINGERPRINT_COLUMN)
LEGACY_SAMPLE_COLUMNS = (SAMPLE_IDS_COLUMN, SAMPLE_FINGERPRINT_COLUMN)  # a samples cache made before ids were packed
METADATA_KEY = "hf_slimmoe.teacher_cache"  # key of the cache records in the dataset's `info.description` (JSON)
KIND_FOR_LOSS = {"topk": "topk", "topk_tail": "topk", "sampled": "samples"}  # which cache each kd_loss reads

_TOPK_FEATURES = Features(
    {
        TOPK_IDS_COLUMN: List(List(Value("int32"))),
        TOPK_LOGPROBS_COLUMN: List(List(Value("float32"))),
        FINGERPRINT_COLUMN: Value("string"),
    }
)


def input_ids_fingerprint(input_ids) -> str:
    """Hex digest (16 characters) of a row's token ids, stored beside its cached teacher targets."""
    array = np.asarray(input_ids, dtype=np.int64)
    return hashlib.blake2b(array.tobytes(), digest_size=8).hexdigest()


# ------------------------------------------------------------------------------------------ teacher identity
# config keys that do not change what the model computes (paths, versions, dtype, runtime flags a Trainer sets)
_CONFIG_KEYS_IGNORED = ("transformers_version", "dtype", "torch_dtype", "architectures", "auto_map", "use_cache",
                        "output_attentions", "output_hidden_states", "output_router_logits", "return_dict",
                        "torchscript")


@torch.no_grad()
def teacher_fingerprint(model: torch.nn.Module) -> str:
    """
    Hex digest (16 characters) identifying a teacher: its config (without paths, versions, dtype and runtime flags
    such as `use_cache`) plus a digest of
    every weight tensor (name, shape, the float64 sum and absolute sum of its bfloat16-rounded values, and a strided
    sample of 257 of them). The same checkpoint loaded in float32 or bfloat16 gives the same fingerprint; a retrained,
    pruned or other model gives another. Costs one pass of sums over the weights, no copy of the model (an
    FSDP2-sharded teacher gathers one tensor at a time: every rank must call it).
    """
    config = getattr(model, "config", None)
    values = config.to_dict() if config is not None else {}
    values = {k: v for k, v in sorted(values.items()) if not k.startswith("_") and k not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.blake2b(json.dumps(values, sort_keys=True, default=str).encode(), digest_size=8)
    for name, tensor in model.state_dict().items():
        tensor = full_tensor(tensor)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[torch.linspace(0, flat.numel() - 1, min(flat.numel(), 257)).long().to(flat.device)]
        sums = torch.zeros(2, dtype=torch.float64, device=flat.device)
        for part in flat.split(1 << 22):  # bounded temporaries, even for a 42B teacher's expert tensors
            part = part.to(torch.bfloat16).double()
            sums += torch.stack([part.sum(), part.abs().sum()])
        digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
        digest.update(f"{float(sums[0]):.6e},{float(sums[1]):.6e}".encode())  # 7 significant digits
    return digest.hexdigest()


def _teacher_record(teacher: torch.nn.Module) -> dict:
    config = getattr(teacher, "config", None)
    return {"fingerprint": teacher_fingerprint(teacher),
            "name_or_path": getattr(config, "_name_or_path", None) or None,
            "vocab_size": vocab_size(teacher)}


def cache_metadata(dataset: Dataset) -> dict[str, dict]:
    """The cache records of `dataset` by kind (`{"topk": {...}, "samples": {...}}`), from its `info.description`;
    `{}` when none was recorded (a cache made before caches recorded their teacher)."""
    try:
        values = json.loads(dataset.info.description or "{}")
    except json.JSONDecodeError:
        return {}
    return values.get(METADATA_KEY, {}) if isinstance(values, dict) else {}


def _set_cache_metadata(dataset: Dataset, kind: str, record: dict) -> None:
    try:
        values = json.loads(dataset.info.description or "{}")
    except json.JSONDecodeError:
        values = {"description": dataset.info.description}
    if not isinstance(values, dict):
        values = {"description": dataset.info.description}
    values.setdefault(METADATA_KEY, {})[kind] = record
    dataset.info.description = json.dumps(values, sort_keys=True)


# ------------------------------------------------------------------------------------------ teacher targets
def _row_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """Per row of a right-padded batch: the position after its last attended token."""
    if attention_mask is None:
        return [input_ids.size(1)] * input_ids.size(0)
    positions = torch.arange(1, input_ids.size(1) + 1, device=attention_mask.device)
    return (attention_mask.ne(0) * positions).amax(dim=1).tolist()


def sample_uniforms(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_samples: int, seed: int = 0
) -> torch.Tensor:
    """
    The uniforms `(B, T, S)` (float64, CPU) that [`teacher_samples_from_hidden`] turns into teacher samples.

    Systematic: at every position one uniform `U` gives the S draws `(s + U) / S`, `s = 0 .. S-1`, so each is
    marginally uniform (the sampled loss stays an unbiased estimate of the full cross-entropy) while the S draws cover
    the teacher's CDF evenly: a token of probability `p` is drawn `floor(S * p)` or `ceil(S * p)` times (i.i.d. draws:
    a binomial spread). No S unweighted draws can have a smaller error token by token, so this is the lowest-variance
    gradient this storage allows (`benchmarks/bench_sample_schemes.py` measures it against i.i.d. and stratified
    draws). Each row draws from its own generator, seeded by `seed` and a digest of its token ids (up to its last
    attended token), position after position: a row gets the same draws whatever batch, padding, shard, rank or
    resume it is processed in, so online sampling and [`cache_teacher_samples`] agree. Identical rows get identical
    draws.
    """
    uniforms = torch.zeros(*input_ids.shape, num_samples, dtype=torch.float64)
    rows = input_ids.detach().cpu()
    slices = torch.arange(num_samples, dtype=torch.float64)  # (S,)
    for row, length in enumerate(_row_lengths(input_ids, attention_mask)):
        key = hashlib.blake2b(f"{seed}:".encode() + rows[row, :length].numpy().astype(np.int64).tobytes(),
                              digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
        offsets = torch.rand(length, 1, generator=generator, dtype=torch.float64)  # (L, 1)
        uniforms[row, :length] = (slices + offsets) / num_samples  # (L, S)
    return uniforms


@torch.no_grad()
def teacher_samples_from_model(
    teacher: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_samples: int,
    temperature: float = 1.0,
    seed: int = 0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """
    `num_samples` token ids drawn from the teacher's `softmax(logits / temperature)` at every position of a
    right-padded batch `(B, T)`, seeded per row (see [`sample_uniforms`]), without `(tokens, V)` logits.

    Returns:
        `torch.Tensor`: `(B, T, S)` int64; position `t` holds draws of the teacher's prediction of token `t + 1`.
    """
    hidden = backbone(teacher)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    uniforms = sample_uniforms(input_ids, attention_mask, num_samples, seed)  # (B, T, S)
    return teacher_samples_from_hidden(hidden, teacher.get_output_embeddings(), uniforms, temperature, chunk_size)


# ------------------------------------------------------------------------------------------ packed sample ids
@dataclass(frozen=True)
class SamplePacking:
    """
    How a samples cache stores the `num_samples` (S) ids of a position: `bits` bits each (`ceil(log2 V)`: 15 at
    32,064, 17 at 129,280, 18 at 151,936 to 262,144), packed into `width = ceil(S * bits / 8)` bytes, little-endian:
    bit `j` of sample `s` is bit `(s * bits + j) % 8` of byte `(s * bits + j) // 8`. Packing and unpacking are a few
    vectorized tensor operations over all positions at once (no loop per token).
    """

    bits: int
    num_samples: int

    def __post_init__(self):
        if not 1 <= self.bits <= 56 or self.num_samples < 1:
            raise ValueError(f"Cannot pack {self.num_samples} ids of {self.bits} bits per position (1 to 56 bits).")

    @classmethod
    def for_vocab(cls, vocab_size: int, num_samples: int) -> "SamplePacking":
        """The packing of `num_samples` ids of a vocabulary of `vocab_size` tokens: `ceil(log2 vocab_size)` bits."""
        return cls(max(1, (vocab_size - 1).bit_length()), num_samples)

    @classmethod
    def from_record(cls, record: dict) -> "SamplePacking":
        """The packing a samples cache record describes (see [`record`])."""
        return cls(int(record["packing"]["bits"]), int(record["num_samples"]))

    @property
    def width(self) -> int:
        """Bytes per position."""
        return (self.num_samples * self.bits + 7) // 8

    def record(self) -> dict:
        """What the cache's record stores under `"packing"`, so that a reader knows the layout."""
        return {"column": SAMPLE_PACKED_COLUMN, "bits": self.bits, "width": self.width, "bit_order": "little"}

    def _layout(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start = torch.arange(self.num_samples, device=device) * self.bits  # (S,) first bit of each id
        touched = torch.arange((self.bits + 14) // 8, device=device)  # (t,) bytes one id can straddle
        return start // 8, start % 8, touched

    def pack(self, ids: torch.Tensor) -> torch.Tensor:
        """`(..., S)` integer ids in `[0, 2**bits)` -> `(..., width)` uint8."""
        if ids.size(-1) != self.num_samples:
            raise ValueError(f"Expected {self.num_samples} ids per position, got {ids.size(-1)}.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 1 << self.bits):
            raise ValueError(f"Ids outside [0, 2**{self.bits}) cannot be packed in {self.bits} bits.")
        first, shift, touched = self._layout(ids.device)
        flat = ids.reshape(-1, self.num_samples).long() << shift  # (N, S) each id at its bit offset in its first byte
        parts = (flat[..., None] >> (8 * touched)) & 0xFF  # (N, S, t) the bytes it covers
        index = (first[:, None] + touched).reshape(1, -1).expand(flat.size(0), -1)  # (N, S * t) where they go
        packed = torch.zeros(flat.size(0), self.width + touched.numel(), dtype=torch.long, device=ids.device)
        packed.scatter_add_(1, index, parts.reshape(flat.size(0), -1))  # ids share no bit: the sum is their OR
        return packed[:, :self.width].to(torch.uint8).view(*ids.shape[:-1], self.width)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """`(..., width)` bytes (uint8 or any integer type) -> `(..., S)` int64 ids."""
        if packed.size(-1) != self.width:
            raise ValueError(f"Packed teacher samples have {packed.size(-1)} bytes per position, but "
                             f"{self.num_samples} ids of {self.bits} bits take {self.width}: the cache's record does "
                             "not describe it.")
        first, shift, touched = self._layout(packed.device)
        flat = torch.nn.functional.pad(packed.reshape(-1, self.width).long(), (0, touched.numel()))  # (N, width + t)
        parts = flat[:, first[:, None] + touched]  # (N, S, t) the bytes each id covers
        ids = (parts << (8 * touched)).sum(-1) >> shift  # (N, S)
        return (ids & ((1 << self.bits) - 1)).view(*packed.shape[:-1], self.num_samples)


def sample_packing(dataset: Dataset) -> SamplePacking | None:
    """
    The [`SamplePacking`] of `dataset`'s teacher samples cache, read from its record; `None` when the cache stores
    plain ids (the `teacher_sample_ids` column of a cache made before ids were packed, read as it is) or there is no
    samples cache. Raises `ValueError` naming the reason when the layout is not the one its record describes: packed
    bytes without a packing record, a record whose width differs from the column's, both layouts at once, or plain ids
    under a record that says they are packed.
    """
    columns, record = dataset.column_names, cache_metadata(dataset).get("samples", {})
    packing = record.get("packing")
    if SAMPLE_PACKED_COLUMN in columns and SAMPLE_IDS_COLUMN in columns:
        raise ValueError(f"The dataset carries both {SAMPLE_PACKED_COLUMN} (packed teacher samples) and "
                         f"{SAMPLE_IDS_COLUMN} (unpacked ones); keep one of them.")
    if SAMPLE_PACKED_COLUMN in columns:
        if not isinstance(packing, dict) or packing.get("column") != SAMPLE_PACKED_COLUMN:
            raise ValueError(f"The dataset carries packed teacher samples ({SAMPLE_PACKED_COLUMN}) but its cache "
                             "record says nothing of their packing (the dataset's info.description was lost or "
                             "replaced), so their bit width is unknown; rebuild the cache with "
                             "`cache_teacher_samples`.")
        result = SamplePacking.from_record(record)
        feature = dataset.features[SAMPLE_PACKED_COLUMN].feature  # one position: a fixed-size list of bytes
        if getattr(feature, "length", None) != result.width or packing.get("width") != result.width:
            raise ValueError(f"The packed teacher samples hold {getattr(feature, 'length', None)} bytes per position "
                             f"but their record describes {result.num_samples} ids of {result.bits} bits "
                             f"({result.width} bytes); rebuild the cache.")
        return result
    if SAMPLE_IDS_COLUMN in columns and packing:
        raise ValueError(f"The cache record says the teacher samples are packed ({packing}) but the dataset holds "
                         f"unpacked ids in {SAMPLE_IDS_COLUMN}; rebuild the cache.")
    return None


def encode_threshold_weights(weights: torch.Tensor, kept: torch.Tensor, rounding: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold samples' weights `(..., K)` as stored: a byte per slot, `1 + round(254 p)` for a kept token
    (stochastically rounded with `rounding` `(..., 1)` uniforms, so the decoded weight is unbiased) and 0 for a draw,
    whose weight `tau` is stored once per position `(..., 1)` float32."""
    scaled = weights.double() * 254
    codes = torch.where(kept, 1 + (scaled + rounding.double()).floor().clamp(max=254), 0)
    tau = torch.where(kept, 0.0, weights.double()).amax(-1, keepdim=True)  # (..., 1) the draws' weight
    return codes.to(torch.uint8), tau.float()


def decode_threshold_weights(codes: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The weights `(..., K)` float32 of stored threshold samples (see [`encode_threshold_weights`])."""
    return torch.where(codes > 0, (codes.float() - 1) / 254, tau.float())


def unpack_samples(batch: dict, packing: SamplePacking | None) -> dict:
    """In a collated batch, replace the packed `teacher_sample_packed` `(B, T, width)` by the ids
    `teacher_sample_ids` `(B, T, S)` int64, and threshold samples' weight codes and tau by their weights
    `teacher_sample_weights` `(B, T, S)` float32, in place; a batch without packed samples is returned as it is."""
    if SAMPLE_CODES_COLUMN in batch:
        batch[SAMPLE_WEIGHTS_COLUMN] = decode_threshold_weights(batch.pop(SAMPLE_CODES_COLUMN),
                                                                batch.pop(SAMPLE_TAU_COLUMN))
    if SAMPLE_PACKED_COLUMN not in batch:
        return batch
    if packing is None:
        raise ValueError(f"The batch carries packed teacher samples ({SAMPLE_PACKED_COLUMN}) but the collator was not "
                         "given their packing: pass sample_packing=sample_packing(dataset) to it.")
    batch[SAMPLE_IDS_COLUMN] = packing.unpack(batch.pop(SAMPLE_PACKED_COLUMN))
    return batch


# ------------------------------------------------------------------------------------------ checking a cache
@dataclass
class _Kind:
    """What differs between the cache kinds: their name and column names (ids first, fingerprint last)."""

    name: str
    fingerprint_column: str
    columns: tuple[str, ...]
    legacy_columns: tuple[str, ...] = ()  # the kind's columns as caches made before the current layout hold them
    optional_columns: tuple[str, ...] = ()  # columns only some caches of the kind carry (threshold samples' weights)

    def columns_in(self, dataset: Dataset) -> tuple[str, ...] | None:
        """The kind's columns `dataset` carries (the current layout, else the legacy one); `None` when neither."""
        for columns in (self.columns, self.legacy_columns):
            if columns and all(c in dataset.column_names for c in columns):
                return columns
        return None


_KINDS = {
    "topk": _Kind("topk", FINGERPRINT_COLUMN, CACHE_COLUMNS),
    "samples": _Kind("samples", SAMPLE_FINGERPRINT_COLUMN, SAMPLE_COLUMNS, LEGACY_SAMPLE_COLUMNS, THRESHOLD_COLUMNS),
}
_LOSSES_OF_KIND = {"topk": "'topk' / 'topk_tail'", "samples": "'sampled'"}
_MAKER = {"topk": "`cache_teacher_topk` / `slimmoe cache-teacher --kd-loss topk`",
          "samples": "`cache_teacher_samples` / `slimmoe cache-teacher --kd-loss sampled`"}


def cache_kinds(dataset: Dataset) -> list[str]:
    """The teacher cache kinds (`"topk"`, `"samples"`) whose columns `dataset` carries."""
    return [name for name, kind in _KINDS.items() if kind.columns_in(dataset) is not None]


def _check_kind(dataset: Dataset, kd_loss: str) -> _Kind:
    if kd_loss not in KIND_FOR_LOSS:
        raise ValueError(f"kd_loss={kd_loss!r} reads no teacher cache (only {sorted(KIND_FOR_LOSS)} do): "
                         + ("'full' needs the teacher online." if kd_loss == "full" else "check the name."))
    kind = _KINDS[KIND_FOR_LOSS[kd_loss]]
    missing = [c for c in kind.columns if c not in dataset.column_names]
    if kind.columns_in(dataset) is None:
        present = cache_kinds(dataset)
        if present:
            records = cache_metadata(dataset)
            found = ", ".join(f"a {name} cache (made for kd_loss {_LOSSES_OF_KIND[name]}: "
                              f"{_describe(records.get(name, {}), name)})" for name in present)
            raise ValueError(
                f"The dataset carries {found}, but kd_loss={kd_loss!r} needs a {kind.name} cache: build it with "
                f"{_MAKER[kind.name]}, or set kd_loss to the loss the cache was made for."
            )
        raise ValueError(
            f"The dataset has no teacher cache columns {missing}: build them with {_MAKER[kind.name]}, or give the "
            "trainer a teacher model."
        )
    return kind


def _describe(record: dict, kind: str) -> str:
    if not record:
        return "made before caches recorded their settings"
    width = f"top_k={record.get('top_k')}" if kind == "topk" else f"S={record.get('num_samples')}"
    if kind == "samples":
        packing = record.get("packing")
        width += f" ({packing.get('bits')}-bit packed ids)" if isinstance(packing, dict) else " (unpacked ids)"
    return f"{width}, temperature={record.get('temperature')}, teacher {record.get('teacher', {}).get('fingerprint')}"


def _check_rows(dataset: Dataset, kind: _Kind) -> int:
    """Fingerprints and lengths of every row; returns the smallest number of entries per position (k or S)."""
    bad_rows = [index for index, (expected, cached) in
                enumerate(zip(_fingerprints(dataset), dataset[kind.fingerprint_column])) if expected != cached]
    if bad_rows:
        raise ValueError(
            f"The teacher cache does not match its dataset: {len(bad_rows)} of {len(dataset)} rows have input_ids "
            f"whose fingerprint differs from the cached one (first rows: {bad_rows[:5]}). Rebuild the cache for "
            "this dataset with `slimmoe cache-teacher`, and do not re-tokenize, shuffle or filter it after caching."
        )
    if len(dataset) == 0:
        return 0
    ids_column = kind.columns_in(dataset)[0]
    table = dataset.with_format("arrow").select_columns(["input_ids", ids_column])[:]
    positions = table.column(ids_column).combine_chunks()  # rows -> positions -> k (or packed bytes)
    if pc.any(pc.not_equal(pc.list_value_length(positions), pc.list_value_length(table.column("input_ids")))).as_py():
        raise ValueError("Some rows have a different number of cached positions than tokens; rebuild the cache.")
    per_position = positions.flatten()  # one list of k ids per token
    return pc.min(pc.list_value_length(per_position)).as_py() if len(per_position) else 0


def _check_record(record: dict, kind: _Kind, width: int | None, temperature: float | None,
                  teacher: torch.nn.Module | None, vocab_size: int | None) -> None:
    """Compare a cache record with the settings it is used with; raise naming both values."""
    if kind.name == "samples" and width is not None and record.get("num_samples") != width:
        raise ValueError(f"The teacher samples cache holds S={record.get('num_samples')} draws per position but "
                         f"kd_samples={width} was asked; use kd_samples={record.get('num_samples')} or rebuild the "
                         "cache with --num-samples.")
    cached_temperature = record.get("temperature", 1.0)  # caches made before records existed are at temperature 1
    if temperature is not None and float(cached_temperature) != float(temperature):
        raise ValueError(f"The teacher cache was made at temperature={cached_temperature} but temperature="
                         f"{temperature} was asked: use temperature={cached_temperature}, rebuild the cache, or "
                         "run the teacher online.")
    cached_vocab = record.get("teacher", {}).get("vocab_size")
    if vocab_size is not None and cached_vocab is not None and cached_vocab != vocab_size:
        raise ValueError(f"The teacher cache was made by a teacher with a vocabulary of {cached_vocab} tokens but the "
                         f"student's has {vocab_size}: teacher and student vocabularies must match.")
    if teacher is not None:
        made_by, current = record.get("teacher", {}), _teacher_record(teacher)
        if made_by.get("fingerprint") != current["fingerprint"]:
            raise ValueError(f"The teacher cache was made by {_teacher_name(made_by)}, not by this teacher "
                             f"{_teacher_name(current)}: rebuild the cache with this teacher.")


def _teacher_name(record: dict) -> str:
    if not record.get("fingerprint"):
        return "an unknown teacher (the cache was made before caches recorded their teacher)"
    where = f" ({record['name_or_path']})" if record.get("name_or_path") else ""
    return f"{record['fingerprint']}{where}"


def check_teacher_cache(
    dataset: Dataset,
    vocab_size: int | None = None,
    top_k: int | None = None,
    kd_loss: str = "topk",
    num_samples: int | None = None,
    temperature: float | None = None,
    teacher: torch.nn.Module | None = None,
) -> dict:
    """
    Check that `dataset` carries the teacher cache `kd_loss` reads, matching its rows and the given settings, before
    any training compute. Returns the cache's record (`{}` for a cache made before records existed).

    Args:
        dataset (`datasets.Dataset`): rows with `input_ids` and cache columns.
        vocab_size (`int`, *optional*): the student's vocabulary; cached ids must lie inside it and the cache's
            teacher must have had the same one.
        top_k (`int`, *optional*): top-k the loss uses; at most the cache's k (the first `top_k` entries are used).
        kd_loss (`str`, *optional*, defaults to `"topk"`): `"topk"` / `"topk_tail"` read a top-k cache, `"sampled"` a
            samples cache.
        num_samples (`int`, *optional*): S the loss uses; must equal the cache's.
        temperature (`float`, *optional*): temperature the loss uses; must equal the cache's.
        teacher (`torch.nn.Module`, *optional*): the teacher at hand; its [`teacher_fingerprint`] must be the cache's.

    Raises:
        `ValueError`: a cache column is missing or of the other kind, a row's fingerprint does not match its
        `input_ids` (the cache was built for other data, or the data was re-tokenized, shuffled or filtered after
        caching), a row's cache length differs from its tokens, a cached id is outside the student's vocabulary, or
        the cache was made with another teacher, k, S or temperature (the message names both values).
    """
    kind = _check_kind(dataset, kd_loss)
    record = cache_metadata(dataset).get(kind.name, {})
    packing = sample_packing(dataset) if kind.name == "samples" else None  # a layout it can read, or refused
    _check_record(record, kind, num_samples, temperature, teacher, vocab_size)
    cached_width = _check_rows(dataset, kind)
    if kind.name == "topk" and top_k is not None and len(dataset) and cached_width < top_k:
        raise ValueError(f"The teacher cache stores k={cached_width} tokens per position but top_k={top_k} was asked; "
                         f"use top_k <= {cached_width} or rebuild the cache with a larger top_k.")
    if vocab_size is not None and len(dataset):
        max_id = _max_cached_id(dataset, kind, packing)
        if max_id is not None and max_id >= vocab_size:
            raise ValueError(
                f"The teacher cache holds token id {max_id}, outside the student's vocabulary of {vocab_size}: "
                "teacher and student vocabularies must match."
            )
    return record


def _max_cached_id(dataset: Dataset, kind: _Kind, packing: SamplePacking | None,
                   positions_per_batch: int = 1 << 20) -> int | None:
    """The largest token id the cache holds (packed ids are unpacked a batch of positions at a time)."""
    ids_column = kind.columns_in(dataset)[0]
    column = dataset.with_format("arrow").select_columns([ids_column])[:].column(ids_column)
    values = column.combine_chunks().flatten().flatten()  # every id (or every packed byte)
    if packing is None:
        return pc.max(values).as_py()
    step = positions_per_batch * packing.width
    maxima = [int(packing.unpack(torch.tensor(values.slice(start, step).to_numpy(zero_copy_only=False))
                                 .view(-1, packing.width)).max())  # (positions, width) -> (positions, S)
              for start in range(0, len(values), step)]
    return max(maxima, default=None)


def _fingerprints(dataset: Dataset, batch_size: int = 1024) -> list[str]:
    """Fingerprints of every row's `input_ids`, read in batches."""
    fingerprints = []
    for batch in dataset.select_columns(["input_ids"]).iter(batch_size=batch_size):
        fingerprints.extend(input_ids_fingerprint(ids) for ids in batch["input_ids"])
    return fingerprints


# ------------------------------------------------------------------------------------------ building a cache
def _shard_path(work_dir: str, index: int) -> str:
    return os.path.join(work_dir, f"shard-{index:05d}.parquet")


def _reuse_finished(output_dir: str, dataset: Dataset, kind: _Kind, record: dict, teacher) -> Dataset:
    """Load a finished cache directory, refusing it when it was made for other data, teacher or settings."""
    cached = load_from_disk(output_dir)
    if kind.columns_in(cached) is None:
        raise ValueError(f"{output_dir} holds no teacher {kind.name} cache (columns: {cached.column_names}); remove "
                         "it or pick another path.")
    if cached[kind.fingerprint_column] != _fingerprints(dataset):
        raise ValueError(f"{output_dir} holds a teacher cache for other data; remove it or pick another path.")
    found = cache_metadata(cached).get(kind.name, {})
    made_by, current = found.get("teacher", {}), record["teacher"]
    if made_by.get("fingerprint") != current["fingerprint"]:
        raise ValueError(f"{output_dir} holds a teacher cache made by {_teacher_name(made_by)}, not by this teacher "
                         f"{_teacher_name(current)}; remove it or pick another path.")
    for key in ("top_k", "num_samples", "temperature", "seed", "sampling"):
        if found.get(key) != record.get(key):
            raise ValueError(f"{output_dir} holds a teacher {kind.name} cache made with {key}={found.get(key)}, not "
                             f"{key}={record.get(key)}; remove it or pick another path.")
    if kind.columns_in(cached) != kind.columns:
        logger.info("Reusing the teacher cache at %s (made before the current layout: %s; still read as it is, "
                    "remove it to rebuild it in %s)", output_dir, ", ".join(kind.columns_in(cached)),
                    ", ".join(kind.columns))
    else:
        logger.info("Reusing the teacher cache at %s", output_dir)
    return cached


def _build_cache(teacher, dataset: Dataset, kind: _Kind, features: Features, record: dict,
                 compute: Callable, batch_size: int, output_dir, shard_size: int, pad_token_id: int) -> Dataset:
    """The shared loop of the cache builders: resumable parquet shards, then one saved dataset with its record.
    `compute(input_ids, attention_mask)` returns the per-position arrays `(b, T, width)` of the data columns."""
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"The dataset has no 'input_ids' column (columns: {dataset.column_names}); tokenize it "
                         "first.")
    dataset = dataset.remove_columns([c for c in dict.fromkeys(kind.columns + kind.legacy_columns
                                                               + kind.optional_columns) if c in dataset.column_names])
    rank, world = rank_and_world()
    if world > 1 and output_dir is None:
        raise ValueError("Caching the teacher on several processes needs output_dir: every rank writes its shards "
                         "there and the main process joins them.")
    work_dir = None
    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        if os.path.isdir(output_dir):  # every rank looks before any rank may write
            return _reuse_finished(output_dir, dataset, kind, record, teacher)
        work_dir = output_dir + ".partial"
        if rank == 0:
            _start_work_dir(work_dir, record)
        barrier()
    was_training = teacher.training
    teacher.eval()
    num_shards = (len(dataset) + shard_size - 1) // shard_size
    mine = range(rank, num_shards, world)  # several processes: shard i is built by rank i % world_size
    progress = tqdm(total=sum(min(shard_size, len(dataset) - i * shard_size) for i in mine),
                    desc=f"Caching teacher {kind.name}", unit="row")
    built, todo = {}, []
    for shard_index in mine:
        rows = dataset.select(range(shard_index * shard_size, min((shard_index + 1) * shard_size, len(dataset))))
        path = _shard_path(work_dir, shard_index) if work_dir is not None else None
        built[shard_index] = _finished_shard(path, rows, kind, features)
        if built[shard_index] is None:
            todo.append((shard_index, rows, path))
        else:
            progress.update(len(rows))
    # a sharded teacher's forward is a collective: every rank runs as many as the busiest one, known before any runs
    forwards = sum((len(rows) + batch_size - 1) // batch_size for _, rows, _ in todo)
    padding = int(all_reduce_max(forwards)) - forwards if is_sharded(teacher) else 0
    try:
        for shard_index, rows, path in todo:
            built[shard_index] = _compute_shard(teacher, rows, kind, features, compute, batch_size, pad_token_id,
                                                path, progress)
        _forward_in_lockstep(teacher, dataset, compute, padding, batch_size, pad_token_id)
    finally:
        progress.close()
        teacher.train(was_training)
    shards, reused = [built[i] for i in mine], len(mine) - len(todo)
    logger.info("Teacher %s cache: rank %d of %d built %d shard(s) and reused %d finished one(s)", kind.name, rank,
                world, len(mine) - reused, reused)
    if world == 1:
        return _finish_cache(dataset, shards, kind, features, record, output_dir, work_dir)
    barrier()  # every shard is on disk: the main process joins them in order and saves, the others load the result
    if rank == 0:
        shards = [Dataset.from_parquet(_shard_path(work_dir, i), features=features) for i in range(num_shards)]
        result = _finish_cache(dataset, shards, kind, features, record, output_dir, work_dir)
    barrier()
    return result if rank == 0 else load_from_disk(output_dir)


def _finished_shard(path: str | None, rows: Dataset, kind: _Kind, features: Features) -> Dataset | None:
    """The shard saved at `path` by an earlier, interrupted run when it holds exactly `rows`, else None."""
    if path is None or not os.path.exists(path):
        return None
    shard = Dataset.from_parquet(path, features=features)
    if shard[kind.fingerprint_column] == _fingerprints(rows):
        return shard
    logger.warning("Shard %s does not match the dataset; recomputing it.", path)
    return None


def _compute_shard(teacher, rows: Dataset, kind: _Kind, features: Features, compute: Callable, batch_size: int,
                   pad_token_id: int, path: str | None, progress) -> Dataset:
    """The cache columns of `rows`, one teacher forward per batch, saved at `path` (when given) for a resume."""
    columns = {name: [] for name in kind.columns}
    inputs = rows.select_columns([c for c in ("input_ids", "attention_mask") if c in rows.column_names])
    for examples in (rows_of(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)):
        batch = collate_tokens(examples, pad_token_id, labels=False)  # (b, T) each
        # a sharded teacher gathers its root (embeddings, LM head) inside its own forward
        arrays = call_through_forward(teacher, compute, batch["input_ids"], batch["attention_mask"])  # (b, T, width)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            for name, array in zip(kind.columns[:-1], arrays):
                columns[name].append(array[row, :length])
            columns[kind.fingerprint_column].append(input_ids_fingerprint(example["input_ids"]))
        progress.update(len(examples))
    shard = Dataset.from_dict(columns, features=features)
    if path is not None:
        shard.to_parquet(path + ".tmp")
        os.replace(path + ".tmp", path)
    return shard


def _forward_in_lockstep(teacher, dataset: Dataset, compute: Callable, count: int, batch_size: int,
                         pad_token_id: int) -> None:
    """Run `compute` `count` times on the dataset's first batch, discarding the result: the forwards a rank with
    fewer batches adds so that the other ranks' collectives (a sharded teacher's all-gathers) find it."""
    if count:
        inputs = dataset.select_columns([c for c in ("input_ids", "attention_mask") if c in dataset.column_names])
        batch = collate_tokens(rows_of(inputs[:batch_size]), pad_token_id, labels=False)
        for _ in range(count):
            call_through_forward(teacher, compute, batch["input_ids"], batch["attention_mask"])


def _start_work_dir(work_dir: str, record: dict) -> None:
    """Create (or reuse, when it was started with the same record) the directory of resumable shards; the record
    is kept beside it in `<work_dir>.json`."""
    path = work_dir + ".json"
    if os.path.isdir(work_dir):
        found = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                found = json.load(f)
        if found == record:
            return
        logger.warning("%s was started with other settings (%s, now %s); starting it again.", work_dir, found, record)
        shutil.rmtree(work_dir)
    os.makedirs(work_dir)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _finish_cache(dataset, shards, kind: _Kind, features, record, output_dir, work_dir) -> Dataset:
    cache = concatenate_datasets(shards) if shards else Dataset.from_dict({c: [] for c in kind.columns},
                                                                         features=features)
    result = concatenate_datasets([dataset, cache], axis=1)
    _set_cache_metadata(result, kind.name, record)
    if output_dir is not None:
        tmp_dir = output_dir + ".tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        result.save_to_disk(tmp_dir)
        os.replace(tmp_dir, output_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
        if os.path.exists(work_dir + ".json"):
            os.remove(work_dir + ".json")
        result = load_from_disk(output_dir)
        logger.info("Saved the teacher %s cache (%d rows, %s) to %s", kind.name, len(result),
                    _describe(record, kind.name), output_dir)
    return result


def cache_teacher_topk(
    teacher: torch.nn.Module,
    dataset: Dataset,
    top_k: int = 8,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    shard_size: int = 512,
    chunk_size: int | None = None,
    pad_token_id: int = 0,
) -> Dataset:
    """
    Run the teacher once over `dataset` and add its top-k ids and log-probabilities per token as columns.

    Adds `teacher_topk_ids` (`int32`, per row `(T, k)`), `teacher_topk_logprobs` (`float32`, `(T, k)`, relative to
    the teacher's full vocabulary at temperature 1) and `teacher_topk_fingerprint` (a digest of the row's
    `input_ids`, checked before training), and records kind, teacher fingerprint, vocabulary, k and temperature in the
    dataset's `info.description` (see [`cache_metadata`]). Position `t` holds the teacher's prediction of token
    `t + 1`.

    Args:
        teacher (`torch.nn.Module`): the teacher causal LM; run in eval mode without gradients on its device.
        dataset (`datasets.Dataset`): rows with `input_ids` (and optionally `attention_mask`).
        top_k (`int`, *optional*, defaults to `8`): tokens kept per position.
        batch_size (`int`, *optional*, defaults to `8`): rows per teacher forward (right-padded).
        output_dir (`str`, *optional*): where to save the cached dataset (`datasets.save_to_disk`). Work goes to
            `<output_dir>.partial/` in parquet shards of `shard_size` rows, so re-running after an interruption
            continues from the last finished shard; an existing `output_dir` is loaded and returned when it was made
            for the same rows, teacher and top_k, and refused otherwise. Called by every process of a distributed run
            (`torchrun` / `accelerate launch`), the shards are split over the ranks (rank `r` builds shards `r, r +
            world_size, ...`, writing its own files), the main process joins them in order and saves `output_dir`,
            and every rank returns it: the rows one process computes, bit for bit. Several processes need it.
        shard_size (`int`, *optional*, defaults to `512`): rows per resumable shard.
        chunk_size (`int`, *optional*): tokens projected to the vocabulary at a time; `None` sizes chunks from a byte
            budget (`hf_slimmoe.utils.modeling.chunk_tokens`), the same memory at any vocabulary.
        pad_token_id (`int`, *optional*, defaults to `0`): id used to right-pad a batch (masked out).

    Returns:
        `datasets.Dataset`: `dataset` with the three cache columns (replacing any previous ones).
    """
    vocab = vocab_size(teacher)
    if not 0 < top_k <= vocab:
        raise ValueError(f"top_k={top_k} must be between 1 and the teacher's vocabulary size ({vocab}).")
    device = teacher.get_output_embeddings().weight.device
    record = {"kind": "topk", "teacher": _teacher_record(teacher), "top_k": top_k, "temperature": 1.0}

    def compute(input_ids, attention_mask):
        ids, logprobs = teacher_topk_from_model(teacher, input_ids.to(device), attention_mask.to(device), top_k,
                                                chunk_size=chunk_size)  # (b, T, k) each
        return ids.to(torch.int32).cpu().numpy(), logprobs.cpu().numpy()

    return _build_cache(teacher, dataset, _KINDS["topk"], _TOPK_FEATURES, record, compute, batch_size, output_dir,
                        shard_size, pad_token_id)


def cache_teacher_samples(
    teacher: torch.nn.Module,
    dataset: Dataset,
    num_samples: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    shard_size: int = 512,
    chunk_size: int | None = None,
    pad_token_id: int = 0,
    sampling: str = "systematic",
) -> Dataset:
    """
    Run the teacher once over `dataset` and add `num_samples` token ids drawn from its distribution per token, the
    targets of the unbiased sampled KD loss ([`sampled_kd_loss`], `kd_loss="sampled"`).

    Adds `teacher_sample_packed` (per row `(T, width)` uint8: the S ids of a position packed in `ceil(log2 V)` bits
    each, see [`SamplePacking`]; for S=8 that is `ceil(log2 V)` bytes per token, 15 at 32,064 and 18 up to 262,144)
    and `teacher_sample_fingerprint` (a digest of the row's `input_ids`), and records kind, teacher fingerprint,
    vocabulary, S, temperature, seed, sampling scheme and the packing in the dataset's `info.description`.
    [`DistillationCollator`] unpacks the ids of a batch into `teacher_sample_ids` `(B, T, S)`.
    Draws are systematic over the teacher's distribution (each token drawn `floor(S p)` or `ceil(S p)` times) and
    seeded per row (by `seed` and the row's tokens, see [`sample_uniforms`]), so batching, resuming and multiple ranks
    give the same samples, and online sampling with the same seed draws the same ones. Position `t` holds draws of the
    teacher's prediction of token `t + 1`.

    Args:
        teacher (`torch.nn.Module`): the teacher causal LM; run in eval mode without gradients on its device.
        dataset (`datasets.Dataset`): rows with `input_ids` (and optionally `attention_mask`).
        num_samples (`int`, *optional*, defaults to `8`): draws per position (S); a token may be drawn repeatedly.
        temperature (`float`, *optional*, defaults to `1.0`): draws follow `softmax(logits / temperature)`.
        seed (`int`, *optional*, defaults to `0`): seed of the per-row generators.
        batch_size, output_dir, shard_size, chunk_size, pad_token_id: as in [`cache_teacher_topk`] (resumable, an
            existing `output_dir` made for the same rows, teacher, S, temperature, seed and sampling is reused,
            otherwise refused).
        sampling (`str`, *optional*, defaults to `"systematic"`): `"threshold"` stores S weighted slots instead
            ([`threshold_samples_from_hidden`]: the tokens above a threshold `tau` with their probability, the rest
            drawn at `p / tau` with weight `tau`), adding `teacher_sample_weight_codes` (a byte per slot: a kept
            token's probability, stochastically rounded to 1/254, or 0 for a draw) and `teacher_sample_tau` (one
            float32 per position): `ceil(S bits / 8) + S + 4` bytes a token. The collator decodes them into
            `teacher_sample_weights`, which the sampled loss then uses.

    Returns:
        `datasets.Dataset`: `dataset` with the two sample-cache columns (replacing any previous ones).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive.")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling={sampling!r} is not one of {list(SAMPLINGS)}.")
    device = teacher.get_output_embeddings().weight.device
    packing = SamplePacking.for_vocab(vocab_size(teacher), num_samples)
    features = {SAMPLE_PACKED_COLUMN: List(List(Value("uint8"), length=packing.width))}
    kind = _KINDS["samples"]
    if sampling == "threshold":
        features.update({SAMPLE_CODES_COLUMN: List(List(Value("uint8"), length=num_samples)),
                         SAMPLE_TAU_COLUMN: List(List(Value("float32"), length=1))})
        kind = replace(kind, columns=(SAMPLE_PACKED_COLUMN, *THRESHOLD_COLUMNS, SAMPLE_FINGERPRINT_COLUMN))
    features = Features({**features, SAMPLE_FINGERPRINT_COLUMN: Value("string")})
    record = {"kind": "samples", "teacher": _teacher_record(teacher), "num_samples": num_samples,
              "temperature": float(temperature), "seed": seed, "sampling": sampling, "packing": packing.record()}

    def compute(input_ids, attention_mask):
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if sampling == "systematic":
            ids = teacher_samples_from_model(teacher, input_ids, attention_mask, num_samples, temperature, seed,
                                             chunk_size)  # (b, T, S)
            return (packing.pack(ids).cpu().numpy(),)  # (b, T, width) uint8
        with torch.no_grad():
            hidden = backbone(teacher)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        uniforms = sample_uniforms(input_ids, attention_mask, 1, seed)  # (b, T, 1) the draws' offset
        ids, weights, kept = threshold_samples_from_hidden(hidden, teacher.get_output_embeddings(), uniforms,
                                                           num_samples, temperature, chunk_size)  # (b, T, K) each
        rounding = sample_uniforms(input_ids, attention_mask, 1, -1 - seed)  # another stream, for the codes
        codes, tau = encode_threshold_weights(weights.cpu(), kept.cpu(), rounding)
        return packing.pack(ids).cpu().numpy(), codes.numpy(), tau.numpy()

    return _build_cache(teacher, dataset, kind, features, record, compute, batch_size, output_dir, shard_size,
                        pad_token_id)


__all__ = [
    "SamplePacking",
    "cache_kinds",
    "cache_metadata",
    "cache_teacher_samples",
    "cache_teacher_topk",
    "check_teacher_cache",
    "decode_threshold_weights",
    "encode_threshold_weights",
    "input_ids_fingerprint",
    "sample_packing",
    "sample_uniforms",
    "teacher_fingerprint",
    "teacher_samples_from_model",
    "teacher_topk",
    "teacher_topk_from_hidden",
    "teacher_topk_from_model",
    "unpack_samples",
]
