"""`slimmoe push`: publish the complete stages of an output directory to the Hub."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from .base import Command

logger = logging.getLogger("hf_slimmoe")


class PushCommand(Command):
    name = "push"
    help = "publish the complete stages of an output directory to the Hub (what is missing or changed)"
    description = (
        "Push every complete OUTPUT_DIR/stage-N/ to the Hub as the `hub:` section of OUTPUT_DIR/recipe.yaml says "
        "(repo per stage or branch per stage, private or public), regenerating each card with its Hub id. Unchanged "
        "stages make no new commit, so re-running after a failed push publishes only what is missing. The token comes "
        "from HF_TOKEN or `hf auth login`; the endpoint from HF_ENDPOINT. Every request times out after "
        "HF_HUB_DOWNLOAD_TIMEOUT seconds (default 10), with huggingface_hub's bounded retries. Exit status 1 if any "
        "push failed."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("output_dir",
                            help="output directory of `slimmoe compress` (holds recipe.yaml and stage-N/)")
        parser.add_argument("--stage", type=int, default=None, help="push only this stage")
        parser.add_argument("--repo-id", default=None, help="override hub.repo_id of the recipe")
        parser.add_argument("--layout", choices=["repo-per-stage", "branch-per-stage"], default=None,
                            help="override hub.layout of the recipe")
        parser.add_argument("--private", action="store_true", default=None, help="create the repositories private")

    def run(self, args, extra_args) -> int:
        from ...compression.provenance import stage_dirs
        from ...hub import HubSettings, is_complete_stage, publish_stage, read_hub_settings

        settings = read_hub_settings(args.output_dir)
        overrides = {k: v for k, v in (("repo_id", args.repo_id), ("layout", args.layout), ("private", args.private))
                     if v is not None}
        settings = HubSettings(**{**dataclasses.asdict(settings), **overrides})
        if not settings.repo_id:
            raise ValueError(f"No hub.repo_id in {os.path.join(args.output_dir, 'recipe.yaml')}: set it there or pass "
                             "--repo-id, e.g. '{user}/phi-tiny-moe-stage{stage}'.")
        dirs = [Path(d) for d in stage_dirs(args.output_dir)]
        if args.stage is not None:
            dirs = [d for d in dirs if d.name == f"stage-{args.stage}"]
            if not dirs:
                raise FileNotFoundError(f"No stage-{args.stage}/ in {args.output_dir}.")
        pushed, skipped, failed = [], [], []
        for stage_dir in dirs:
            if not is_complete_stage(stage_dir):
                skipped.append(stage_dir.name)
                logger.info("Skipping %s: not a complete stage (no stage.json, config.json or weights yet).",
                            stage_dir)
                continue
            (pushed if publish_stage(stage_dir, settings) else failed).append(stage_dir.name)
        print(f"pushed (or already up to date): {', '.join(pushed) or 'none'}")
        print(f"skipped (incomplete): {', '.join(skipped) or 'none'}")
        print(f"failed: {', '.join(failed) or 'none'}")
        if failed:
            print(f"slimmoe push: error: {len(failed)} stage(s) not pushed ({', '.join(failed)}; the warnings "
                  f"above say why); they stay complete on disk: run `slimmoe push {args.output_dir}` again to "
                  "publish them.",
                  file=sys.stderr)
        return 1 if failed else 0
