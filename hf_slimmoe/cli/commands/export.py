"""`slimmoe export`: a stock `model_type: phimoe` checkpoint that plain transformers loads without this plugin."""

from __future__ import annotations

import logging

from ...utils.outputs import staged_directory
from .base import Command, check_model_path, check_output_dir

logger = logging.getLogger("hf_slimmoe")


class ExportCommand(Command):
    name = "export"
    help = "write a stock model_type: phimoe checkpoint that plain transformers loads without this plugin"
    description = (
        "Load a SlimMoE (or PhiMoE) checkpoint and save it as a stock PhiMoE checkpoint (config.json with model_type "
        "phimoe and an explicit head_dim; safetensors in the per-expert key layout), with its tokenizer and "
        "generation config, loadable by AutoModelForCausalLM with no remote code."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", help="SlimMoE or PhiMoE checkpoint directory")
        parser.add_argument("output_dir", help="directory to write the stock checkpoint to (new or empty)")
        parser.add_argument("--overwrite", action="store_true",
                            help="replace the model OUTPUT_DIR already holds (refused without it, and refused for a "
                            "non-empty directory that holds no model)")

    def run(self, args, extra_args) -> int:
        check_model_path(args.model, "MODEL")
        check_output_dir(args.output_dir, "OUTPUT_DIR", overwrite=args.overwrite)
        from transformers import AutoTokenizer

        from ...model.modeling_slimmoe import SlimMoeForCausalLM

        model = SlimMoeForCausalLM.from_pretrained(args.model)
        with staged_directory(args.output_dir) as staging:  # the old files go only once the new ones are complete
            model.export_phimoe(staging)
            try:
                AutoTokenizer.from_pretrained(args.model).save_pretrained(staging)
            except (OSError, ValueError):
                logger.warning("No tokenizer found in %s; exported the model only.", args.model)
        print(f"exported {args.model} -> {args.output_dir} (model_type phimoe)")
        return 0
