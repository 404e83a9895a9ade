"""`slimmoe prune`: slim experts and drop GQA groups by sensitivity scores; save a complete model directory."""

from __future__ import annotations

import logging

from .base import Command, check_model_path, check_output_dir, positive_int, staged_directory

logger = logging.getLogger("hf_slimmoe")


class PruneCommand(Command):
    name = "prune"
    help = "slim experts and drop GQA groups by sensitivity scores; save a model that loads with from_pretrained"
    description = (
        "Prune a checkpoint with scores from `slimmoe score`: every expert keeps its highest-scoring "
        "--intermediate-size neurons, every layer its highest-scoring --num-key-value-heads GQA groups (with their "
        "query heads). Writes a complete model directory (weights, config, generation config, tokenizer)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", help="SlimMoE or PhiMoE checkpoint directory")
        parser.add_argument("--scores", required=True, help="scores file written by `slimmoe score`")
        parser.add_argument("--output-dir", required=True, help="directory to write the pruned model to")
        parser.add_argument("--intermediate-size", type=positive_int, default=None,
                            help="new expert width (default: unchanged)")
        parser.add_argument("--num-key-value-heads", type=positive_int, default=None,
                            help="GQA groups to keep; query heads follow (default: unchanged)")

    def run(self, args, extra_args) -> int:
        from transformers import AutoTokenizer

        from ...modeling_slimmoe import SlimMoeForCausalLM
        from ...pruning import SensitivityScores
        from ...schedule import human_count

        check_model_path(args.model, "MODEL")
        check_output_dir(args.output_dir, "--output-dir")
        scores = SensitivityScores.load(args.scores)  # fail on a missing/bad file before loading the model
        model = SlimMoeForCausalLM.from_pretrained(args.model, dtype="auto")
        before = model.config.num_parameters()
        target = model.config.slimmed(intermediate_size=args.intermediate_size,
                                      num_key_value_heads=args.num_key_value_heads)
        model.prune_to(target, scores)
        with staged_directory(args.output_dir) as staging:  # complete, then renamed: never half-written
            model.save_pretrained(staging)
            try:
                AutoTokenizer.from_pretrained(args.model).save_pretrained(staging)
            except (OSError, ValueError):
                logger.warning("No tokenizer found in %s; saved the model only.", args.model)
        after = model.config.num_parameters()
        print(f"pruned {args.model} -> {args.output_dir}: intermediate_size {model.config.intermediate_size}, heads "
              f"{model.config.num_attention_heads}/{model.config.num_key_value_heads}, parameters "
              f"{human_count(before, digits=2)} -> {human_count(after, digits=2)}")
        return 0
