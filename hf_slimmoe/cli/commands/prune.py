"""`slimmoe prune`: slim experts and drop GQA groups by sensitivity scores; save a complete model directory."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from .base import Command

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
        parser.add_argument("model", help="checkpoint directory of any supported MoE family (SlimMoE, Mixtral, ...)")
        parser.add_argument("--scores", required=True, help="scores file written by `slimmoe score`")
        parser.add_argument("--output-dir", required=True, help="directory to write the pruned model to")
        parser.add_argument("--intermediate-size", type=int, default=None,
                            help="new routed-expert width, whatever the family calls it (default: unchanged)")
        parser.add_argument("--num-key-value-heads", type=int, default=None,
                            help="GQA groups to keep; query heads follow (default: unchanged)")
        parser.add_argument("--shared-expert-width", type=int, default=None,
                            help="new shared-expert width (Qwen2-MoE, DeepSeek; default: the family's rule)")

    def run(self, args, extra_args) -> int:
        from transformers import AutoTokenizer

        from ...architectures import count_parameters, get_architecture, load_model, slim_config
        from ...pruning import SensitivityScores, prune_to
        from ...schedule import human_count

        scores = SensitivityScores.load(args.scores)  # fail on a missing/bad file before loading the model
        if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
            raise ValueError(f"--output-dir {args.output_dir} exists and is not empty; choose a new directory.")
        model = load_model(args.model, dtype="auto")
        before = count_parameters(model.config)[0]
        target = slim_config(model.config, expert_width=args.intermediate_size,
                             num_key_value_heads=args.num_key_value_heads, shared_expert_width=args.shared_expert_width)
        prune_to(model, target, scores)
        parent = os.path.dirname(os.path.abspath(args.output_dir))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".prune-", dir=parent)  # complete, then renamed: never half-written
        try:
            model.save_pretrained(staging)
            try:
                AutoTokenizer.from_pretrained(args.model).save_pretrained(staging)
            except (OSError, ValueError):
                logger.warning("No tokenizer found in %s; saved the model only.", args.model)
            if os.path.isdir(args.output_dir):
                os.rmdir(args.output_dir)
            os.replace(staging, args.output_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        after = count_parameters(model.config)[0]
        width = get_architecture(model).expert_width_of(model.config)
        print(f"pruned {args.model} -> {args.output_dir}: intermediate_size {width}, heads "
              f"{model.config.num_attention_heads}/{model.config.num_key_value_heads}, parameters "
              f"{human_count(before, digits=2)} -> {human_count(after, digits=2)}")
        return 0
