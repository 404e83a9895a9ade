"""Dataset loader of the `stdlib_completion` lm-eval task (referenced as `!function stdlib_completion.load`)."""

import os

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    """The local jsonl next to this file as the `test` split (no download)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib_completion.jsonl")
    return datasets.load_dataset("json", data_files={"test": path})
