"""Inference speed of a teacher and its SlimMoE stages on this machine: prefill and decode tokens/s, side by side in
one run, against the ideal speed-up predicted by active parameters.

    python benchmarks/bench_inference.py                   # the demo's teacher and stages, and a 4x wider model
    python benchmarks/bench_inference.py --threads 2 --repeats 5

Weights are random: speed does not depend on their values, only on the sizes. Each model is timed in the same
process, in turn, `--repeats` times; the median is reported. Prefill = one forward over `--prefill-tokens` tokens
(batch 1); decode = `--decode-tokens` greedy tokens with the KV cache after a 16-token prompt.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM, plan_stages

try:
    from results import write_section
except ImportError:  # run as a module from the repository root
    from benchmarks.results import write_section


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config: SlimMoeConfig, args) -> dict:
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(config).eval()
    prefill = torch.randint(0, config.vocab_size, (1, args.prefill_tokens))
    prompt = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        prefill_s = timed(lambda: model(prefill, use_cache=False), args.repeats)
        decode_s = timed(lambda: model.generate(prompt, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                                                do_sample=False, pad_token_id=0), args.repeats)
    return {"prefill_tok_s": args.prefill_tokens / prefill_s, "decode_tok_s": args.decode_tokens / decode_s}


def architectures() -> dict[str, list[tuple[str, SlimMoeConfig]]]:
    """The teacher and stage sizes measured: the demo's (from its packaged recipe) and a 4x wider model."""
    from hf_slimmoe.compression.demo import demo_recipe

    recipe = demo_recipe("unused")
    demo = SlimMoeConfig(vocab_size=recipe.teacher.build.vocab_size, **recipe.teacher.build.config)
    wide = SlimMoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                         attention_bias=True, lm_head_bias=True, max_position_embeddings=1024)
    result = {"demo": [("teacher", demo)] + [(f"stage {i}", c) for i, c in enumerate(recipe.stage_configs(demo), 1)]}
    target = wide.slimmed(intermediate_size=128, num_key_value_heads=2)
    result["wide"] = [("teacher", wide)] + [(f"stage {i}", c)
                                            for i, c in enumerate(plan_stages(wide, target, 2, expert_multiple=64), 1)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for arch, models in architectures().items():
        base = None
        for name, config in models:
            result = measure(config, args)
            base = base or {**result, "active": config.num_active_parameters()}
            ideal = base["active"] / config.num_active_parameters()
            rows.append(
                f"| {arch} | {name} | {config.hidden_size} | {config.intermediate_size} "
                f"| {config.num_attention_heads}/{config.num_key_value_heads} | {config.num_parameters() / 1e6:.2f}M "
                f"| {config.num_active_parameters() / 1e6:.2f}M | {result['prefill_tok_s']:,.0f} "
                f"| {result['prefill_tok_s'] / base['prefill_tok_s']:.2f}x | {result['decode_tok_s']:.1f} "
                f"| {result['decode_tok_s'] / base['decode_tok_s']:.2f}x | {ideal:.2f}x |")
            print(rows[-1], flush=True)

    table = "\n".join([
        "| model | row | hidden | d_expert | heads q/kv | total | active | prefill tok/s | prefill speed-up "
        "| decode tok/s | decode speed-up | ideal (active params) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    section = f"""## Inference: teacher vs SlimMoE stages (`benchmarks/bench_inference.py`)

Command: `python benchmarks/bench_inference.py --threads {args.threads} --repeats {args.repeats}` (random weights).
`demo`: the demo's teacher (`hf_slimmoe/recipes/demo.yaml`: vocab 1024, hidden 128, 4 layers, 8 experts top-2,
d_expert 256, heads 8/4) and its two planned stages; `wide`: vocab 4096, hidden 256, d_expert 512, otherwise alike,
with `plan_stages(teacher, d_expert 128 heads 4/2, 2)`. Prefill: batch 1 x {args.prefill_tokens} tokens; decode:
{args.decode_tokens} greedy tokens with the KV cache after a 16-token prompt. Medians of {args.repeats} runs, every
model in one process; speed-ups are against the teacher of the same row group.

{table}

The ideal column is the teacher's active parameters over the model's: the speed-up per-token compute alone
predicts. The embedding and LM head are counted as active and are not pruned."""
    if not args.no_write:
        write_section("bench_inference", section)
        print("updated benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
