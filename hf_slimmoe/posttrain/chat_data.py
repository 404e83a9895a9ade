"""Post-training data: the train / evaluation splits of a recipe in one of TRL's dataset formats, and the offline
instruction / preference pairs `builtin:stdlib-docstrings` built from this machine's Python standard library."""

from __future__ import annotations

import inspect
import logging
import random

from datasets import Dataset

from ..utils.data import load_dataset_splits
from .config import BUILTIN_DOCSTRINGS, PostTrainScriptArguments

logger = logging.getLogger(__name__)

DOCSTRING_MODULES = ("json", "textwrap", "string", "shlex", "fnmatch", "glob", "posixpath", "base64", "heapq",
                     "bisect", "functools", "statistics", "random", "difflib", "csv", "tempfile")


def _stdlib_docstrings(modules: tuple[str, ...] = DOCSTRING_MODULES, max_chars: int = 240) -> list[tuple[str, str]]:
    """(qualified name, first paragraph of the docstring) of the public functions of some stdlib modules, sorted."""
    import importlib

    pairs = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, obj in sorted(inspect.getmembers(module, inspect.isfunction)):
            doc = inspect.getdoc(obj)
            if name.startswith("_") or not doc or getattr(obj, "__module__", None) != module.__name__:
                continue
            paragraph = " ".join(doc.split("\n\n")[0].split())[:max_chars]
            if len(paragraph) >= 20:
                pairs.append((f"{module_name}.{name}", paragraph))
    return pairs


def docstring_datasets(seed: int = 0) -> tuple[Dataset, Dataset]:
    """
    Offline instruction and preference data from this machine's Python standard library.

    Returns `(sft, preference)`: conversational prompt-completion pairs "Write the docstring of the Python function
    `module.name`." -> the docstring's first paragraph, and the same prompts with `chosen` the real docstring and
    `rejected` the docstring of another function.
    """
    pairs = _stdlib_docstrings()
    if len(pairs) < 2:
        raise ValueError("Found fewer than two documented standard-library functions to build the local data from.")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    prompts = [[{"role": "user", "content": f"Write the docstring of the Python function `{name}`."}]
               for name, _ in pairs]
    answers = [[{"role": "assistant", "content": doc}] for _, doc in pairs]
    sft = Dataset.from_dict({"prompt": prompts, "completion": answers})
    rejected = [answers[order[i]] if order[i] != i else answers[(i + 1) % len(pairs)] for i in range(len(pairs))]
    preference = Dataset.from_dict({"prompt": prompts, "chosen": answers, "rejected": rejected})
    return sft, preference



def load_train_eval(args: PostTrainScriptArguments, kind: str) -> tuple[Dataset, Dataset | None]:
    """The training (and optional evaluation) split named by `args`; `kind` is `"sft"` or `"preference"`."""
    if args.dataset_name == BUILTIN_DOCSTRINGS:
        sft, preference = docstring_datasets()
        data = (sft if kind == "sft" else preference).train_test_split(test_size=0.1, seed=0)
        train, test = data["train"], data["test"] if args.dataset_test_split else None
    else:
        path = args.dataset_name
        splits = load_dataset_splits(path, args.dataset_config, args.dataset_train_split)
        if args.dataset_train_split not in splits:
            raise ValueError(f"{path} has no split {args.dataset_train_split!r}; it has {list(splits)}.")
        if args.dataset_test_split and args.dataset_test_split not in splits:
            raise ValueError(f"{path} has no split {args.dataset_test_split!r} (dataset_test_split); it has "
                             f"{list(splits)}.")
        train = splits[args.dataset_train_split]
        test = splits[args.dataset_test_split] if args.dataset_test_split else None
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    return _format_columns(train, kind), None if test is None else _format_columns(test, kind)


# Columns TRL reads, by dataset format, most specific first (e.g. UltraChat has `messages` and a plain `prompt`)
_FORMATS = {
    "sft": (("messages",), ("prompt", "completion"), ("text",)),
    "preference": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
}


def _format_columns(dataset: Dataset, kind: str) -> Dataset:
    """Keep the columns of the first TRL dataset format `dataset` has, so extra columns cannot change its format."""
    if "input_ids" in dataset.column_names:  # already tokenized: TRL uses it as is
        return dataset
    for columns in _FORMATS[kind]:
        if all(c in dataset.column_names for c in columns):
            extra = [c for c in dataset.column_names if c not in columns and c not in ("tools", "labels")]
            if extra:
                logger.info("Using the %s columns of the dataset; ignoring %s", "/".join(columns), extra)
            return dataset.remove_columns(extra)
    raise ValueError(
        f"The dataset has columns {dataset.column_names}, none of the {kind} formats TRL reads: "
        + "; ".join(" + ".join(f) for f in _FORMATS[kind]) + "."
    )


__all__ = ["DOCSTRING_MODULES", "docstring_datasets", "load_train_eval"]
