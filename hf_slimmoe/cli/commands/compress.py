"""`slimmoe compress`: run a compression recipe, stage by stage (score, prune, distill, save, card, push)."""

from __future__ import annotations

from .base import Command, check_output_dir


class CompressCommand(Command):
    name = "compress"
    help = "run a compression recipe: score -> prune -> distill -> save -> card -> push, stage by stage"
    description = (
        "Run a SlimMoE compression recipe (see recipes/). Every finished stage is saved to OUTPUT_DIR/stage-i/ as a "
        "Hub-ready model; re-running the same command after an interruption continues from the last finished stage "
        "and the latest checkpoint of the running one. Under `accelerate launch` it trains on all processes."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("recipe", help="recipe YAML file")
        parser.add_argument("--dry-run", action="store_true",
                            help="check everything (files, sizes, vocabulary, training arguments) and print the plan; "
                            "no compute")
        parser.add_argument("--output-dir", help="override the recipe's output_dir")
        parser.add_argument("--overwrite", action="store_true",
                            help="start fresh: remove what an earlier run left in the output directory (stages, built "
                            "teacher, teacher cache) instead of refusing when it was made by another recipe or teacher")
        parser.add_argument("--reuse-stale", action="store_true",
                            help="reuse what the output directory holds even though it was made by another recipe or "
                            "teacher (the differences are logged and remembered)")

    def run(self, args, extra_args) -> int:
        from ...compression.loop import compress
        from ...compression.plan import plan_text
        from ...compression.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        if args.output_dir:
            recipe.output_dir = args.output_dir
        check_output_dir(recipe.output_dir, "output_dir", resumable=True)
        if args.overwrite and args.reuse_stale:
            raise ValueError("--overwrite and --reuse-stale exclude each other: start fresh, or reuse what is there.")
        output_dir = compress(recipe, dry_run=args.dry_run, overwrite=args.overwrite, reuse_stale=args.reuse_stale)
        if args.dry_run:
            print(plan_text(recipe))
            print(f"{args.recipe}: OK (dry run; nothing computed). Output would go to {output_dir}")
        else:
            print(f"Compressed model stages are in {output_dir}")
        return 0
