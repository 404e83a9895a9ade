"""Peak memory of streaming surgery (`slimmoe prune`) against the largest shard, and against loading + `prune_to`.

A Phi-3.5-MoE-shaped checkpoint (hidden 4096, 16 experts of width 6400, 32/8 heads of 128, vocabulary 32064, attention
and lm_head biases, bfloat16; only `--layers` decoder layers) is written to disk in shards of at most `--shard-gb`,
tensor by tensor with the streaming safetensors writer, so building it never holds more than one tensor. It is stored
in the per-expert layout `save_pretrained` writes for PhiMoE (`block_sparse_moe.experts.E.w1/w2/w3.weight`).

Then, each in a fresh process:

- `streaming`: `prune_checkpoint(...)` (what `slimmoe prune` runs) to Phi-mini-MoE's stage-1 sizes (d_expert 2240,
  32/8 heads -> 24/6 with `--kv-heads 6`), with random scores;
- `in_memory` (the baseline): `SlimMoeForCausalLM.from_pretrained(dtype="auto")`, `prune_to`, `save_pretrained`.

Memory is the process's peak resident set (the kernel's VmHWM, read at exit: imports, mmap'ed file pages and
everything), so it is the number a machine must have. Goal (issue #14): streaming peak <= largest shard + 10%.
The two outputs are then compared tensor by tensor (bit-identical).

    python benchmarks/bench_streaming_prune.py                      # 2 layers in 1 GB shards (5.6 GB), ~5 min
    python benchmarks/bench_streaming_prune.py --layers 4 --keep    # keep the files in --workdir
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results import write_section  # noqa: E402

PHI35 = dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_attention_heads=32, num_key_value_heads=8,
             head_dim=128, num_local_experts=16, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
             max_position_embeddings=4096)


def tensor_specs(layers: int) -> dict[str, list[int]]:
    """Every stored tensor of the Phi-3.5-MoE-shaped checkpoint and its shape, in key order."""
    h, v, i, e = PHI35["hidden_size"], PHI35["vocab_size"], PHI35["intermediate_size"], PHI35["num_local_experts"]
    q, kv = PHI35["num_attention_heads"] * 128, PHI35["num_key_value_heads"] * 128
    specs = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "model.norm.bias": [h],
             "lm_head.weight": [v, h], "lm_head.bias": [v]}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        specs.update({p + "input_layernorm.weight": [h], p + "input_layernorm.bias": [h],
                      p + "post_attention_layernorm.weight": [h], p + "post_attention_layernorm.bias": [h],
                      p + "block_sparse_moe.gate.weight": [e, h]})
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            specs.update({p + f"self_attn.{name}.weight": [rows, h], p + f"self_attn.{name}.bias": [rows]})
        specs.update({p + "self_attn.o_proj.weight": [h, q], p + "self_attn.o_proj.bias": [h]})
        for expert in range(e):
            x = p + f"block_sparse_moe.experts.{expert}."
            specs.update({x + "w1.weight": [i, h], x + "w2.weight": [h, i], x + "w3.weight": [i, h]})
    return dict(sorted(specs.items()))


def build_checkpoint(directory: str, layers: int, shard_bytes: int) -> list[int]:
    """Write the checkpoint in shards of at most `shard_bytes`, one tensor in memory at a time; returns shard sizes."""
    from hf_slimmoe import SlimMoeConfig
    from hf_slimmoe.pruning.safetensors_stream import SafetensorsStreamWriter, tensor_nbytes

    os.makedirs(directory, exist_ok=True)
    groups, size = [[]], 0
    for key, shape in tensor_specs(layers).items():
        nbytes = tensor_nbytes("BF16", shape)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += nbytes
    weight_map, sizes, generator = {}, [], torch.Generator().manual_seed(0)
    for number, group in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        writer = SafetensorsStreamWriter(os.path.join(directory, name), {k: ("BF16", s) for k, s in group},
                                         {"format": "pt"})
        for key in writer.order:
            shape = dict(group)[key]
            writer.write(key, [(torch.randn(shape, generator=generator) * 0.02).bfloat16()])
            weight_map[key] = name
        writer.close()
        sizes.append(os.path.getsize(os.path.join(directory, name)))
    total = sum(tensor_nbytes("BF16", s) for s in tensor_specs(layers).values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    config = SlimMoeConfig(**PHI35, num_hidden_layers=layers).to_phimoe()
    config.dtype = "bfloat16"
    config.save_pretrained(directory)
    return sizes


def make_scores(path: str, layers: int) -> None:
    from hf_slimmoe.pruning import SensitivityScores

    generator = torch.Generator().manual_seed(1)
    SensitivityScores(experts=[torch.rand(16, 6400, generator=generator) for _ in range(layers)],
                      kv_groups=[torch.rand(8, generator=generator) for _ in range(layers)]).save(path)


def child(mode: str, source: str, output: str, scores_path: str, width: int, kv_heads: int) -> None:
    """Run one mode in this (fresh) process and print its peak RSS and time as JSON."""
    from hf_slimmoe import SlimMoeForCausalLM
    from hf_slimmoe.pruning import SensitivityScores
    from hf_slimmoe.pruning.streaming import prune_checkpoint, read_source_config

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    scores = SensitivityScores.load(scores_path)
    target = read_source_config(source).slimmed(intermediate_size=width, num_key_value_heads=kv_heads)
    baseline = status("VmRSS")  # torch, transformers and hf_slimmoe imported, scores loaded
    start = time.perf_counter()
    if mode == "streaming":
        prune_checkpoint(source, output, target, scores, card=False, show_progress=False)
    else:
        model = SlimMoeForCausalLM.from_pretrained(source, dtype="auto")
        model.prune_to(target, scores)
        model.save_pretrained(output)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak": status("VmHWM"), "baseline": baseline, "seconds": seconds}))


def same_tensors(a: str, b: str) -> bool:
    """Every tensor of the two checkpoints is bit-identical (read one at a time)."""
    from safetensors import safe_open

    from hf_slimmoe.pruning.streaming import checkpoint_shards

    def where(directory):
        return {key: shard for shard, keys in checkpoint_shards(directory)[0].items() for key in keys}

    left, right = where(a), where(b)
    if left.keys() != right.keys():
        return False
    for key in left:
        with safe_open(os.path.join(a, left[key]), "pt") as f, safe_open(os.path.join(b, right[key]), "pt") as g:
            if not torch.equal(f.get_tensor(key), g.get_tensor(key)):
                return False
    return True


def run_mode(mode: str, args, source: str, scores_path: str) -> dict:
    output = os.path.join(args.workdir, mode)
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--workdir", args.workdir,
               "--width", str(args.width), "--kv-heads", str(args.kv_heads)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(args, sizes: list[int], results: dict, identical: bool | None) -> str:
    gib = 2 ** 30
    largest, total = max(sizes), sum(sizes)
    bound = 1.1 * largest
    rows = []
    for mode, r in results.items():
        rows.append(f"| `{mode}` | {r['peak'] / gib:.2f} | {r['peak'] / largest:.2f}x | "
                    f"{(r['peak'] - r['baseline']) / gib:.2f} | {r['seconds']:.0f} |")
    streaming = results["streaming"]["peak"]
    met = "**met**" if streaming <= bound else "**not met**"
    baseline = results.get("in_memory")
    ratio = f" ({streaming / baseline['peak']:.2f}x the in-memory peak)" if baseline else ""
    same = {True: "bit-identical", False: "**different**", None: "not compared (--skip-in-memory)"}[identical]
    return f"""## Streaming surgery: peak memory vs the largest shard (`benchmarks/bench_streaming_prune.py`)

Checkpoint: Phi-3.5-MoE shapes (hidden 4096, 16 experts x 6400, 32/8 heads, vocab 32064, biases) with {args.layers}
decoder layers, bfloat16, {len(sizes)} shards, {total / gib:.2f} GiB in all, largest shard {largest / gib:.2f} GiB
(the checkpoint is {total / largest:.1f}x its largest shard). Pruned to d_expert {args.width}, {args.kv_heads * 4}/{args.kv_heads}
heads. {platform.machine()}, torch {torch.__version__}, 1 thread, {os.cpu_count()} cores shared with other jobs.
Command: `python benchmarks/bench_streaming_prune.py --layers {args.layers} --shard-gb {args.shard_gb}`.

| mode | peak RSS (GiB) | vs largest shard | peak above imports (GiB) | time (s) |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

Goal: streaming peak <= largest shard + 10% ({bound / gib:.2f} GiB): {met}{ratio}. Outputs: {same}.

Peak RSS is the whole process's high-water mark (VmHWM at exit): Python, torch and transformers imports (the "above
imports" column subtracts the resident set measured right before the work), the pages of the memory-mapped input block
being read (the file is opened per block of at most 64 MiB) and the piece being written.
`in_memory` is `from_pretrained(dtype="auto")` + `prune_to` + `save_pretrained`, the way `slimmoe prune` worked before.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shard-gb", type=float, default=1.0, help="largest shard, in GiB (default 1)")
    parser.add_argument("--width", type=int, default=2240, help="target d_expert (default 2240)")
    parser.add_argument("--kv-heads", type=int, default=6, help="target KV heads (default 6)")
    parser.add_argument("--workdir", default="/tmp/bench_streaming_prune")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    parser.add_argument("--skip-in-memory", action="store_true", help="do not run the in-memory baseline")
    parser.add_argument("--no-write", action="store_true", help="print the report, leave RESULTS.md alone")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    source, scores_path = os.path.join(args.workdir, "source"), os.path.join(args.workdir, "scores.safetensors")
    if args.child:
        child(args.child, source, os.path.join(args.workdir, args.child), scores_path, args.width, args.kv_heads)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.perf_counter()
    sizes = build_checkpoint(source, args.layers, int(args.shard_gb * 2 ** 30))
    make_scores(scores_path, args.layers)
    print(f"built {len(sizes)} shards ({sum(sizes) / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f}s", flush=True)
    results = {"streaming": run_mode("streaming", args, source, scores_path)}
    identical = None
    if not args.skip_in_memory:
        results["in_memory"] = run_mode("in_memory", args, source, scores_path)
        identical = same_tensors(os.path.join(args.workdir, "streaming"), os.path.join(args.workdir, "in_memory"))
    text = report(args, sizes, results, identical)
    print(text)
    if not args.no_write:
        write_section("bench_streaming_prune", text)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
