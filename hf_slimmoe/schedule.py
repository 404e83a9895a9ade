"""Multi-stage planning and parameter accounting (paper Section 3.2, "Multi-stage Schedule").

SlimMoE prunes to the target over T stages. Each pruned dimension (expert width `intermediate_size` and the number of
GQA groups `num_key_value_heads`) shrinks by the same ratio per stage, so after stage i it is

    size_i = source * (target / source) ** (i / T)

rounded: expert width to a multiple of `expert_multiple` (64 by default, so kernels stay aligned), KV groups to an
integer. The last stage is always exactly the target. A recipe may instead pin every stage's sizes (the paper's
Table 7 sizes are pinned in `recipes/phi-*.yaml`); `pinned_stages` builds and checks those.

```python
>>> from hf_slimmoe import SlimMoeConfig, plan_stages
>>> teacher = SlimMoeConfig(attention_bias=True, lm_head_bias=True)          # Phi-3.5-MoE, 41.9B
>>> target = teacher.slimmed(intermediate_size=448, num_key_value_heads=4)  # Phi-tiny-MoE, 3.8B
>>> [(c.intermediate_size, c.num_key_value_heads) for c in plan_stages(teacher, target, num_stages=3)]
[(2624, 6), (1088, 5), (448, 4)]

```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .configuration_slimmoe import SlimMoeConfig

#: The two dimensions SlimMoE prunes; everything else in a configuration is kept.
PRUNED_FIELDS = ("intermediate_size", "num_key_value_heads")
#: Fields a stage size may be pinned with in a recipe (`num_attention_heads` follows from `num_key_value_heads`).
STAGE_SIZE_FIELDS = ("intermediate_size", "num_key_value_heads", "num_attention_heads")
_KEPT_FIELDS = ("hidden_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "vocab_size",
                "head_dim")


def check_target(source_config: SlimMoeConfig, target_config: SlimMoeConfig) -> None:
    """Raise `ValueError` naming the field when `target_config` is not a slimmed version of `source_config`."""
    for name in _KEPT_FIELDS:
        if getattr(target_config, name) != getattr(source_config, name):
            raise ValueError(
                f"target {name}={getattr(target_config, name)} differs from the source's "
                f"{getattr(source_config, name)}; "
                f"SlimMoE only prunes {' and '.join(PRUNED_FIELDS)}, every other size is kept."
            )
    for name in PRUNED_FIELDS:
        if getattr(target_config, name) > getattr(source_config, name):
            raise ValueError(
                f"target {name}={getattr(target_config, name)} is larger than the source's "
                f"{getattr(source_config, name)}; pruning only removes neurons and heads."
            )
    source_group = source_config.num_attention_heads // source_config.num_key_value_heads
    target_group = target_config.num_attention_heads // target_config.num_key_value_heads
    if source_group != target_group:
        raise ValueError(
            f"target num_attention_heads/num_key_value_heads = {target_config.num_attention_heads}/"
            f"{target_config.num_key_value_heads} has {target_group} query heads per KV group, the source has "
            f"{source_group}; GQA groups are pruned whole, so set num_attention_heads = "
            f"{source_group} * num_key_value_heads."
        )


def geometric_size(source: int, target: int, fraction: float, multiple: int) -> int:
    """The size `fraction` of the way from `source` to `target` on a geometric scale, rounded to a multiple of
    `multiple` and kept within [target, source]."""
    value = source * (target / source) ** fraction
    rounded = int(round(value / multiple)) * multiple
    return min(source, max(target, rounded))


def plan_stages(
    source_config: SlimMoeConfig, target_config: SlimMoeConfig, num_stages: int, expert_multiple: int = 64
) -> list[SlimMoeConfig]:
    """The geometric multi-stage schedule from `source_config` to `target_config`.

    Args:
        source_config: configuration of the model being compressed (the teacher).
        target_config: the final size; must differ from the source only in `intermediate_size` and
            `num_key_value_heads` (with the same query heads per group), see `SlimMoeConfig.slimmed`.
        num_stages: number of prune-then-distill stages T (2 for Phi-mini-MoE, 3 for Phi-tiny-MoE; 1 is one-shot).
        expert_multiple: intermediate stages round the expert width to a multiple of this (the target is kept as is).

    Returns:
        `num_stages` configurations, non-increasing in every pruned dimension; the last has the target's sizes.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}.")
    if isinstance(expert_multiple, bool) or not isinstance(expert_multiple, int) or expert_multiple < 1:
        raise ValueError(f"expert_multiple must be a positive integer, got {expert_multiple!r}.")
    check_target(source_config, target_config)
    stages, previous = [], source_config
    for i in range(1, num_stages + 1):
        if i == num_stages:
            sizes = {name: getattr(target_config, name) for name in PRUNED_FIELDS}
        else:
            fraction = i / num_stages
            sizes = {
                "intermediate_size": geometric_size(source_config.intermediate_size, target_config.intermediate_size,
                                                     fraction, expert_multiple),
                "num_key_value_heads": geometric_size(source_config.num_key_value_heads,
                                                      target_config.num_key_value_heads, fraction, 1),
            }
        sizes = {name: min(value, getattr(previous, name)) for name, value in sizes.items()}  # never grow back
        previous = source_config.slimmed(**sizes)
        stages.append(previous)
    return stages


def pinned_stages(source_config: SlimMoeConfig, sizes: Sequence[Mapping[str, int]]) -> list[SlimMoeConfig]:
    """Stage configurations from explicit per-stage sizes, e.g. `[{"intermediate_size": 2240}, {...}]`.

    Each entry may give `intermediate_size`, `num_key_value_heads` and (as a check) `num_attention_heads`; a missing
    field keeps the previous stage's value. Sizes must not grow from one stage to the next.
    """
    if not sizes:
        raise ValueError("stages.sizes is empty: give at least one stage size.")
    stages, previous = [], source_config
    for i, entry in enumerate(sizes, start=1):
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"stages.sizes[{i - 1}] must be a mapping of {', '.join(STAGE_SIZE_FIELDS)}, got {entry!r}.")
        unknown = sorted(set(entry) - set(STAGE_SIZE_FIELDS))
        if unknown:
            raise ValueError(
                f"stages.sizes[{i - 1}] has unknown key(s) {unknown}; allowed: {', '.join(STAGE_SIZE_FIELDS)}."
            )
        try:
            config = previous.slimmed(intermediate_size=entry.get("intermediate_size"),
                                      num_key_value_heads=entry.get("num_key_value_heads"))
        except ValueError as e:
            raise ValueError(f"stages.sizes[{i - 1}] (stage {i}): {e}") from None
        if "num_attention_heads" in entry and entry["num_attention_heads"] != config.num_attention_heads:
            group = source_config.num_attention_heads // source_config.num_key_value_heads
            raise ValueError(
                f"stages.sizes[{i - 1}].num_attention_heads={entry['num_attention_heads']} does not match "
                f"num_key_value_heads={config.num_key_value_heads} x {group} query heads per group "
                f"= {config.num_attention_heads}; GQA groups are pruned whole."
            )
        stages.append(config)
        previous = config
    return stages


def human_count(n: int | float | None, digits: int = 1) -> str:
    """A count with `digits` decimals and a unit: 41.9B, 15.7B, 3.2M, 850K; below 1,000 as it is; `None`: "-"."""
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f}{unit}"
    return f"{n:,}" if isinstance(n, int) else f"{n:g}"


def plan_rows(source_config: SlimMoeConfig, stages: Sequence[SlimMoeConfig]) -> list[dict]:
    """One dict per model of the plan (stage 0 = the source), with sizes and total/active parameters."""
    total0 = source_config.num_parameters()
    active0 = source_config.num_active_parameters()
    rows = []
    for i, config in enumerate([source_config, *stages]):
        total, active = config.num_parameters(), config.num_active_parameters()
        rows.append({
            "stage": i,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "num_parameters": total,
            "num_active_parameters": active,
            "percent_of_teacher": 100.0 * total / total0,
            "percent_active_of_teacher": 100.0 * active / active0,
        })
    return rows


def format_plan(source_config: SlimMoeConfig, stages: Sequence[SlimMoeConfig], budgets: Sequence[str] | None = None,
                title: str | None = None) -> str:
    """The plan as a text table: stage, d_expert, heads q/kv, total and active parameters, % of the teacher,
    and (optionally) each stage's training budget; the last line is the total-parameter trajectory."""
    header = ["stage", "d_expert", "heads q/kv", "total", "active", "% teacher (total/active)"]
    if budgets is not None:
        header.append("budget")
    table = []
    for row in plan_rows(source_config, stages):
        line = [
            "teacher" if row["stage"] == 0 else str(row["stage"]),
            str(row["intermediate_size"]),
            f"{row['num_attention_heads']}/{row['num_key_value_heads']}",
            human_count(row["num_parameters"]),
            human_count(row["num_active_parameters"]),
            f"{row['percent_of_teacher']:.1f}% / {row['percent_active_of_teacher']:.1f}%",
        ]
        if budgets is not None:
            line.append("" if row["stage"] == 0 else budgets[row["stage"] - 1])
        table.append(line)
    widths = [max(len(r[c]) for r in [header, *table]) for c in range(len(header))]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    lines.append("total parameters: " + " -> ".join(
        human_count(c.num_parameters()) for c in [source_config, *stages]))
    return "\n".join(lines)


__all__ = ["plan_stages", "pinned_stages", "check_target", "plan_rows", "format_plan", "human_count",
           "geometric_size"]
