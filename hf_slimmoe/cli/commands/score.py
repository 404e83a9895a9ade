"""`slimmoe score`: KD (or CLM) sensitivity scores of every expert neuron and GQA group, saved as safetensors."""

from __future__ import annotations

from .base import Command, check_model_path, check_output_file, positive_int


class ScoreCommand(Command):
    name = "score"
    help = "compute KD (or CLM) sensitivity scores of every expert neuron and GQA group; write a safetensors file"
    description = (
        "Compute SlimMoE sensitivity scores (|grad * W|, Eq. 2-4) of a checkpoint on calibration data and save them "
        "(safetensors) for `slimmoe prune`. The KD criterion uses the teacher's top-k distribution; without --teacher "
        "the model is its own teacher (stage 1). Calibration data: a `save_to_disk` dataset directory with input_ids "
        "(cached teacher_topk_* columns are used instead of a teacher forward), or a .txt/.jsonl file tokenized with "
        "the model directory's tokenizer."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", help="SlimMoE or PhiMoE checkpoint directory to score")
        parser.add_argument("--data", required=True,
                            help="dataset directory (input_ids) or .txt/.jsonl calibration file")
        parser.add_argument("--output", required=True, help="scores file to write, e.g. scores.safetensors")
        parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: the model itself)")
        parser.add_argument("--criterion", choices=("kd", "clm"), default="kd",
                            help="kd (paper, default) or clm (ablation)")
        parser.add_argument("--top-k", type=positive_int, default=8,
                            help="teacher probabilities kept by the KD loss (default 8)")
        parser.add_argument("--aux-loss-coef", type=float, default=None,
                            help="weight of the load-balancing loss (default: the model's router_aux_loss_coef)")
        parser.add_argument("--max-length", type=positive_int, default=512,
                            help="tokens per calibration example (default 512)")
        parser.add_argument("--num-examples", type=positive_int, default=None,
                            help="use the first N examples (default: all)")
        parser.add_argument("--batch-size", type=positive_int, default=4,
                            help="examples per forward/backward (default 4)")
        parser.add_argument("--tokenizer", default=None, help="tokenizer for text data (default: the model directory)")
        parser.add_argument("--text-column", default="text", help="jsonl field holding the text (default: text)")
        parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                            help="dtype to load the model(s) in (default: as stored)")
        parser.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")

    def run(self, args, extra_args) -> int:
        import torch

        from ...architectures import load_model
        from ...pruning import compute_sensitivity
        from ...utils.data import load_calibration_batches

        check_model_path(args.model, "MODEL")
        if args.teacher is not None:
            check_model_path(args.teacher, "--teacher")
        check_output_file(args.output, "--output")
        batches = load_calibration_batches(args.data, args.tokenizer or args.model, max_length=args.max_length,
                                           num_examples=args.num_examples, batch_size=args.batch_size,
                                           text_column=args.text_column)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        model = load_model(args.model, dtype=dtype).to(device)  # any supported family
        teacher = None
        if args.teacher is not None and args.criterion == "kd":
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype).to(device)
        scores = compute_sensitivity(model, batches, teacher=teacher, criterion=args.criterion, top_k=args.top_k,
                                     aux_loss_coef=args.aux_loss_coef)
        scores.metadata["model"] = args.model
        scores.metadata["teacher"] = args.teacher or "self"
        scores.save(args.output)
        print(f"scored {scores.num_layers} layers on {scores.metadata['num_tokens']} tokens -> {args.output}")
        return 0
