"""Equal wall-clock: cached `sampled` S=8 against online `full` KD, given the same training time (issue 21 item 4).

`bench_kd_loss.py` compares the losses at equal *steps*. A cached step skips the teacher's forward, so in the time
online `full` KD takes for its steps the cached run takes more. Here the pruned student (the demo's teacher cut to
`--expert-fraction` of its expert width by KD scores) is distilled

- with `full` KD, the teacher online, for `--steps` steps: its training time T;
- with `sampled` S=8 from a teacher samples cache, for as many steps as fit in T (the same cosine schedule stretched
  over the steps it can take, found from the first run's measured step times: T / median cached step time);

and both are evaluated on the held-out blocks (full-vocabulary KL). The cache's build time (one teacher pass over the
train blocks, `cache_teacher_samples`) is reported beside it: it is paid once per teacher and data, whatever the number
of students or runs that read it.

    python benchmarks/bench_equal_time.py --train-blocks 1920 --expert-fraction 0.125  # section bench_equal_time
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kd_loss  # noqa: E402
from results import write_section  # noqa: E402


def cache_build_seconds(data) -> float:
    """Time of building the S=8 samples cache of the train blocks again, in memory."""
    from hf_slimmoe.distillation import cache_teacher_samples

    blocks = data["caches"]["samples-8"].select_columns(["input_ids"])
    start = time.perf_counter()
    cache_teacher_samples(data["teacher"], blocks, num_samples=8, pad_token_id=data["tokenizer"].pad_token_id or 0)
    return time.perf_counter() - start


def with_steps(args, steps: int) -> argparse.Namespace:
    """The run's options with another number of steps (the cosine schedule spans them)."""
    return argparse.Namespace(**{**vars(args), "steps": steps})


def parameters(config) -> int:
    from hf_slimmoe import count_parameters

    return count_parameters(config)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_kd_loss.add_run_arguments(parser, seeds=1)
    parser.add_argument("--expert-fraction", type=float, default=0.125)
    args = parser.parse_args()
    bench_kd_loss.start_run(args, "bench_equal_time.py")
    load = os.getloadavg()
    start = time.perf_counter()
    data = bench_kd_loss.setup(args)
    build = cache_build_seconds(data)
    pruned = bench_kd_loss.evaluate(bench_kd_loss.pruned_student(data), data, args)
    rows = []
    for seed in range(args.seeds):
        full = bench_kd_loss.run_loss("full", "full", {}, None, seed, data, args)
        probe = bench_kd_loss.run_loss("sampled S=8 probe", "sampled", {"kd_samples": 8}, "samples-8", seed, data,
                                       with_steps(args, 20))
        steps = max(args.steps, int(args.steps * full["step_seconds"] / probe["step_seconds"]))
        cached = bench_kd_loss.run_loss("sampled S=8", "sampled", {"kd_samples": 8}, "samples-8", seed, data,
                                        with_steps(args, steps))
        rows.append((full, cached, steps))
    seconds = time.perf_counter() - start
    teacher, student = parameters(data["teacher"].config), parameters(data["pruned_config"])
    full_kl = statistics.mean(f["full_kl"] for f, _, _ in rows)
    cached_kl = statistics.mean(c["full_kl"] for _, c, _ in rows)
    full_time = statistics.mean(f["step_seconds"] * args.steps for f, _, _ in rows)
    cached_time = statistics.mean(c["step_seconds"] * n for _, c, n in rows)
    lines = [
        "## Equal wall-clock: cached `sampled` S=8 against online `full` (`benchmarks/bench_equal_time.py`)",
        "",
        f"`{args.command}` ({seconds / 60:.1f} min, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU, load average {load[0]:.2f} at the start). Teacher: the demo's "
        f"({teacher / 1e6:.2f}M parameters); student: the teacher cut to {args.expert_fraction:.1%} of its expert "
        f"width by KD scores ({student / 1e6:.2f}M, the teacher is {teacher / student:.1f}x); AdamW lr "
        f"{args.learning_rate}, cosine over each run's steps, {args.seeds} seed(s). Right after pruning: full KL "
        f"{pruned['full_kl']:.3f}.",
        "",
        "| run | steps | training time (s, from median step times) | held-out full KL | vs `full` |",
        "|---|---:|---:|---:|---:|",
        f"| `full`, teacher online | {args.steps} | {full_time:.0f} | {full_kl:.4f} | 1.00 |",
        f"| `sampled` S=8, cached | {statistics.mean(n for _, _, n in rows):.0f} | {cached_time:.0f} | "
        f"{cached_kl:.4f} | {cached_kl / full_kl:.2f} |",
        "",
        f"Building the S=8 cache of the {data['train_rows']} train blocks took {build:.0f} s (one teacher pass, once "
        f"per teacher and data). Closer to the teacher at equal training time: "
        f"**{'cached sampled S=8' if cached_kl < full_kl else 'online full'}**; with the cache's build time added, "
        f"the cached run took {cached_time + build:.0f} s against {full_time:.0f} s.",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        write_section("bench_equal_time", markdown)


if __name__ == "__main__":
    main()
