"""`slimmoe cache-teacher`: run the teacher once over a dataset and store what a KD loss reads per token
(top-k or samples; resumable)."""

from __future__ import annotations

from .base import Command, check_model_path, check_output_dir, positive_int


class CacheTeacherCommand(Command):
    name = "cache-teacher"
    help = "run the teacher once over a dataset and store what a KD loss reads from it per token (resumable)"
    description = (
        "Run the teacher once over DATA and save DATA plus the teacher cache columns to OUTPUT with "
        "`datasets.save_to_disk`: with --kd-loss topk / topk_tail (the default; also what evaluation reads) "
        "teacher_topk_ids (int32) and teacher_topk_logprobs (log-probs relative to the full vocabulary); with "
        "--kd-loss sampled teacher_sample_packed (--num-samples draws per token from the teacher at --temperature, "
        "packed in ceil(log2 vocab) bits each), plus a fingerprint of each row's input_ids. The dataset records the "
        "teacher's fingerprint and the settings; training refuses a cache made for another loss, teacher, k, S or "
        "temperature. Every distillation stage then trains without a teacher forward. Interrupted runs continue from "
        "OUTPUT.partial/ when re-run. DATA: a save_to_disk directory with input_ids (or a text column), or a "
        ".jsonl/.txt file tokenized with the teacher's tokenizer. Under `torchrun` or `accelerate launch` the shards "
        "are split over the processes, each writing its own, and the result is the same as one process's."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("teacher", help="teacher checkpoint directory (PhiMoE or SlimMoE)")
        parser.add_argument("data", help="dataset directory or .jsonl/.txt file")
        parser.add_argument("output", help="directory to write the cached dataset to")
        parser.add_argument("--kd-loss", choices=("topk", "topk_tail", "sampled"), default="topk",
                            help="the loss the cache is for: topk / topk_tail store the top-k (default: topk), "
                            "sampled stores teacher samples")
        parser.add_argument("--top-k", type=positive_int, default=8,
                            help="teacher tokens kept per position (default: 8)")
        parser.add_argument("--num-samples", type=positive_int, default=8,
                            help="--kd-loss sampled: draws per position (default: 8)")
        parser.add_argument("--temperature", type=float, default=1.0,
                            help="--kd-loss sampled: draw at this temperature (default: 1.0)")
        parser.add_argument("--seed", type=int, default=0,
                            help="--kd-loss sampled: seed of the per-row draws (default: 0)")
        parser.add_argument("--sampling", choices=("systematic", "threshold"), default="systematic",
                            help="--kd-loss sampled: systematic draws (default), or threshold samples: "
                            "--num-samples weighted slots, the likeliest tokens kept with their probability")
        parser.add_argument("--batch-size", type=positive_int, default=8, help="rows per teacher forward (default: 8)")
        parser.add_argument("--shard-size", type=positive_int, default=512,
                            help="rows per resumable shard (default: 512)")
        parser.add_argument("--max-length", type=positive_int, default=512,
                            help="tokens kept per example of text data")
        parser.add_argument("--text-column", default="text", help="text field of .jsonl files / text datasets")
        parser.add_argument("--tokenizer", help="tokenizer directory for text data (default: the teacher directory)")
        parser.add_argument("--device", help="device of the teacher (default: cuda if available, else cpu)")

    def run(self, args, extra_args) -> int:
        import torch
        from transformers import AutoModelForCausalLM

        from ...distillation import cache_teacher_samples, cache_teacher_topk
        from ...utils.data import load_token_dataset, load_tokenizer
        from ...utils.distributed import init_from_environment

        if args.kd_loss != "sampled" and args.sampling != "systematic":
            raise ValueError(f"--sampling {args.sampling}: sampling applies to --kd-loss sampled.")
        if args.kd_loss != "sampled" and args.temperature != 1.0:
            raise ValueError(f"--temperature {args.temperature}: a top-k cache stores log-probabilities at "
                             "temperature 1; drop --temperature or use --kd-loss sampled.")
        check_output_dir(args.output, "OUTPUT", resumable=True)  # a finished or partial cache is reused
        rank, world = init_from_environment()  # under torchrun / accelerate launch every rank builds its shards
        tokenizer = load_tokenizer(args.tokenizer or args.teacher, required=False)
        dataset = load_token_dataset(args.data, tokenizer, args.text_column, args.max_length)  # data errors first
        check_model_path(args.teacher, "TEACHER")
        device = args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher).to(device)
        common = {"batch_size": args.batch_size, "output_dir": args.output, "shard_size": args.shard_size,
                  "pad_token_id": getattr(tokenizer, "pad_token_id", None) or 0}
        if args.kd_loss == "sampled":
            cached = cache_teacher_samples(teacher, dataset, num_samples=args.num_samples,
                                           temperature=args.temperature, seed=args.seed, sampling=args.sampling,
                                           **common)
            what = f"{args.num_samples} {args.sampling} teacher samples per token"
        else:
            cached = cache_teacher_topk(teacher, dataset, top_k=args.top_k, **common)
            what = f"teacher top-{args.top_k}"
        if rank == 0:
            print(f"cached {what} for {len(cached)} rows -> {args.output}" + (f" ({world} processes)" if world > 1
                                                                               else ""))
        return 0
