"""`slimmoe info`: architecture and total/active parameter counts of a checkpoint or config.json."""

from __future__ import annotations

import json
import logging
import os
import tempfile

from .base import Command, check_safetensors_header

logger = logging.getLogger("hf_slimmoe")


def tiny_checkpoint(directory: str) -> str:
    """Save a tiny random SlimMoE model to `directory` (what `slimmoe info` reports on without a path)."""
    import torch

    from ... import SlimMoeConfig, SlimMoeForCausalLM

    torch.manual_seed(0)
    config = SlimMoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                           attention_bias=True, lm_head_bias=True, max_position_embeddings=256)
    SlimMoeForCausalLM(config).save_pretrained(directory)
    return directory


def checkpoint_tensor_count(directory: str) -> int | None:
    """Parameters stored in a directory's safetensors files, read from their headers only."""
    from safetensors import safe_open

    files = [f for f in sorted(os.listdir(directory))  # the weights, not a stage's scores.safetensors
             if f.endswith(".safetensors") and f.startswith("model")]
    if not files:
        return None
    total = 0
    for name in files:
        check_safetensors_header(os.path.join(directory, name))
        with safe_open(os.path.join(directory, name), "pt") as f:
            for key in f.keys():
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total


def describe(path: str) -> dict:
    """Architecture and parameter counts of a checkpoint directory or a config.json of any supported family, as a
    dict (`intermediate_size` / `num_local_experts`: the routed experts' width and count, whatever the family calls
    them), with what SlimMoE slims and keeps (`slimming`, see `slimming_summary`) or why it refuses the model
    (`refused`, and no expert or parameter counts)."""
    from ...architectures import (
        SUPPORTED_MODEL_TYPES,
        UnsupportedArchitecture,
        config_from_dict,
        count_parameters,
        get_architecture,
    )
    from ...architectures.table import slimming_summary

    config_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No config.json at {path}: pass a checkpoint directory or a config.json file.")
    from transformers import PretrainedConfig

    values, _ = PretrainedConfig.get_config_dict(config_file)  # JSON-encoded infinities decoded as transformers does
    model_type = values.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{config_file} has model_type {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    config = config_from_dict(values)
    info = {
        "path": path,
        "model_type": model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
    }
    try:
        arch = get_architecture(config)
    except UnsupportedArchitecture as error:
        info["refused"] = str(error)
    else:
        total, active = count_parameters(config)
        info.update({
            "num_local_experts": arch.num_experts_of(config),
            "num_experts_per_tok": arch.top_k_of(config),
            "intermediate_size": arch.expert_width_of(config),
            "shared_expert_width": arch.shared_width_of(config),
            "head_dim": arch.head_dim_of(config),
            "num_parameters": total,
            "num_active_parameters": active,
            "slimming": slimming_summary(arch, config),
        })
    if os.path.isdir(path):
        info["stored_parameters"] = checkpoint_tensor_count(path)
    return info


class InfoCommand(Command):
    name = "info"
    help = "print the architecture and total/active parameter counts of a checkpoint or config.json"
    description = (
        "Print the architecture, the exact total/active parameter counts and what SlimMoE slims, prunes and keeps "
        "(or why it refuses the model) for a checkpoint directory or config.json of any supported MoE family "
        "(nothing is loaded but the config and the safetensors headers). Without PATH, builds a tiny SlimMoE model "
        "in-process, saves it to a temporary directory and reports on it."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("path", nargs="?", help="checkpoint directory or config.json (default: a tiny model)")
        parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")

    def run(self, args, extra_args) -> int:
        from ...utils.outputs import human_count

        if args.path is None:
            directory = tempfile.mkdtemp(prefix="slimmoe-tiny-")
            logger.info("No PATH given: building a tiny SlimMoE model in %s", directory)
            args.path = tiny_checkpoint(directory)
        info = describe(args.path)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        rows = [("checkpoint", info["path"]), ("model_type", info["model_type"]),
                ("layers", info["num_hidden_layers"]), ("hidden size", info["hidden_size"])]
        if "refused" in info:
            rows += [("heads q/kv", f"{info['num_attention_heads']}/{info['num_key_value_heads']}"),
                     ("vocab", info["vocab_size"]), ("SlimMoE", f"refused: {info['refused']}")]
        else:
            total, active, slimming = info["num_parameters"], info["num_active_parameters"], info["slimming"]
            rows += [
                ("experts", f"{info['num_local_experts']} (top-{info['num_experts_per_tok']})"),
                ("d_expert", info["intermediate_size"]),
                *([("d_shared (shared experts)", info["shared_expert_width"])] if info["shared_expert_width"] else []),
                ("heads q/kv",
                 f"{info['num_attention_heads']}/{info['num_key_value_heads']} (head_dim {info['head_dim']})"),
                ("vocab", info["vocab_size"]),
                ("total parameters", f"{total:,} ({human_count(total, digits=2)})"),
                ("active parameters", f"{active:,} ({human_count(active, digits=2)})"),
                ("slimmed: routed experts", slimming["experts"]),
                ("slimmed: shared experts", slimming["shared"]),
                ("attention pruning", slimming["attention"]),
                ("kept as they are", slimming["kept"]),
                ("aux loss", slimming["aux_loss"]),
                ("exports as", slimming["export"]),
            ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {str(value).replace('`', '')}")
        return 0
