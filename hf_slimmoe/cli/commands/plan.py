"""`slimmoe plan`: the stage table of a recipe, or of a teacher config and a target (nothing is downloaded)."""

from __future__ import annotations

import json
import os

from .base import Command, positive_int
from .info import describe


class PlanCommand(Command):
    name = "plan"
    help = "print the stage table of a recipe, or of a teacher config and a target (nothing is downloaded)"
    description = (
        "Print the multi-stage plan: per stage d_expert, heads q/kv, total and active parameters, % of the teacher, "
        "and the training budget. With RECIPE.yaml the numbers come from the recipe (teacher.architecture or "
        "teacher.build); otherwise give --teacher (a checkpoint directory or config.json) and the target sizes."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("recipe", nargs="?", help="a compression recipe YAML (e.g. recipes/phi-tiny-moe.yaml)")
        parser.add_argument("--teacher",
                            help="checkpoint directory or config.json of the model to compress (without RECIPE)")
        parser.add_argument("--intermediate-size", type=positive_int,
                            help="target routed-expert width d_expert, whatever the family calls it (without RECIPE)")
        parser.add_argument("--num-key-value-heads", type=positive_int,
                            help="target number of GQA groups (without RECIPE)")
        parser.add_argument("--num-stages", type=positive_int, default=2,
                            help="number of stages T (without RECIPE; default 2)")
        parser.add_argument("--expert-multiple", type=positive_int, default=64,
                            help="round intermediate expert widths to a multiple of this (without RECIPE; default 64)")
        parser.add_argument("--json", action="store_true", help="print the rows as JSON")

    def run(self, args, extra_args) -> int:
        if args.recipe:
            return self.run_recipe(args)
        if not args.teacher:
            raise ValueError("give RECIPE.yaml, or --teacher with --intermediate-size and/or --num-key-value-heads.")
        from transformers import PretrainedConfig

        from ...architectures import config_from_dict, slim_config
        from ...pruning.schedule import format_plan, plan_rows, plan_stages

        describe(args.teacher)  # names a missing file or an unsupported family
        config_file = os.path.join(args.teacher, "config.json") if os.path.isdir(args.teacher) else args.teacher
        teacher = config_from_dict(PretrainedConfig.get_config_dict(config_file)[0])  # any supported family
        target = slim_config(teacher, expert_width=args.intermediate_size,
                             num_key_value_heads=args.num_key_value_heads)
        stages = plan_stages(teacher, target, args.num_stages, expert_multiple=args.expert_multiple)
        print(json.dumps(plan_rows(teacher, stages), indent=2) if args.json else format_plan(teacher, stages))
        return 0

    @staticmethod
    def run_recipe(args) -> int:
        from ...compression.plan import plan_text
        from ...compression.recipe import load_recipe
        from ...compression.teacher import read_teacher_config
        from ...pruning.schedule import plan_rows

        recipe = load_recipe(args.recipe)
        if args.json:
            teacher = recipe.teacher_config() or read_teacher_config(recipe)
            print(json.dumps(plan_rows(teacher, recipe.stage_configs(teacher)), indent=2))
        else:
            print(plan_text(recipe))
        return 0
