"""Output directories: what made them, who is writing to them, and whether their weight files are whole.

- **Provenance.** A compression run records what made its output directory in `OUTPUT_DIR/provenance.json`: a hash
  of every recipe setting that changes the models, the stage sizes, the teacher's fingerprint (the build settings
  of a built teacher; config and weights digest of a local checkpoint; id and revision of a Hub one) and the
  tokenizer's. Each stage's `stage.json` carries the id of that record. A re-run compares before it reuses anything;
  a difference stops it with `OutputDirError` naming what differs (`check_provenance`).
- **The run lock.** `RunLock` holds `OUTPUT_DIR/.lock` (the PID and host of the writing process) while a run
  writes; a second run refuses with the holder's PID, and the lock of a process that no longer exists is taken over.
- **Weight files.** `check_weights` reads the safetensors header of a model directory and checks the file is as long
  as the header says, so a truncated or empty `model.safetensors` is named before anything loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator

logger = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
LOCK = ".lock"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
FULL_HASH_BYTES = 256 * 2**20  # files up to this size are hashed whole; larger ones are sampled
SAMPLES, SAMPLE_BYTES = 16, 2**20


class OutputDirError(ValueError):
    """An output directory a run cannot use as it is: another run's outputs, a run in progress, a damaged file."""


# ----------------------------------------------------------------------------------------------------- digests
def canonical_hash(value) -> str:
    """A short sha256 of a JSON-serializable value (keys sorted, so equal values hash alike)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    """sha256 of a file: whole up to `FULL_HASH_BYTES`, else of its size, its first 8 MiB (the safetensors header
    and the start of the data) and `SAMPLES` evenly spaced 1 MiB pieces. Retrained weights differ in every piece."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(f.read(8 * SAMPLE_BYTES))
            for i in range(SAMPLES):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a model directory: `model.safetensors`, or the shards its index lists."""
    index = os.path.join(model_dir, WEIGHTS_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}).") from None
        return [os.path.join(model_dir, shard) for shard in shards]
    return [os.path.join(model_dir, WEIGHTS)]


def check_safetensors(path: str) -> None:
    """Raise `ValueError` naming `path` when it is missing, empty, truncated or not a safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is empty or truncated ({size} bytes): not a safetensors file.")
        (header_size,) = struct.unpack("<Q", head)
        header = f.read(header_size) if header_size <= size else b""
    try:
        tensors = json.loads(header)
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError(f"{path} is truncated or not a safetensors file (unreadable header).") from None
    if 8 + header_size + end > size:
        raise ValueError(f"{path} is truncated: {size:,} bytes, its header describes {8 + header_size + end:,}.")


def check_weights(model_dir: str) -> None:
    """Check every safetensors file of a model directory (see `check_safetensors`)."""
    for path in weight_files(model_dir):
        check_safetensors(path)


def weights_digest(model_dir: str) -> str:
    """A digest of a model directory's weights (`file_digest` of each safetensors file)."""
    return canonical_hash([file_digest(path) for path in weight_files(model_dir)])


def differences(recorded, current, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON-like values differ, as `key: recorded -> current`."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(recorded) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            found += differences(recorded.get(key), current.get(key), name)
        return found
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        return [d for i, (a, b) in enumerate(zip(recorded, current)) for d in differences(a, b, f"{prefix}.{i}")]
    if recorded != current:
        return [f"{prefix or 'value'}: {json.dumps(recorded, default=str)} -> {json.dumps(current, default=str)}"]
    return []


# ----------------------------------------------------------------------------------------------------- JSON files
def read_json(path: str | os.PathLike, missing_ok: bool = False):
    """The JSON value in `path` (`missing_ok`: None when there is no such file)."""
    if missing_ok and not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str | os.PathLike, value) -> None:
    """Write `value` as JSON atomically (a temporary file renamed into place)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- provenance
def read_provenance(output_dir: str) -> dict | None:
    """The provenance record of an output directory, or None when it has none."""
    path = os.path.join(output_dir, PROVENANCE)
    try:
        return read_json(path, missing_ok=True)
    except ValueError:
        raise OutputDirError(f"{path} is not valid JSON; re-run with --overwrite to start fresh.") from None


def write_provenance(output_dir: str, record: dict) -> None:
    """Write `record` (with its `id`) as the directory's provenance, atomically."""
    write_json(os.path.join(output_dir, PROVENANCE), record)


def record_id(record: dict) -> str:
    """The id of a provenance record: the hash of what made the run (not of the bookkeeping fields)."""
    return canonical_hash({k: v for k, v in record.items() if k not in ("id", "accepted")})


def mismatch_error(output_dir: str, found: list[str]) -> OutputDirError:
    """The one-line error for an output directory made by another run: what differs, and how to go on."""
    shown = "; ".join(found[:6]) + (f"; and {len(found) - 6} more" if len(found) > 6 else "")
    return OutputDirError(
        f"{output_dir} holds the outputs of a different run ({shown}). Re-run with --overwrite to start fresh (its "
        "stages, built teacher and teacher cache are removed), choose another output directory, or re-run with "
        "--reuse-stale to keep what is there anyway.")


# ----------------------------------------------------------------------------------------------------- lock
def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """`OUTPUT_DIR/.lock` while a run writes there (a context manager; a no-op when `enabled` is False, as on the
    non-main processes of a multi-process job).

    Raises `OutputDirError` naming the holder's PID when another live process holds it; the lock of a process that
    no longer exists (killed) is taken over with a warning.
    """

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path, self.enabled, self.held = os.path.join(output_dir, LOCK), enabled, False

    def __enter__(self) -> "RunLock":
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:  # a lock file cut short while being written: nobody holds it
            return {}

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.take_over_if_stale(self.holder(), me)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return
        raise OutputDirError(f"could not take the lock {self.path}; another run keeps taking it.")

    def take_over_if_stale(self, holder: dict | None, me: dict) -> None:
        """Remove the lock file when its holder is gone; raise when it is alive (or on another host)."""
        if holder is None:  # released meanwhile
            return
        pid, host = holder.get("pid"), holder.get("host")
        directory = os.path.dirname(self.path)
        if isinstance(pid, int) and host not in (None, me["host"]):
            raise OutputDirError(f"{directory} is locked by PID {pid} on host {host} (a run writing there). Wait for "
                                 f"it to end; if it is gone, remove {self.path}.")
        if isinstance(pid, int) and pid != me["pid"] and process_exists(pid):
            raise OutputDirError(f"{directory} is in use by another run (PID {pid}); wait for it to end or stop it, "
                                 "or use another output directory.")
        logger.warning("Taking over the stale lock %s (PID %s is no longer running).", self.path, pid)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        holder = self.holder() or {}
        if holder.get("pid") == os.getpid():
            os.remove(self.path)
        self.held = False


@contextlib.contextmanager
def staged_directory(output_dir: str) -> Iterator[str]:
    """
    Yield an empty temporary directory beside `output_dir` to write into. When the block succeeds it replaces
    `output_dir` (whatever was there is removed); when it fails it is deleted. A reader never sees a half-written
    directory, nor a mix of old and new files.
    """
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output_dir))}-", dir=parent)
    try:
        yield staging
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def human_count(n: int | float | None, digits: int = 1) -> str:
    """A count with `digits` decimals and a unit: 41.9B, 15.7B, 3.2M, 850K; below 1,000 as it is; `None`: "-"."""
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f}{unit}"
    return f"{n:,}" if isinstance(n, int) else f"{n:g}"


__all__ = [
    "staged_directory",
    "human_count",
    "OutputDirError",
    "read_json",
    "write_json",
    "RunLock",
    "check_safetensors",
    "check_weights",
    "weights_digest",
    "file_digest",
    "canonical_hash",
    "differences",
    "read_provenance",
    "write_provenance",
    "record_id",
    "mismatch_error",
    "PROVENANCE",
    "LOCK",
]
