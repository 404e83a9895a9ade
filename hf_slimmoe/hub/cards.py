"""Model cards: every saved model directory becomes a Hub-ready repository.

`write_model_card` turns the JSON files a stage (or an SFT / DPO / LoRA run, or `slimmoe prune`) leaves in its
directory into a `README.md` rendered from `templates/slimmoe_model_card.md` through
`huggingface_hub.ModelCard.from_template` (the template owns the prose, the code fills `ModelCardData` and the
template's fields), plus a `trajectory.png` plot of the compression so far (`hf_slimmoe.hub.plot`). Publishing is
`hf_slimmoe.hub.publish`.
"""

from __future__ import annotations

import logging
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..utils.outputs import read_json
from .plot import plot_trajectory

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "slimmoe_model_card.md"
PLOT_NAME = "trajectory.png"
PAPER_ID = "2506.18349"
_METHOD_TITLES = {
    "multi-stage": "multi-stage SlimMoE",
    "one-stage": "one-stage prune-then-distill",
    "iterative": "iterative pruning",
    "sft": "supervised fine-tuning with distillation",
    "dpo": "direct preference optimization",
    "lora": "LoRA fine-tuning",
    "prune": "one-shot pruning by sensitivity scores, not distilled",
}


# --------------------------------------------------------------------------------------------------- reading
def config_summary(config: dict | None) -> dict[str, Any]:
    """Sizes and exact parameter counts of a config.json of any supported family (`intermediate_size` and
    `num_local_experts` hold the routed experts' width and count, whatever the family calls them)."""
    if not config:
        return {}
    summary = {k: config.get(k) for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads",
                                           "num_hidden_layers", "num_local_experts", "num_experts_per_tok")}
    try:
        from ..architectures import config_from_dict, count_parameters, get_architecture

        cfg = config_from_dict(config)
        arch = get_architecture(cfg)
        summary.update(intermediate_size=arch.expert_width_of(cfg), num_local_experts=arch.num_experts_of(cfg),
                       num_experts_per_tok=arch.top_k_of(cfg), model_type=cfg.model_type)
        summary["num_parameters"], summary["num_active_parameters"] = count_parameters(cfg)
    except Exception as e:  # a config we cannot count (e.g. a LoRA adapter config) still gets a card
        logger.debug("Could not count parameters of the config: %s", e)
    return summary


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def _hub_url(name: str | None) -> str | None:
    """Hub page of `owner/name` or `owner/name@branch`; `None` for local paths and anything else."""
    repo, _, branch = (name or "").partition("@")
    if not _looks_like_hub_id(repo):
        return None
    return f"https://huggingface.co/{repo}" + (f"/tree/{branch}" if branch else "")


def _architecture_rows(model: dict, teacher: dict) -> list[dict[str, str]]:
    from ..utils.outputs import human_count

    rows = []

    def ratio(a, b):
        return f"{100 * a / b:.1f}%" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"

    def row(name, key, human=False):
        a, b = model.get(key), teacher.get(key)
        show = (lambda value: human_count(value, digits=2)) if human else _fmt
        rows.append({"name": name, "model": show(a), "teacher": show(b), "ratio": ratio(a, b)})

    row("d_expert (expert width)", "intermediate_size")
    rows.append({
        "name": "attention heads q / kv",
        "model": f"{_fmt(model.get('num_attention_heads'))} / {_fmt(model.get('num_key_value_heads'))}",
        "teacher": f"{_fmt(teacher.get('num_attention_heads'))} / {_fmt(teacher.get('num_key_value_heads'))}",
        "ratio": ratio(model.get("num_key_value_heads"), teacher.get("num_key_value_heads")),
    })
    row("layers", "num_hidden_layers")
    row("experts", "num_local_experts")
    row("experts per token (top-k)", "num_experts_per_tok")
    row("total parameters", "num_parameters", human=True)
    row("active parameters", "num_active_parameters", human=True)
    return rows


def _training_rows(training: dict) -> list[tuple[str, str]]:
    rows = []
    labels = [("tokens", "training tokens"), ("steps", "optimizer steps"), ("max_steps", "planned steps"),
              ("learning_rate", "learning rate"), ("kd_loss", "KD loss"), ("kd_samples", "KD teacher samples per token"),
              ("top_k", "KD teacher top-k"), ("temperature", "KD temperature"),
              ("ce_weight", "cross-entropy loss weight (added to KD)"),
              ("ce_mix", "CE share of the loss (ce_mix * CE + (1 - ce_mix) * KD)"),
              ("aux_loss_coef", "router aux loss coefficient")]
    for key, label in labels:
        if key in training:
            rows.append((label, _fmt(training[key])))
    if "early_stopped" in training:
        stopped = training.get("stopped_at_step")
        rows.append(("early stopping", f"stopped at step {_fmt(stopped)}" if training["early_stopped"]
                     else "not triggered (ran all planned steps)"))
    for key, value in training.items():  # anything else the writer recorded is shown as is
        if key not in {k for k, _ in labels} | {"early_stopped", "stopped_at_step"} and value is not None:
            rows.append((key.replace("_", " "), _fmt(value)))
    return rows


_EVAL_METRICS = (  # stage.json eval key, label, model-index metric type
    ("full_kl", "full-vocabulary KL to the teacher", "kl_divergence"),
    ("kl", "KL to the teacher (its top-k tokens + the rest of the vocabulary)", "kl_divergence"),
    ("topk_kl", "top-k KD loss (Eq. 3; negative when sharper than the teacher on its top-k)", "kl_divergence"),
    ("perplexity", "perplexity", "perplexity"),
    ("top1_agreement", "top-1 agreement with the teacher", "accuracy"),
)


# --------------------------------------------------------------------------------------------------- card
def _card_inputs(model_dir: Path) -> tuple[dict, dict | None, dict | None]:
    """`stage.json` (required), `config.json` and `trajectory.json` of a saved model directory."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory: pass a saved model directory (a stage-N/ folder).")
    info = read_json(model_dir / "stage.json", missing_ok=True)
    if info is None:
        raise FileNotFoundError(f"No stage.json in {model_dir}: the card is generated from the stage.json that the "
                                "pipeline (or post-training) writes next to the weights.")
    config = read_json(model_dir / "config.json", missing_ok=True)
    return info, config, read_json(model_dir / "trajectory.json", missing_ok=True)


def _teacher_summary(info: dict, trajectory: dict | None) -> dict:
    """The teacher's sizes from `stage.json`, its parameter counts completed from `trajectory.json`."""
    summary = dict(info.get("teacher_config") or {})
    if trajectory and not summary.get("num_parameters"):
        teacher = trajectory.get("teacher") or {}
        summary.setdefault("num_parameters", teacher.get("num_parameters"))
        summary.setdefault("num_active_parameters", teacher.get("num_active_parameters"))
    return summary


def _evaluation(evaluation: dict, datasets: list[str]) -> tuple[list, list[tuple[str, str]]]:
    """(`EvalResult`s for the card metadata, rows of the card's evaluation table) from `stage.json`'s `eval`."""
    from huggingface_hub import EvalResult

    eval_results, rows = [], []
    dataset_type = datasets[0] if datasets else "held-out"
    for key, label, metric_type in _EVAL_METRICS:
        value = evaluation.get(key, evaluation.get(f"eval_{key}"))
        if value is None:
            continue
        rows.append((label, _fmt(value)))
        eval_results.append(EvalResult(task_type="text-generation", dataset_type=dataset_type,
                                       dataset_name=f"{dataset_type} (held-out evaluation split)",
                                       dataset_split="eval", metric_type=metric_type, metric_name=label,
                                       metric_value=float(value)))
    known = {k for k, _, _ in _EVAL_METRICS} | {f"eval_{k}" for k, _, _ in _EVAL_METRICS}
    for key, value in sorted(evaluation.items()):  # other recorded metrics (eval_loss, ...) in the table only
        if key not in known and isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((key.replace("_", " "), _fmt(value)))
    return eval_results, rows


def _stock_family(summary: dict) -> tuple[str, bool]:
    """The card's model family and whether the checkpoint is already a stock one of it: SlimMoE / PhiMoE checkpoints
    are `phimoe` (used with the plugin, or exported); the other families are stored as their stock `model_type`."""
    family = summary.get("model_type") or "phimoe"
    return ("phimoe", False) if family in ("phimoe", "slimmoe") else (family, True)


def write_model_card(
    model_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    parent_repo_id: str | None = None,
    template_path: str | os.PathLike | None = None,
    local_dir: str | os.PathLike | None = None,
) -> Path:
    """Write `README.md` (the model card) and `trajectory.png` into a saved model directory; returns the card's path.

    Reads `stage.json`, `trajectory.json` and `config.json` from `model_dir`. Stage directories carry every key of the
    pipeline's `stage.json`; post-training outputs (`"method": "sft" | "dpo" | "lora"`) may lack `stage`, `training`
    or `eval`, and such sections are left out of the card.

    Args:
        model_dir: the saved model directory.
        repo_id: the Hub id the directory is published as; used in the usage snippets (default: the directory path).
        revision: the branch it is published on (branch-per-stage layout), passed in the usage snippets.
        parent_repo_id: the Hub id of the parent, as `repo_id` or `repo_id@branch`, linked in the lineage section
            (default: `stage.json`'s `parent`).
        template_path: a Jinja card template; defaults to the packaged `templates/slimmoe_model_card.md`.
        local_dir: the directory the usage snippets load from when there is no `repo_id` (default: `model_dir`; the
            pipeline writes a card under the stage's temporary name and passes its final one).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    model_dir = Path(model_dir)
    info, config, trajectory = _card_inputs(model_dir)
    stage, num_stages = info.get("stage"), info.get("num_stages")
    method = info.get("method") or "multi-stage"
    is_stage = stage is not None
    parent = parent_repo_id or info.get("parent")
    # Post-training without a teacher (DPO) descends from its parent only.
    teacher = info.get("teacher") or (parent if not is_stage else None) or "unknown"
    datasets = [d for d in (info.get("datasets") or []) if d]
    license_ = info.get("license")
    training = info.get("training") or {}
    recipe = info.get("recipe")
    base_name = recipe or model_dir.resolve().parent.name or "slimmoe"
    model_name = repo_id.split("/")[-1] if repo_id else (
        f"{base_name}-stage{stage}" if is_stage else f"{base_name}-{method}")

    existing_plot = (model_dir / PLOT_NAME) if (model_dir / PLOT_NAME).is_file() else None
    plot = plot_trajectory(trajectory, model_dir / PLOT_NAME) if trajectory else existing_plot
    eval_results, evaluation_rows = _evaluation(info.get("eval") or {}, datasets)

    model_summary = config_summary(config)
    family, stock = _stock_family(model_summary)
    tags = ["slimmoe", "moe", "mixture-of-experts", "pruning", "distillation", family, f"arxiv:{PAPER_ID}"]
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                              base_model=teacher if _looks_like_hub_id(teacher) else None, license=license_,
                              datasets=[d for d in datasets if _looks_like_hub_id(d)] or None,  # Hub ids only
                              tags=tags if is_stage else [*tags, method],
                              model_name=model_name, eval_results=eval_results or None)
    template = Path(template_path) if template_path else resources.files("hf_slimmoe").joinpath(
        f"templates/{CARD_TEMPLATE}")
    card = ModelCard.from_template(
        card_data, template_path=str(template), model_name=model_name, model_id=repo_id or str(local_dir or model_dir),
        revision_arg=f', revision="{revision}"' if revision else "", export_dir=f"{model_name}-phimoe",
        stock_model_type=family if stock else None,
        stock_architecture=(config or {}).get("architectures", [family])[0] if stock else None,
        teacher=teacher, teacher_url=_hub_url(teacher), parent=parent, parent_url=_hub_url(parent),
        is_stage=is_stage, stage=stage, num_stages=num_stages if num_stages is not None else "?",
        method=method, method_title=_METHOD_TITLES.get(method, method), recipe=recipe, datasets=datasets,
        architecture=_architecture_rows(model_summary, _teacher_summary(info, trajectory)),
        training=training, training_rows=_training_rows(training), evaluation_rows=evaluation_rows,
        plot=PLOT_NAME if plot else None, library_version=__version__,
    )
    path = model_dir / "README.md"
    card.save(path)
    logger.info("Wrote the model card %s%s", path, f" and {plot}" if plot else "")
    return path


__all__ = ["write_model_card", "config_summary", "CARD_TEMPLATE", "PLOT_NAME", "PAPER_ID"]
