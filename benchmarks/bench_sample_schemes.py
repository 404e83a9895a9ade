"""How close can S=8 teacher samples get to the full KL? Sampling schemes, their gradient noise, and the setting.

`sampled` KD at S=8 stops at about 1.2x the online full KL on `bench_kd_loss.py`'s setting. This benchmark asks
whether a better way of drawing the 8 ids (same bytes) closes that gap, and how the gap depends on the setting:

- the gradient noise of each scheme: per position, the squared error `||p_hat - p||^2` of the empirical
  distribution of the S draws (the noise in the loss's gradient with respect to the student's logits, `q - p_hat`),
  averaged over the train positions, for i.i.d. draws, stratified draws (draw s uniform on the s-th of S equal slices
  of the teacher's CDF, the library's scheme before) and systematic draws (one uniform shared by the S slices, the
  library's scheme now). Systematic draws give every token `floor(S p)` or `ceil(S p)` copies, the least error any S
  unweighted ids can have token by token: `sum_j f_j (1 - f_j) / S^2` with `f_j` the fractional part of `S p_j`
  (also reported, "floor");
- held-out full KL after distillation with each scheme against online `full`, at two pruning depths (25% and 12.5%
  of the expert width; the deeper cut leaves the student further from the teacher);
- threshold samples (issue 21): K weighted slots per position (`cache_teacher_samples(sampling="threshold")`: the
  tokens above `tau` with their probability, the rest drawn at `p / tau` with weight `tau`), at about the bytes of
  systematic S=8 (K=3) and S=16 (K=7), in both measurements, with systematic S=16 beside them.

The systematic rows use `cache_teacher_samples` itself; the i.i.d. and stratified rows replace its ids with draws made
here from the same teacher probabilities. Everything else is `bench_kd_loss.py`'s run (same steps, optimizer, data
order, evaluation).

    python benchmarks/bench_sample_schemes.py --train-blocks 1920   # writes the "bench_sample_schemes" section
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kd_loss  # noqa: E402
from results import write_section  # noqa: E402

SCHEMES = ("iid", "stratified", "systematic")
logger = logging.getLogger("bench_sample_schemes")


def draw(probs: torch.Tensor, scheme: str, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """`(n, S)` ids drawn from the rows of `probs` `(n, V)` (float64) by inverting their CDF."""
    n, vocab = probs.shape
    slices = torch.arange(num_samples, dtype=torch.float64)  # (S,)
    if scheme == "iid":
        u = torch.rand(n, num_samples, generator=generator, dtype=torch.float64)
    elif scheme == "stratified":
        u = (slices + torch.rand(n, num_samples, generator=generator, dtype=torch.float64)) / num_samples
    else:  # systematic: one offset for all S slices
        u = (slices + torch.rand(n, 1, generator=generator, dtype=torch.float64)) / num_samples
    cdf = probs.cumsum(-1)  # (n, V)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1)


def teacher_probs(teacher, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's next-token distributions `(B * T, V)`, float64."""
    with torch.no_grad():
        logits = teacher(input_ids=input_ids).logits  # (B, T, V)
    return torch.softmax(logits.float(), -1, dtype=torch.float64).flatten(0, 1)


def noise(data, num_samples: int, rows: int = 64) -> dict:
    """Mean `||p_hat - p||^2` per position over the first `rows` train rows, per scheme; and the integer floor."""
    ids = torch.tensor(data["caches"]["samples-8"][:rows]["input_ids"])
    probs = teacher_probs(data["teacher"], ids)  # (n, V)
    generator = torch.Generator().manual_seed(0)
    result = {}
    for scheme in SCHEMES:
        drawn = draw(probs, scheme, num_samples, generator)  # (n, S)
        counts = torch.zeros_like(probs).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.float64))
        result[scheme] = ((counts / num_samples - probs) ** 2).sum(-1).mean().item()
    from hf_slimmoe.distillation import threshold_samples_from_hidden
    from hf_slimmoe.utils.modeling import backbone

    teacher, slots = data["teacher"], THRESHOLD_SLOTS[num_samples]
    with torch.no_grad():
        hidden = backbone(teacher)(input_ids=ids).last_hidden_state.flatten(0, 1)  # (n, H)
    uniforms = torch.rand(hidden.size(0), 1, generator=generator, dtype=torch.float64)
    drawn, weights, _ = threshold_samples_from_hidden(hidden, teacher.get_output_embeddings(), uniforms, slots)
    estimate = torch.zeros_like(probs).scatter_add_(1, drawn, weights.double())
    result["threshold"] = ((estimate - probs) ** 2).sum(-1).mean().item()
    frac = (probs * num_samples).frac()
    result["floor"] = (frac * (1 - frac)).sum(-1).mean().item() / num_samples**2
    result["top8_mass"] = probs.topk(8, dim=-1).values.sum(-1).mean().item()
    return result


def scheme_cache(data, scheme: str, seed: int):
    """The S=8 samples cache with its ids replaced by draws of `scheme` (the library's own cache for systematic)."""
    base = data["caches"]["samples-8"]
    if scheme == "systematic":
        return base
    from hf_slimmoe.distillation import sample_packing

    packing = sample_packing(base)  # the cache's own: ids packed in ceil(log2 V) bits
    generator = torch.Generator().manual_seed(1000 + seed)
    rows = []
    for start in range(0, len(base), 64):
        ids = torch.tensor(base[start:start + 64]["input_ids"])  # (b, T)
        drawn = draw(teacher_probs(data["teacher"], ids), scheme, 8, generator)  # (b * T, 8)
        rows.extend(packing.pack(drawn.view(*ids.shape, 8)).tolist())  # (b, T, width) bytes
    column, feature = "teacher_sample_packed", base.features["teacher_sample_packed"]
    cache = base.remove_columns([column]).add_column(column, rows, feature=feature)
    cache.info.description = base.info.description  # the cache record (kind, teacher, S, temperature)
    return cache


# Threshold slots at about the bytes of S systematic draws: K ids of ceil(log2 V) bits, a byte per slot (a kept
# token's probability, or 0 for a draw), tau as a float32 per position (at V = 1,024: K=3 takes 11 bytes against S=8's 10, K=7 20
# against S=16's 20).
THRESHOLD_SLOTS = {8: 3, 16: 7}


def threshold_bytes(slots: int, bits: int) -> int:
    return (slots * bits + 7) // 8 + slots + 4


def threshold_cache(data, slots: int):
    """The library's threshold samples cache (`cache_teacher_samples(sampling="threshold")`, byte-coded weights) of
    the train blocks, `slots` per position, built once."""
    from hf_slimmoe.distillation import cache_teacher_samples

    name = f"threshold-{slots}"
    if name not in data["caches"]:
        blocks = data["caches"]["samples-8"].select_columns(["input_ids"])
        data["caches"][name] = cache_teacher_samples(data["teacher"], blocks, num_samples=slots, sampling="threshold",
                                                     pad_token_id=data["tokenizer"].pad_token_id or 0)
    return name


def run(data, args, fraction: float, seed: int) -> list[dict]:
    """`full` and S=8 with every scheme, on the teacher pruned to `fraction` of its expert width."""
    config = data["teacher"].config
    data["pruned_config"] = config.slimmed(intermediate_size=round(config.intermediate_size * fraction))
    rows = [dict(bench_kd_loss.evaluate(bench_kd_loss.pruned_student(data), data, args), name="pruned")]
    rows.append(bench_kd_loss.run_loss(f"full-{fraction}", "full", {}, None, seed, data, args))
    for scheme in SCHEMES:
        data["caches"]["scheme"] = scheme_cache(data, scheme, seed)
        rows.append(bench_kd_loss.run_loss(f"{scheme}-{fraction}", "sampled", {"kd_samples": 8}, "scheme", seed,
                                           data, args))
    rows.append(bench_kd_loss.run_loss(f"systematic16-{fraction}", "sampled", {"kd_samples": 16}, "samples-16",
                                       seed, data, args))
    for slots in THRESHOLD_SLOTS.values():
        rows.append(bench_kd_loss.run_loss(f"threshold{slots}-{fraction}", "sampled", {"kd_samples": slots},
                                           threshold_cache(data, slots), seed, data, args))
    names = ("pruned", "full", *SCHEMES, "systematic16", *(f"threshold{k}" for k in THRESHOLD_SLOTS.values()))
    for row, name in zip(rows, names):
        row.update(name=name, fraction=fraction, seed=seed)
    return rows


def report(noises: dict, rows: list[dict], data, args, seconds: float) -> str:
    c = data["teacher"].config
    lines = [
        "## How close can S=8 teacher samples get? Sampling schemes and their noise "
        "(`benchmarks/bench_sample_schemes.py`)",
        "",
        f"`{args.command}` ({seconds / 60:.1f} min, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), CPU). Teacher, data, steps, optimizer and evaluation as in "
        f"`bench_kd_loss.py` ({args.steps} steps of {data['recipe'].training['per_device_train_batch_size']} x "
        f"{data['recipe'].data.block_size} tokens, AdamW lr {args.learning_rate}, cosine); student: the teacher "
        f"pruned by KD scores to 25% or 12.5% of its expert width (d_expert {c.intermediate_size} -> "
        f"{round(c.intermediate_size * 0.25)} / {round(c.intermediate_size * 0.125)}); training seeds "
        f"{sorted({r['seed'] for r in rows})}.",
        "",
        f"Gradient noise of 8 draws: mean `||p_hat - p||^2` per position (teacher top-8 mass "
        f"{noises[8]['top8_mass']:.2f}); 16 draws for comparison:",
        "",
        "| draws | i.i.d. | stratified | systematic (the library's) | floor for S unweighted ids "
        "| threshold, K slots of about the same bytes |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    bits = max(1, (data["teacher"].config.vocab_size - 1).bit_length())
    for s, n in noises.items():
        k = THRESHOLD_SLOTS[s]
        lines.append(f"| {s} ({(s * bits + 7) // 8} B) | {n['iid']:.4f} | {n['stratified']:.4f} | "
                     f"{n['systematic']:.4f} | {n['floor']:.4f} | {n['threshold']:.4f} (K={k}, "
                     f"{threshold_bytes(k, bits)} B) |")
    names = ("pruned", "full", *SCHEMES, "systematic16", *(f"threshold{k}" for k in THRESHOLD_SLOTS.values()))
    k8, k16 = THRESHOLD_SLOTS[8], THRESHOLD_SLOTS[16]
    lines += ["", "Held-out full KL after distillation (mean over seeds; ratio against `full` in the same run):", "",
              "| expert width | after pruning | `full` | S=8 i.i.d. | S=8 stratified | S=8 systematic (library) | "
              f"S=16 systematic | threshold K={k8} (~S=8 bytes) | threshold K={k16} (~S=16 bytes) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fraction in args.fractions:
        kl = {name: statistics.mean(r["full_kl"] for r in rows if r["fraction"] == fraction and r["name"] == name)
              for name in names}
        cells = " | ".join(f"{kl[s]:.4f} ({kl[s] / kl['full']:.2f}x)" for s in names[2:])
        lines.append(f"| {fraction:.1%} | {kl['pruned']:.3f} | {kl['full']:.4f} | {cells} |")
    runs = [f"{r['name']} {r['fraction']:.3g} seed {r['seed']}: {r['full_kl']:.4f}"
            for r in rows if r["name"] != "pruned"]
    lines += ["", "Runs (full KL): " + "; ".join(runs) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_kd_loss.add_run_arguments(parser, seeds=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.125])
    args = parser.parse_args()
    bench_kd_loss.start_run(args, "bench_sample_schemes.py")
    args.expert_fraction = args.fractions[0]  # bench_kd_loss.setup's pruned config; run() sets each fraction's
    start = time.perf_counter()
    data = bench_kd_loss.setup(args)
    noises = {s: noise(data, s) for s in (8, 16)}
    logger.info("noise: %s", json.dumps(noises))
    rows = [row for fraction in args.fractions for seed in range(args.seeds)
            for row in run(data, args, fraction, seed)]
    markdown = report(noises, rows, data, args, time.perf_counter() - start)
    print(markdown)
    if not args.no_write:
        write_section("bench_sample_schemes", markdown)


if __name__ == "__main__":
    main()
