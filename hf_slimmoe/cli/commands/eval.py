"""`slimmoe eval`: held-out perplexity, KL to a teacher and top-1 agreement (optionally lm-eval tasks)."""

from __future__ import annotations

import json

from .base import Command, check_model_path, positive_int


class EvalCommand(Command):
    name = "eval"
    help = "held-out perplexity, KL to a teacher and top-1 agreement of a model (optionally lm-eval tasks)"
    description = (
        "Evaluate MODEL on held-out data: perplexity, and with --teacher (or a --data directory that carries a "
        "teacher top-k cache) the top-k KL to the teacher and top-1 agreement. Default data: the demo's held-out "
        "standard-library modules (email/, http/, urllib/, xml/), packed into --block-size blocks. --lm-eval-tasks "
        "runs lm-evaluation-harness tasks (pip install 'hf_slimmoe[eval]'); given alone, without --data or --teacher, "
        "only those tasks run."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", help="model directory (SlimMoE or PhiMoE, with its tokenizer)")
        parser.add_argument("--teacher", help="teacher directory for KL and top-1 agreement")
        parser.add_argument("--data", help="a .txt/.py/.jsonl file, or a save_to_disk directory (input_ids or text, "
                            "optionally with a teacher cache); default: the held-out standard-library modules")
        parser.add_argument("--top-k", type=positive_int, default=8,
                            help="teacher tokens kept for the KL (default: 8)")
        parser.add_argument("--max-blocks", type=positive_int, default=256,
                            help="rows evaluated at most (default: 256)")
        parser.add_argument("--block-size", type=positive_int, default=128,
                            help="tokens per row of text data (default: 128)")
        parser.add_argument("--batch-size", type=positive_int, default=16, help="rows per forward (default: 16)")
        parser.add_argument("--text-column", default="text", help="text field of .jsonl files / text datasets")
        parser.add_argument("--lm-eval-tasks",
                            help="comma-separated lm-eval task names or task YAML files/directories, "
                            "e.g. benchmarks/lm_eval_tasks (needs the `eval` extra)")
        parser.add_argument("--lm-eval-limit", type=positive_int, help="examples per lm-eval task at most")
        parser.add_argument("--json", action="store_true", help="print a JSON object instead of lines")

    def run(self, args, extra_args) -> int:
        check_model_path(args.model, "MODEL")
        if args.teacher:
            check_model_path(args.teacher, "--teacher")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ...compression.evaluation import evaluate_model, run_lm_eval
        from ...compression.sources import load_eval_data

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        teacher = None
        if args.teacher:
            teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).to(device)
        result = {"model": args.model, "teacher": args.teacher}
        if args.lm_eval_tasks is None or args.data or args.teacher:
            dataset = load_eval_data(tokenizer, args.data, block_size=args.block_size, max_blocks=args.max_blocks,
                                     text_column=args.text_column)
            result.update(evaluate_model(model, dataset, teacher=teacher, top_k=args.top_k, batch_size=args.batch_size,
                                         pad_token_id=tokenizer.pad_token_id), rows=len(dataset))
        if args.lm_eval_tasks:
            result["lm_eval"] = run_lm_eval(model, tokenizer, args.lm_eval_tasks.split(","), limit=args.lm_eval_limit,
                                            batch_size=args.batch_size)
        print(json.dumps(result, indent=2) if args.json else format_result(result))
        return 0


def format_result(result: dict) -> str:
    """The evaluation result as `key: value` lines (floats with 4 decimals), lm-eval tasks one per line."""
    lines = []
    for key, value in result.items():
        if key == "lm_eval":
            for task, metrics in value.items():
                lines.append(f"lm-eval {task}: " + ", ".join(f"{m} {v:.4f}" if isinstance(v, float) else f"{m} {v}"
                                                            for m, v in metrics.items()))
        elif value is not None:
            lines.append(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines)
