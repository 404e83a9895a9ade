"""Model cards and publishing: every saved model directory becomes a Hub-ready repository.

`write_model_card` turns the JSON files a stage (or an SFT / DPO / LoRA run) leaves in its directory into a `README.md`
rendered from `templates/slimmoe_model_card.md` through `huggingface_hub.ModelCard.from_template`, plus a
`trajectory.png` plot of the compression so far. `publish_stage` pushes such a directory with the real
`huggingface_hub` client: one repository per stage, or one repository with a branch per stage, as `HubSettings` says.

Publishing never loses work: a failed push (no network, server error, no token) logs a warning and returns `False`,
the directory stays complete on disk and `slimmoe push OUTPUT_DIR` publishes it later. It never hangs either: while
publishing, every request of `huggingface_hub`'s shared HTTP client times out after `HF_HUB_DOWNLOAD_TIMEOUT` seconds
(huggingface_hub's own setting, 10 by default: its default for requests that set no timeout of their own), and the
client's bounded retries (`http_backoff`: at most 5, for uploads and commits) are the only retries.

Pushing an unchanged directory again makes no commit: `HfApi.create_commit` compares each file with the remote one
(sha256 of LFS files, git blob ids of the others), uploads only the changed ones and skips a commit left empty. The
token is resolved by `huggingface_hub` (argument, `HF_TOKEN`, then the login cache) and never written to a file, a
card, a log record or an error message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .outputs import read_json
from .trajectory import plot_trajectory

logger = logging.getLogger(__name__)

LAYOUTS = ("repo-per-stage", "branch-per-stage")
CARD_TEMPLATE = "slimmoe_model_card.md"
PLOT_NAME = "trajectory.png"
PAPER_ID = "2506.18349"
# Files written next to the weights that describe a run but are not part of it on the Hub.
_SKIP_PREFIXES = (".", "checkpoint-", "__pycache__")
_METHOD_TITLES = {
    "multi-stage": "multi-stage SlimMoE",
    "one-stage": "one-stage prune-then-distill",
    "iterative": "iterative pruning",
    "sft": "supervised fine-tuning with distillation",
    "dpo": "direct preference optimization",
    "lora": "LoRA fine-tuning",
    "prune": "one-shot pruning by sensitivity scores, not distilled",
}


# --------------------------------------------------------------------------------------------------- settings
@dataclass
class HubSettings:
    r"""
    Where and how stages are published; the `hub:` section of a recipe.

    push_to_hub (`bool`, defaults to `False`):
        Push every stage when it is complete. `slimmoe push OUTPUT_DIR` pushes regardless of this flag.
    repo_id (`str`, *optional*):
        Repository id template. `{stage}` is replaced by the stage number (or the method, e.g. `sft`, for
        post-training outputs without a stage) and `{user}` by the name of the token's owner (resolved with
        `whoami`), e.g. `"{user}/phi-tiny-moe-stage{stage}"`. Required when pushing.
    layout (`str`, defaults to `"repo-per-stage"`):
        `"repo-per-stage"`: one repository per stage (`repo_id` must contain `{stage}`).
        `"branch-per-stage"`: one repository, one branch per stage named after `branch`.
    branch (`str`, defaults to `"stage-{stage}"`):
        Branch name template used by the `"branch-per-stage"` layout.
    private (`bool`, defaults to `False`):
        Create the repositories private. Existing repositories keep their visibility.
    """

    push_to_hub: bool = False
    repo_id: str | None = None
    layout: Literal["repo-per-stage", "branch-per-stage"] = "repo-per-stage"
    branch: str = "stage-{stage}"
    private: bool = False

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"hub.layout is {self.layout!r}; choose one of {', '.join(repr(x) for x in LAYOUTS)}.")
        if self.push_to_hub and not self.repo_id:
            raise ValueError("hub.push_to_hub is true but hub.repo_id is not set: set hub.repo_id, e.g. "
                             "'{user}/phi-tiny-moe-stage{stage}', or set hub.push_to_hub to false.")
        if self.repo_id is not None:
            fields = _template_fields(self.repo_id, "hub.repo_id")
            if self.layout == "repo-per-stage" and "stage" not in fields:
                raise ValueError(f"hub.repo_id {self.repo_id!r} has no '{{stage}}' but hub.layout is "
                                 "'repo-per-stage', so every stage would overwrite the same repository: add "
                                 "'{stage}' to hub.repo_id (e.g. '{user}/my-model-stage{stage}') or set hub.layout "
                                 "to 'branch-per-stage'.")
        branch_fields = _template_fields(self.branch, "hub.branch")
        if self.layout == "branch-per-stage" and "stage" not in branch_fields:
            raise ValueError(f"hub.branch {self.branch!r} has no '{{stage}}': every stage would go to the same "
                             "branch; use e.g. 'stage-{stage}'.")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "HubSettings":
        """Build from a recipe's `hub:` mapping; unknown keys raise a `ValueError` naming them."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown key(s) in the recipe's hub section: {', '.join('hub.' + k for k in unknown)}; "
                             f"known keys: {', '.join(sorted(known))}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def target(self, stage: int | str, user: str | None = None) -> tuple[str, str | None]:
        """`(repo_id, branch)` for a stage; `branch` is `None` (the default branch) with the repo-per-stage layout."""
        if not self.repo_id:
            raise ValueError("hub.repo_id is not set: set it in the recipe's hub section, e.g. "
                             "'{user}/phi-tiny-moe-stage{stage}'.")
        if "user" in _template_fields(self.repo_id, "hub.repo_id") and user is None:
            raise ValueError(f"hub.repo_id {self.repo_id!r} needs {{user}} but no user name was resolved.")
        repo_id = self.repo_id.format(stage=stage, user=user)
        if self.layout == "repo-per-stage":
            return repo_id, None
        return repo_id, self.branch.format(stage=stage)

    @property
    def needs_user(self) -> bool:
        return self.repo_id is not None and "user" in _template_fields(self.repo_id, "hub.repo_id")


def _template_fields(template: str, key: str) -> set[str]:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{key} {template!r} is not a valid template ({e}).") from None
    unknown = fields - {"stage", "user"}
    if unknown:
        raise ValueError(f"{key} {template!r} uses unknown placeholder(s) {', '.join(sorted(unknown))}; "
                         "only {stage} and {user} are filled in.")
    return fields


# --------------------------------------------------------------------------------------------------- reading
def _config_summary(config: dict | None) -> dict[str, Any]:
    """Sizes and exact parameter counts of a config.json of any supported family (`intermediate_size` and
    `num_local_experts` hold the routed experts' width and count, whatever the family calls them)."""
    if not config:
        return {}
    summary = {k: config.get(k) for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads",
                                           "num_hidden_layers", "num_local_experts", "num_experts_per_tok")}
    try:
        from .architectures import config_from_dict, count_parameters, get_architecture

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
    from .schedule import human_count

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

    from . import __version__

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

    model_summary = _config_summary(config)
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


# --------------------------------------------------------------------------------------------------- publishing
def _publishable_files(stage_dir: Path) -> list[Path]:
    files = []
    for path in sorted(stage_dir.rglob("*")):
        rel = path.relative_to(stage_dir)
        if not path.is_file() or any(part.startswith(_SKIP_PREFIXES) for part in rel.parts):
            continue
        files.append(path)
    return files


def is_complete_stage(stage_dir: str | os.PathLike) -> bool:
    """A saved model directory holds `stage.json`, a `config.json` (or a LoRA `adapter_config.json`) and at least one
    `*.safetensors` weights file."""
    stage_dir = Path(stage_dir)
    has_config = (stage_dir / "config.json").is_file() or (stage_dir / "adapter_config.json").is_file()
    return stage_dir.is_dir() and (stage_dir / "stage.json").is_file() and has_config and any(
        p.suffix == ".safetensors" and p.name != "scores.safetensors" for p in stage_dir.iterdir())


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "<redacted token>") if secret else text


def _commit_message(info: dict, config_summary: dict, files: list[str]) -> tuple[str, str]:
    from .schedule import human_count

    stage, num_stages, method = info.get("stage"), info.get("num_stages"), info.get("method")
    what = f"stage {stage}/{num_stages}" if stage is not None else (method or "model")
    sizes = []
    if config_summary.get("intermediate_size") is not None:
        sizes.append(f"d_expert {config_summary['intermediate_size']}")
    if config_summary.get("num_attention_heads") is not None:
        sizes.append(f"heads {config_summary['num_attention_heads']}/{config_summary['num_key_value_heads']}")
    if config_summary.get("num_parameters"):
        sizes.append(f"{human_count(config_summary['num_parameters'], digits=2)} params")
    kl = (info.get("eval") or {}).get("kl")
    if kl is not None:
        sizes.append(f"eval KL {kl:.4g}")
    title = f"SlimMoE {what}" + (f" ({', '.join(sizes)})" if sizes else "")
    description = "Files of the model (unchanged ones are not uploaded again):\n" + "\n".join(f"- {f}" for f in files)
    return title, description


@contextlib.contextmanager
def hub_timeouts() -> Iterator[float]:
    """
    Give every request of `huggingface_hub`'s shared HTTP client (`get_session()`) a timeout for the duration of the
    block: `huggingface_hub.constants.HF_HUB_DOWNLOAD_TIMEOUT` seconds (env `HF_HUB_DOWNLOAD_TIMEOUT`) to connect,
    send a chunk or receive one. The client otherwise waits forever on calls such as `create_repo` or
    `create_commit` (only downloads and `whoami` take a timeout argument). Yields the timeout in seconds; the
    client's previous setting is restored afterwards.
    """
    from huggingface_hub import constants, get_session

    session = get_session()
    previous = session.timeout
    seconds = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    session.timeout = seconds
    try:
        yield seconds
    finally:
        session.timeout = previous


def _transport_error(error: Exception) -> bool:
    """An error of the HTTP client itself (timeout, connection refused or reset), not an answer of the server."""
    return type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "h11", "hf_xet")


def publish_stage(stage_dir: str | os.PathLike, settings: HubSettings, token: str | None = None) -> bool:
    """Push one saved model directory (weights, tokenizer, config, card, plot, JSON files) to the Hub.

    Creates the repository (and the stage's branch with the branch-per-stage layout) if needed, regenerates the card
    with the repository id in its snippets, then commits only the files that differ from the remote ones, so an
    unchanged directory makes no new commit. The endpoint is `huggingface_hub`'s (`HF_ENDPOINT`); `token` defaults
    to `HF_TOKEN` or the login cache.

    Returns `True` when the remote holds the directory's files afterwards (pushed now or already), `False` when the
    push failed for a network, server or authentication reason (including a Hub that does not answer within
    `HF_HUB_DOWNLOAD_TIMEOUT` seconds, see `hub_timeouts`); that failure is logged as a warning, never raised.
    A directory that is not a complete saved model, or settings without a `repo_id`, raise a `ValueError`.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
    from huggingface_hub.utils import get_token

    stage_dir = Path(stage_dir)
    if not is_complete_stage(stage_dir):
        raise ValueError(f"{stage_dir} is not a complete saved model (stage.json, config.json or adapter_config.json, "
                         "and a *.safetensors weights file are required); finish or re-run the stage before pushing "
                         "it.")
    if not settings.repo_id:
        raise ValueError("hub.repo_id is not set: set it in the recipe's hub section, e.g. "
                         "'{user}/phi-tiny-moe-stage{stage}'.")
    info = read_json(stage_dir / "stage.json", missing_ok=True) or {}
    stage = info.get("stage", info.get("method", "final"))
    secret = token or get_token()
    api = HfApi(token=token)
    where = f"{settings.repo_id} (stage {stage})"
    later = "The stage stays complete on disk; run `slimmoe push` on the output directory to publish it later."
    timeout = None
    try:
        with hub_timeouts() as timeout:
            user = api.whoami()["name"] if settings.needs_user else None
            repo_id, branch = settings.target(stage, user=user)
            where = repo_id + (f"@{branch}" if branch else "")
            return _push(api, stage_dir, settings, info, user, repo_id, branch)
    except LocalTokenNotFoundError:
        logger.warning("Could not push %s to %s: no Hugging Face token found. Set HF_TOKEN or run `hf auth login`, "
                       "then run `slimmoe push` on the output directory.", stage_dir, where)
    except (HfHubHTTPError, OSError, ValueError) as e:  # ValueError: malformed server answers, LFS batch errors
        logger.warning("Could not push %s to %s: %s: %s. %s", stage_dir, where, type(e).__name__,
                       _redact(str(e), secret), later)
    except Exception as e:  # transport errors of the HTTP client (connection refused, timeouts, ...)
        if not _transport_error(e):
            raise
        if "timeout" in type(e).__name__.lower():
            logger.warning("Could not push %s to %s: the Hub at %s did not answer within %g s (%s). %s Set "
                           "HF_HUB_DOWNLOAD_TIMEOUT to wait longer on a slow connection.", stage_dir, where,
                           constants.ENDPOINT, timeout, type(e).__name__, later)
        else:
            logger.warning("Could not push %s to %s: %s: %s. %s", stage_dir, where, type(e).__name__,
                           _redact(str(e), secret), later)
    return False


def _push(api, stage_dir: Path, settings: HubSettings, info: dict, user: str | None, repo_id: str,
          branch: str | None) -> bool:
    """The Hub calls of `publish_stage` after the target is known: card, repository, branch, changed files, commit."""
    from huggingface_hub import CommitOperationAdd

    stage = info.get("stage", info.get("method", "final"))
    where = repo_id + (f"@{branch}" if branch else "")
    parent_repo_id = None
    if isinstance(stage, int) and stage > 1:
        parent_repo_id = "@".join(x for x in settings.target(stage - 1, user=user) if x)
    write_model_card(stage_dir, repo_id=repo_id, revision=branch, parent_repo_id=parent_repo_id)

    api.create_repo(repo_id, private=settings.private, exist_ok=True)
    if branch is not None:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    head = api.model_info(repo_id, revision=branch).sha
    files = _publishable_files(stage_dir)
    names = [p.relative_to(stage_dir).as_posix() for p in files]
    config = _config_summary(read_json(stage_dir / "config.json", missing_ok=True))
    title, description = _commit_message(info, config, names)
    # create_commit drops the files whose content the Hub has already and makes no commit when none is left
    commit = api.create_commit(
        repo_id,
        operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for name, p in zip(names, files)],
        commit_message=title,
        commit_description=description,
        revision=branch,
    )
    if commit.oid == head:
        logger.info("%s is up to date with %s: nothing to push.", stage_dir, where)
    else:
        logger.info("Pushed %s to %s (commit %s).", stage_dir, where, commit.oid)
    return True


def read_hub_settings(output_dir: str | os.PathLike) -> HubSettings:
    """The `hub:` section of `OUTPUT_DIR/recipe.yaml` as `HubSettings`."""
    import yaml

    recipe = Path(output_dir) / "recipe.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"No recipe.yaml in {output_dir}: pass the output directory of `slimmoe compress`.")
    with open(recipe, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    return HubSettings.from_dict(values.get("hub"))


__all__ = [
    "HubSettings",
    "write_model_card",
    "plot_trajectory",
    "publish_stage",
    "is_complete_stage",
    "read_hub_settings",
]
