"""`slimmoe demo`: the whole method on the Python standard library, on a CPU, in about ten minutes."""

from __future__ import annotations

import os
import time

from .base import Command, check_output_dir, positive_int


class DemoCommand(Command):
    name = "demo"
    help = "the whole method on the Python standard library: teacher, 2 stages, SFT, DPO, summary (~10 min CPU)"
    description = (
        "Train a byte-level BPE tokenizer and a small MoE teacher on this machine's Python standard library (train: "
        "the top-level modules; held-out: email/, http/, urllib/, xml/), cache the teacher's top-8, compress it in "
        "two stages, run SFT with KD and DPO, and write stage models, cards, trajectory.png and a summary table "
        "(parameters, held-out perplexity, KL to the teacher, speed) to OUTPUT_DIR. The trained teacher is cached "
        "($HF_SLIMMOE_CACHE, default ~/.cache/hf_slimmoe) and re-running reuses finished steps. The numbers are in "
        "the packaged recipe hf_slimmoe/recipes/demo.yaml."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("output_dir", nargs="?",
                            help="output directory (default: outputs/demo, or outputs/demo-fast)")
        parser.add_argument("--fast", action="store_true", help="a smaller run of about a minute (the CI smoke test)")
        parser.add_argument("--threads", type=positive_int,
                            help="CPU threads for torch (default: torch's choice, all cores); on "
                            "a machine shared with other jobs, --threads 1 avoids threads waiting on a busy core")

    def run(self, args, extra_args) -> int:
        from ...compression.demo import run_demo

        output_dir = args.output_dir or ("outputs/demo-fast" if args.fast else "outputs/demo")
        check_output_dir(output_dir, "OUTPUT_DIR", resumable=True)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        start = time.perf_counter()

        def banner(index: int, total: int, title: str) -> None:
            print(f"\n==== [{index}/{total}] {title}  ({time.perf_counter() - start:.0f}s) ====", flush=True)

        summary = run_demo(output_dir, fast=args.fast, on_step=banner)
        with open(os.path.join(output_dir, "summary.md"), encoding="utf-8") as f:
            print("\n" + f.read())
        print(f"demo finished in {time.perf_counter() - start:.0f}s; models, cards, trajectory.png and summary.md / "
              f"summary.json are in {summary['output_dir']}")
        return 0
