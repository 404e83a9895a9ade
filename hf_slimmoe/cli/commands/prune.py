"""`slimmoe prune`: slim experts and drop GQA groups by sensitivity scores; save a complete model directory."""

from __future__ import annotations

from .base import Command


class PruneCommand(Command):
    name = "prune"
    help = "slim experts and drop GQA groups by sensitivity scores; save a model that loads with from_pretrained"
    description = (
        "Prune a checkpoint with scores from `slimmoe score`: every expert keeps its highest-scoring "
        "--intermediate-size neurons, every layer its highest-scoring --num-key-value-heads GQA groups (with their "
        "query heads). Streams: reads the (sharded) safetensors checkpoint one tensor at a time and writes the pruned "
        "shards as it goes, so checkpoints larger than memory prune on a small machine; the output (weights in the "
        "input's layout and shard split, index, config, generation config, tokenizer, stage.json and card) holds "
        "exactly the tensors loading, pruning and saving the model would."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", help="SlimMoE or PhiMoE checkpoint directory")
        parser.add_argument("--scores", required=True, help="scores file written by `slimmoe score`")
        parser.add_argument("--output-dir", required=True, help="directory to write the pruned model to")
        parser.add_argument("--intermediate-size", type=int, default=None, help="new expert width (default: unchanged)")
        parser.add_argument("--num-key-value-heads", type=int, default=None,
                            help="GQA groups to keep; query heads follow (default: unchanged)")

    def run(self, args, extra_args) -> int:
        from ...pruning import SensitivityScores
        from ...pruning.streaming import prune_checkpoint, read_source_config
        from ...schedule import human_count

        scores = SensitivityScores.load(args.scores)  # fail on a missing/bad file before reading the checkpoint
        config = read_source_config(args.model)
        target = config.slimmed(intermediate_size=args.intermediate_size,
                                num_key_value_heads=args.num_key_value_heads)
        prune_checkpoint(args.model, args.output_dir, target, scores)  # streams: one tensor in memory at a time
        print(f"pruned {args.model} -> {args.output_dir}: intermediate_size {target.intermediate_size}, heads "
              f"{target.num_attention_heads}/{target.num_key_value_heads}, parameters "
              f"{human_count(config.num_parameters(), digits=2)} -> {human_count(target.num_parameters(), digits=2)}")
        return 0
