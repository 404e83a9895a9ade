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

from ..distillation.losses import chunked_cross_entropy
from ..distillation.teacher_cache import CACHE_COLUMNS
from ..utils.data import TokenCollator, collate_tokens
from ..utils.modeling import backbone

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
        batch = collate_tokens([{"input_ids": ids} for ids in dataset[start:start + batch_size]["input_ids"]],
                               pad_token_id)  # (B, T) each
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = backbone(model)(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
        labels = batch["labels"][:, 1:]  # position t predicts token t+1; padding is -100
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

    from ..distillation import DistillationConfig, DistillationTrainer

    with tempfile.TemporaryDirectory(prefix="slimmoe-eval-") as tmp:
        args = DistillationConfig(output_dir=tmp, per_device_eval_batch_size=batch_size, top_k=top_k,
                                  use_cpu=model.device.type == "cpu", report_to=[], disable_tqdm=True)
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, eval_dataset=dataset,
                                      data_collator=TokenCollator(pad_token_id=pad_token_id))
        trainer.remove_callback(PrinterCallback)  # the metrics are returned, not printed
        metrics = trainer.evaluate()
    result = {"perplexity": metrics["eval_perplexity"], "kl": metrics["eval_kl"], "topk_kl": metrics["eval_topk_kl"],
              "top1_agreement": metrics["eval_top1_agreement"]}
    if "eval_full_kl" in metrics:
        result["full_kl"] = metrics["eval_full_kl"]
    return result


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


__all__ = ["evaluate_model", "has_teacher_cache", "measure_speed", "perplexity", "run_lm_eval"]
