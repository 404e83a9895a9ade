"""Evaluate a (compressed) model: held-out perplexity, KL to the teacher, top-1 agreement, and speed.

`evaluate_model` is what `slimmoe eval` and the demo's summary table use. With a teacher (or a dataset carrying a
teacher top-k cache from `cache_teacher_topk`) it is `DistillationTrainer.evaluate()`, the same numbers the
compression stages log; without one it computes the perplexity alone with `chunked_cross_entropy`.
`measure_speed` times prefill and greedy decoding in the current process (compare rows of one run only).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time

import torch

from .distillation.losses import chunked_cross_entropy
from .distillation.teacher_cache import CACHE_COLUMNS, _backbone

logger = logging.getLogger(__name__)


def has_teacher_cache(dataset) -> bool:
    """Whether `dataset` carries the teacher top-k columns written by `cache_teacher_topk` (what evaluation reads)."""
    return all(c in dataset.column_names for c in CACHE_COLUMNS)


@torch.no_grad()
def perplexity(model, dataset, batch_size: int = 16, pad_token_id: int = 0, chunk_size: int = 1024) -> dict:
    """Next-token perplexity of `model` on the `input_ids` rows of `dataset` (padding not counted).

    Returns `{"perplexity", "num_tokens"}`; `perplexity = exp(sum of token cross-entropies / num_tokens)`.
    """
    model.eval()
    device = model.get_output_embeddings().weight.device
    lm_head = model.get_output_embeddings()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]["input_ids"]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.as_tensor(ids)
            attention_mask[i, :len(ids)] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # position t predicts token t+1
        total += float(chunked_cross_entropy(hidden, lm_head.weight, lm_head.bias, labels, chunk_size=chunk_size,
                                             reduction="sum"))
        count += int((labels != -100).sum())
    if count == 0:
        raise ValueError("The evaluation data has no token to predict (every row is shorter than two tokens).")
    return {"perplexity": math.exp(min(total / count, 50.0)), "num_tokens": count}


def evaluate_model(model, dataset, teacher=None, top_k: int = 8, batch_size: int = 16,
                   pad_token_id: int | None = None) -> dict:
    """
    Held-out metrics of `model` on `dataset` (rows of `input_ids`).

    Args:
        model (`PreTrainedModel`): the causal LM to evaluate.
        dataset (`datasets.Dataset`): `input_ids` rows, optionally with a teacher top-k cache.
        teacher (`PreTrainedModel`, *optional*): the teacher, run online (the top-k is read from the dataset's
            cache when it has one); without it and without a cache only the perplexity is computed.
        top_k (`int`, *optional*, defaults to `8`): teacher tokens kept for the KL (at most the cache's k).
        batch_size (`int`, *optional*, defaults to `16`): rows per forward.
        pad_token_id (`int`, *optional*): padding id (defaults to the model's, else 0).

    Returns:
        `dict`: `perplexity`, and with a teacher or cache also `kl` (mean per-token KL(teacher || model) over the
        teacher's top-k tokens plus one "any other token" outcome: a true divergence, 0 for the teacher), `topk_kl`
        (the top-k KD training loss, Eq. 3) and `top1_agreement` (model argmax equals the teacher's top-1), all over
        the same next-token positions; with a teacher model also `full_kl` (KL(teacher || model) over the whole
        vocabulary, computed chunked).
    """
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"The evaluation dataset has no 'input_ids' column (columns: {dataset.column_names}).")
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None) or 0
    if teacher is None and not has_teacher_cache(dataset):
        return perplexity(model, dataset, batch_size=batch_size, pad_token_id=pad_token_id)

    from transformers import PrinterCallback

    from .distillation import DistillationCollator, DistillationConfig, DistillationTrainer

    with tempfile.TemporaryDirectory(prefix="slimmoe-eval-") as tmp:
        args = DistillationConfig(output_dir=tmp, per_device_eval_batch_size=batch_size, top_k=top_k,
                                  use_cpu=model.device.type == "cpu", report_to=[], disable_tqdm=True)
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, eval_dataset=dataset,
                                      data_collator=DistillationCollator(pad_token_id=pad_token_id))
        trainer.remove_callback(PrinterCallback)  # the metrics are returned, not printed
        metrics = trainer.evaluate()
    result = {"perplexity": metrics["eval_perplexity"], "kl": metrics["eval_kl"], "topk_kl": metrics["eval_topk_kl"],
              "top1_agreement": metrics["eval_top1_agreement"]}
    if "eval_full_kl" in metrics:
        result["full_kl"] = metrics["eval_full_kl"]
    return result


def load_eval_data(tokenizer, data: str | None = None, block_size: int = 128, max_blocks: int | None = None,
                   text_column: str = "text"):
    """
    Evaluation rows of `input_ids` for `slimmoe eval`.

    `data`: `None` (the demo's held-out standard-library modules, see `hf_slimmoe/recipes/demo.yaml`), a
    `save_to_disk` directory (rows of `input_ids`, possibly with a teacher cache, or text) or a `.jsonl` file (one row
    per record, truncated to `block_size`), any other file (`.txt`, `.py`) or a plain directory of such files (read
    whole, tokenized and packed into `block_size`-token blocks). At most `max_blocks` rows are kept, the first ones.
    """
    import os

    from .pipeline import pack, read_source
    from .recipe import DataSource

    if data is None:
        from .demo import demo_settings

        source = DataSource(**demo_settings()["compress"]["data"]["eval"])
    elif not os.path.exists(data):
        raise FileNotFoundError(f"No evaluation data at {data}: pass a text/.jsonl file or a directory.")
    elif data.endswith((".jsonl", ".json")) or os.path.isfile(os.path.join(data, "dataset_info.json")) or \
            os.path.isfile(os.path.join(data, "state.json")):
        source = None
    elif os.path.isdir(data):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(data) for name in names
                       if not name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{data} holds no file to evaluate on.")
        source = DataSource(paths=files)
    else:
        source = DataSource(paths=[data])
    if source is None:
        from .distillation.run import load_token_dataset

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


def _lm_eval_task_names(path: str) -> list[str]:
    """The `task:` names defined by a task YAML file, or by every YAML file of a directory."""
    import os
    import re

    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if n.endswith((".yaml", ".yml")))
    names = []
    for file in files:  # read as text: task files hold lm-eval's own YAML tags (`!function module.name`)
        with open(file, encoding="utf-8") as f:
            match = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", f.read(), flags=re.MULTILINE)
        if match:
            names.append(match.group(1))
    if not names:
        raise ValueError(f"{path} defines no lm-eval task (no YAML file with a `task:` key).")
    return names


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16) -> dict:
    """
    Run lm-evaluation-harness tasks on an in-memory model with `lm_eval.simple_evaluate` and an `HFLM` wrapper.

    `tasks` are lm-eval task names or paths to task YAML files / directories of them (their `task:` names are run,
    with the directories added to the task manager's include path), e.g. `benchmarks/lm_eval_tasks`. Needs the
    `eval` extra (`pip install "hf_slimmoe[eval]"`). Returns `{task: {metric: value}}`.
    """
    import os

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"lm-eval is not installed ({e}); install it with `pip install \"hf_slimmoe[eval]\"`.") \
            from None
    names, include = [], []
    for task in tasks:
        task = task.strip()
        if os.path.exists(task):
            names.extend(_lm_eval_task_names(task))
            include.append(os.path.abspath(task if os.path.isdir(task) else os.path.dirname(task)))
        elif task:
            names.append(task)
    manager = TaskManager(include_path=include or None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit)
    return {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in results["results"].items()}


@torch.no_grad()
def measure_speed(model, input_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> dict:
    """
    Prefill and decode throughput of `model` in this process (best of `repeats`).

    Prefill: one forward over `input_ids` (`(B, T)`), `B * T / seconds`. Decode: greedy `generate()` with the KV
    cache of exactly `new_tokens` tokens from the first row's first 16 tokens (batch 1), `new_tokens / seconds`
    (the 16-token prompt's prefill is included). Returns `{"prefill_tokens_per_s", "decode_tokens_per_s"}`.
    """
    model.eval()
    input_ids = input_ids.to(model.device)
    prompt = input_ids[:1, :16]
    pad = getattr(model.config, "pad_token_id", None) or 0
    best_prefill = best_decode = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        best_prefill = min(best_prefill, time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        best_decode = min(best_decode, time.perf_counter() - start)
    return {"prefill_tokens_per_s": input_ids.numel() / best_prefill, "decode_tokens_per_s": new_tokens / best_decode}


__all__ = ["evaluate_model", "has_teacher_cache", "load_eval_data", "measure_speed", "perplexity", "run_lm_eval"]
