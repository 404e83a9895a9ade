"""`slimmoe distill`: distill a student from a teacher (online or cached); options are DistillationConfig's fields."""

from __future__ import annotations

import json

from .base import DataclassCommand, check_model_path, check_output_dir


class DistillCommand(DataclassCommand):
    name = "distill"
    help = "distill a student checkpoint from a teacher (online or cached) with KD (--kd_loss) + MoE aux loss"
    description = (
        "Distill --student on --dataset with KD from the teacher (--teacher_model_name_or_path, or the teacher "
        "cache columns of `slimmoe cache-teacher` in the dataset) plus the MoE load-balancing loss, and save the "
        "result to --output_dir. --kd_loss picks the objective: sampled (default; a samples cache), topk_tail or topk "
        "(a top-k cache), full (online teacher only). Every field of DistillationConfig (transformers' "
        "TrainingArguments plus kd_loss, kd_samples, top_k, temperature, renormalize, aux_loss_coef, ce_weight, "
        "kd_chunk_size, eval_full_kl) is a flag; --config FILE.yaml (or FILE.yaml "
        "as the first argument) sets any of them, and flags given on the command line override the file. Runs "
        "unchanged under `torchrun` / `accelerate launch`."
    )

    def dataclass_types(self) -> tuple[type, ...]:
        from ...distillation import DistillationConfig
        from ...distillation.run import DistillScriptArguments

        return DistillScriptArguments, DistillationConfig

    def run(self, args, extra_args) -> int:
        from ...distillation.run import run_distill

        (script_args, config), _ = self.parse(extra_args)
        check_model_path(script_args.student, "--student")
        check_output_dir(config.output_dir, "--output_dir", resumable=True)  # its checkpoints are resumed from
        metrics = run_distill(script_args, config)
        if metrics and config.process_index == 0:
            print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
        return 0
