"""`slimmoe card`: (re)generate the model card and trajectory plot of a saved model directory."""

from __future__ import annotations

from .base import Command


class CardCommand(Command):
    name = "card"
    help = "(re)generate the model card README.md and trajectory.png of a saved model directory"
    description = (
        "Write README.md (model card: metadata, architecture against the teacher, lineage, training, evaluation, "
        "usage, citation) and trajectory.png into STAGE_DIR from its stage.json, trajectory.json and config.json, "
        "without training. Works on stage-N/ directories and on SFT / DPO / LoRA outputs."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("stage_dir", help="a saved model directory holding stage.json (e.g. OUTPUT_DIR/stage-2)")
        parser.add_argument("--repo-id", default=None,
                            help="Hub id to show in the usage snippets (default: the directory)")
        parser.add_argument("--template", default=None, help="a Jinja card template (default: the packaged one)")

    def run(self, args, extra_args) -> int:
        from ...hub import write_model_card

        print(write_model_card(args.stage_dir, repo_id=args.repo_id, template_path=args.template))
        return 0
