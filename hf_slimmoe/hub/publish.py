"""Publishing: every saved model directory is pushed with the real `huggingface_hub` client, one repository per stage
or one repository with a branch per stage, as `HubSettings` (a recipe's `hub:` section) says.

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
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..utils.outputs import read_json
from .cards import config_summary, write_model_card

logger = logging.getLogger(__name__)


LAYOUTS = ("repo-per-stage", "branch-per-stage")


# Files written next to the weights that describe a run but are not part of it on the Hub.
_SKIP_PREFIXES = (".", "checkpoint-", "__pycache__")


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
    from ..utils.outputs import human_count

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
    config = config_summary(read_json(stage_dir / "config.json", missing_ok=True))
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
    "LAYOUTS",
    "HubSettings",
    "is_complete_stage",
    "hub_timeouts",
    "publish_stage",
    "read_hub_settings",
]
