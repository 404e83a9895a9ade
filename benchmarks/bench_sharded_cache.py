"""Teacher caching on 2 processes vs 1: the speed-up of splitting the shards over ranks (`cache_teacher_topk` under
`torchrun`), measured on this machine.

A SlimMoE teacher (hidden 256, 4 layers, 8 experts of width 512, 8/4 heads, vocabulary 8192; 28M parameters) caches
its top-8 over `--rows` rows of 256 tokens, in shards of 16 rows, batches of 8, each process with 1 thread. Each
round runs one process, then `torchrun --nproc_per_node 2`, alternately; the time is the caching call alone (between
barriers: no start-up, imports or model loading), median over rounds. The two caches are compared row for row.

    python benchmarks/bench_sharded_cache.py            # writes the "Sharded teacher caching" section of RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import write_section  # noqa: E402


def build(workdir: str, rows: int) -> None:
    from datasets import Dataset

    from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM

    torch.manual_seed(0)
    config = SlimMoeConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=512)
    SlimMoeForCausalLM(config).save_pretrained(os.path.join(workdir, "teacher"))
    generator = torch.Generator().manual_seed(1)
    Dataset.from_dict({"input_ids": torch.randint(0, 8192, (rows, 256), generator=generator).tolist()}).save_to_disk(
        os.path.join(workdir, "data"))


def child(workdir: str, output: str) -> None:
    """Cache in this process (one rank of a torchrun job, or alone); rank 0 prints the caching time as JSON."""
    from datasets import load_from_disk

    from hf_slimmoe import SlimMoeForCausalLM, cache_teacher_topk
    from hf_slimmoe.utils.distributed import barrier, init_from_environment

    rank, world = init_from_environment()
    teacher = SlimMoeForCausalLM.from_pretrained(os.path.join(workdir, "teacher")).eval()
    dataset = load_from_disk(os.path.join(workdir, "data"))
    barrier()
    start = time.perf_counter()
    cache_teacher_topk(teacher, dataset, top_k=8, batch_size=8, output_dir=output, shard_size=16)
    barrier()
    if rank == 0:
        print(json.dumps({"seconds": time.perf_counter() - start, "world": world}))


def run(workdir: str, processes: int, output: str) -> float:
    shutil.rmtree(output, ignore_errors=True)
    script = [os.path.abspath(__file__), "--child", "--workdir", workdir, "--output", output]
    command = ([sys.executable] + script if processes == 1 else
               [shutil.which("torchrun"), "--nproc_per_node", str(processes)] + script)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/bench_sharded_cache")
    parser.add_argument("--output")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the report, leave RESULTS.md alone")
    args = parser.parse_args()
    if args.child:
        child(args.workdir, args.output)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    build(args.workdir, args.rows)
    times = {1: [], 2: []}
    for _ in range(args.rounds):
        for processes in (1, 2):
            times[processes].append(run(args.workdir, processes, os.path.join(args.workdir, f"cache-{processes}")))
    from datasets import load_from_disk

    one, two = (load_from_disk(os.path.join(args.workdir, f"cache-{p}")) for p in (1, 2))
    identical = one.column_names == two.column_names and all(one[c] == two[c] for c in one.column_names)
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    load = os.getloadavg()[0]
    text = f"""## Sharded teacher caching: 2 processes vs 1 (`benchmarks/bench_sharded_cache.py`)

Teacher: SlimMoE hidden 256, 4 layers, 8 experts x 512, 8/4 heads, vocabulary 8192; {args.rows} rows of 256 tokens,
top-8, shards of 16 rows, batches of 8, 1 thread per process. {platform.machine()}, torch {torch.__version__},
{os.cpu_count()} cores; load average {load:.1f} at the end (other jobs shared the machine). Median of {args.rounds}
interleaved rounds of the caching call alone. Command: `python benchmarks/bench_sharded_cache.py`.

| processes | time (s) | rows/s | speed-up |
|---:|---:|---:|---:|
| 1 | {t1:.1f} | {args.rows / t1:.1f} | 1.00x |
| 2 (`torchrun`) | {t2:.1f} | {args.rows / t2:.1f} | {t1 / t2:.2f}x |

The 2-process cache equals the 1-process cache row for row: {"**yes**" if identical else "**no**"}. Rounds (s):
1 process {", ".join(f"{t:.1f}" for t in times[1])}; 2 processes {", ".join(f"{t:.1f}" for t in times[2])}. Each rank
builds every other shard and writes its own parquet files; the main process then joins them and saves the dataset
(included in the time), so the ideal on 2 free cores is a little under 2x.
"""
    print(text)
    if not args.no_write:
        write_section("bench_sharded_cache", text)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
