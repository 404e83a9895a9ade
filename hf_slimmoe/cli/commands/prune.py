"""`slimmoe prune`: slim experts and drop GQA groups by sensitivity scores; save a complete model directory."""

from __future__ import annotations

import copy
import logging
import os

from ...utils.outputs import staged_directory
from .base import Command, check_model_path, check_output_dir, positive_int

logger = logging.getLogger(__name__)


class PruneCommand(Command):
    name = "prune"
    help = "slim experts and drop GQA groups by sensitivity scores; save a model that loads with from_pretrained"
    description = (
        "Prune a checkpoint with scores from `slimmoe score`: every expert keeps its highest-scoring "
        "--intermediate-size neurons, every layer its highest-scoring --num-key-value-heads GQA groups (with their "
        "query heads). Safetensors checkpoints of every supported family (SlimMoE / PhiMoE, Mixtral, Qwen2/3-MoE, "
        "OLMoE, DeepSeek, gpt-oss) stream: the (sharded) checkpoint is read one tensor at a time and the pruned "
        "shards are written as it goes, so checkpoints larger than memory prune on a small machine; the output "
        "(weights in the input's layout and shard split, index, config, generation config, tokenizer, stage.json and "
        "card) holds exactly the tensors loading, pruning and saving the model would, and loads as the stock family. "
        "Checkpoints stored otherwise (pytorch_model.bin) are pruned in memory."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", help="checkpoint directory of any supported MoE family (SlimMoE, Mixtral, ...)")
        parser.add_argument("--scores", required=True, help="scores file written by `slimmoe score`")
        parser.add_argument("--output-dir", required=True, help="directory to write the pruned model to")
        parser.add_argument("--intermediate-size", type=positive_int, default=None,
                            help="new routed-expert width, whatever the family calls it (default: unchanged)")
        parser.add_argument("--num-key-value-heads", type=positive_int, default=None,
                            help="GQA groups to keep; query heads follow (default: unchanged)")
        parser.add_argument("--shared-expert-width", type=positive_int, default=None,
                            help="new shared-expert width (Qwen2-MoE, DeepSeek; default: the family's rule)")

    def run(self, args, extra_args) -> int:
        from ...pruning import SensitivityScores
        from ...pruning.streaming import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

        check_model_path(args.model, "MODEL")
        check_output_dir(args.output_dir, "--output-dir")
        scores = SensitivityScores.load(args.scores)  # fail on a missing/bad file before reading the checkpoint
        stored = [os.path.join(args.model, name) for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)]
        if any(os.path.isfile(path) for path in stored) or not os.path.isfile(os.path.join(args.model, "config.json")):
            return self.run_streaming(args, scores)
        return self.run_in_memory(args, scores)  # weights not in safetensors (e.g. pytorch_model.bin)

    @staticmethod
    def run_streaming(args, scores) -> int:
        from ...architectures import slim_config
        from ...pruning.streaming import prune_checkpoint, read_source_config

        config = read_source_config(args.model)
        target = slim_config(config, expert_width=args.intermediate_size, num_key_value_heads=args.num_key_value_heads,
                             shared_expert_width=args.shared_expert_width)
        prune_checkpoint(args.model, args.output_dir, target, scores)  # streams: one tensor in memory at a time
        print(pruned_summary(args, config, target))
        return 0

    @staticmethod
    def run_in_memory(args, scores) -> int:
        """Load, `prune_to`, save (complete, then renamed into place): a stock checkpoint of the model's family."""
        from transformers import AutoTokenizer

        from ...architectures import load_model, slim_config
        from ...pruning import prune_to

        model = load_model(args.model, dtype="auto")
        source = copy.deepcopy(model.config)
        target = slim_config(model.config, expert_width=args.intermediate_size,
                             num_key_value_heads=args.num_key_value_heads, shared_expert_width=args.shared_expert_width)
        prune_to(model, target, scores)
        with staged_directory(args.output_dir) as staging:  # complete, then renamed: never half-written
            model.save_pretrained(staging)
            try:
                AutoTokenizer.from_pretrained(args.model).save_pretrained(staging)
            except (OSError, ValueError):
                logger.warning("No tokenizer found in %s; saved the model only.", args.model)
        print(pruned_summary(args, source, model.config))
        return 0


def pruned_summary(args, source, target) -> str:
    """The line `slimmoe prune` prints: the new expert width and heads, and the total parameters before and after."""
    from ...architectures import count_parameters, get_architecture
    from ...utils.outputs import human_count

    return (f"pruned {args.model} -> {args.output_dir}: intermediate_size "
            f"{get_architecture(target).expert_width_of(target)}, heads {target.num_attention_heads}/"
            f"{target.num_key_value_heads}, parameters {human_count(count_parameters(source)[0], digits=2)} -> "
            f"{human_count(count_parameters(target)[0], digits=2)}")
