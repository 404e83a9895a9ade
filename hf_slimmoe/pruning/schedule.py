"""Multi-stage planning and parameter accounting (paper Section 3.2, "Multi-stage Schedule"), for any supported family.

SlimMoE prunes to the target over T stages. Each pruned dimension (the routed expert width, the number of GQA groups
`num_key_value_heads` and, where the family has one, the shared expert width) shrinks by the same ratio per stage, so
after stage i it is

    size_i = source * (target / source) ** (i / T)

rounded: widths to a multiple of `expert_multiple` (64 by default, so kernels stay aligned), KV groups to an
integer. The last stage is always exactly the target. A recipe may instead pin every stage's sizes (the paper's
Table 7 sizes are pinned in `recipes/phi-*.yaml`); `pinned_stages` builds and checks those. Every stage is built by
[`~hf_slimmoe.slim_config`], so it has the teacher's configuration class and the family's own field names.

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

from ..architectures import count_parameters, get_architecture, slim_config
from ..utils.outputs import human_count

#: The sizes SlimMoE prunes, by their family-independent names (`slim_config` arguments).
SIZE_NAMES = ("expert_width", "num_key_value_heads", "shared_expert_width")


def stage_sizes(config) -> dict[str, int]:
    """The pruned sizes of `config` by their family-independent names (no `shared_expert_width` without one)."""
    arch = get_architecture(config)
    sizes = {"expert_width": arch.expert_width_of(config), "num_key_value_heads": config.num_key_value_heads}
    if arch.shared_expert is not None:
        sizes["shared_expert_width"] = arch.shared_width_of(config)
    return sizes


def size_keys(config) -> dict[str, str]:
    """Keys a recipe may give a stage size with -> `slim_config` argument: the family-independent names and the
    family's own configuration fields (`intermediate_size` for PhiMoE and Mixtral, `moe_intermediate_size` for Qwen
    and DeepSeek, ...); `num_attention_heads` is a check of the heads-per-group rule."""
    arch = get_architecture(config)
    keys = {"expert_width": "expert_width", arch.expert_width: "expert_width",
            "num_key_value_heads": "num_key_value_heads", "num_attention_heads": "num_attention_heads"}
    if arch.shared_expert is not None:
        keys["shared_expert_width"] = "shared_expert_width"
        if arch.shared_expert.width:
            keys[arch.shared_expert.width] = "shared_expert_width"
    return keys


def check_target(source_config, target_config) -> None:
    """Raise `ValueError` naming the field when `target_config` is not a slimmed version of `source_config`."""
    arch = get_architecture(source_config)
    if get_architecture(target_config).stock_model_type != arch.stock_model_type:
        raise ValueError(f"target model_type {target_config.model_type!r} is not the source's "
                         f"{source_config.model_type!r}; SlimMoE keeps the family.")
    source, target = stage_sizes(source_config), stage_sizes(target_config)
    names = {"expert_width": arch.expert_width, "num_key_value_heads": "num_key_value_heads",
             "shared_expert_width": "shared expert width"}
    for key, value in target.items():
        if value > source[key]:
            raise ValueError(f"target {names[key]}={value} is larger than the source's {source[key]}; pruning only "
                             "removes neurons and heads.")
    source_group = source_config.num_attention_heads // source_config.num_key_value_heads
    target_group = target_config.num_attention_heads // target_config.num_key_value_heads
    if source_group != target_group:
        raise ValueError(
            f"target num_attention_heads/num_key_value_heads = {target_config.num_attention_heads}/"
            f"{target_config.num_key_value_heads} has {target_group} query heads per KV group, the source has "
            f"{source_group}; GQA groups are pruned whole, so set num_attention_heads = "
            f"{source_group} * num_key_value_heads."
        )
    for name in arch.fixed_fields(source_config):
        now, wanted = getattr(source_config, name, None), getattr(target_config, name, None)
        if name == "head_dim":
            now, wanted = arch.head_dim_of(source_config), arch.head_dim_of(target_config)
        if wanted != now:
            raise ValueError(
                f"target {name}={wanted} differs from the source's {now}; SlimMoE only prunes the experts' width "
                f"({arch.expert_width}), GQA groups and shared experts, every other size is kept."
            )
    if target["num_key_value_heads"] != source["num_key_value_heads"] and not arch.attention_prunable:
        raise ValueError(f"target num_key_value_heads: the attention of {arch.model_type} models cannot be pruned "
                         f"({arch.attention_refusal}); slim the experts only.")


def geometric_size(source: int, target: int, fraction: float, multiple: int) -> int:
    """`source * (target / source) ** fraction` rounded to a multiple of `multiple`, within `[target, source]`."""
    value = source * (target / source) ** fraction
    rounded = int(round(value / multiple)) * multiple
    return min(source, max(target, rounded))


def _stage_arguments(arch, sizes: dict[str, int], target_config) -> dict[str, int]:
    """`slim_config` arguments for one stage. A family that sizes its shared experts as expert width x count
    (DeepSeek) keeps the target's count, so its shared experts narrow with the routed ones."""
    sizes = dict(sizes)
    if arch.shared_expert is not None and arch.shared_expert.count:
        sizes["shared_expert_width"] = sizes["expert_width"] * getattr(target_config, arch.shared_expert.count)
    return sizes


def _geometric_sizes(source: dict, target: dict, fraction: float, expert_multiple: int) -> dict[str, int]:
    multiples = {"expert_width": expert_multiple, "num_key_value_heads": 1, "shared_expert_width": expert_multiple}
    return {name: geometric_size(source[name], target[name], fraction, multiples[name]) for name in source}


def config_between(source_config, target_config, fraction: float, expert_multiple: int = 64):
    """The configuration `fraction` of the way from `source_config` (0) to `target_config` (1) on the geometric
    schedule of [`plan_stages`] in continuous time (the iterative baseline's masks): every pruned size is
    `source * (target / source) ** fraction` rounded to a multiple (`expert_multiple` for widths), the target's
    sizes from 1 on."""
    arch = get_architecture(source_config)
    source, target = stage_sizes(source_config), stage_sizes(target_config)
    sizes = target if fraction >= 1 else _geometric_sizes(source, target, fraction, expert_multiple)
    return slim_config(source_config, **_stage_arguments(arch, sizes, target_config))


def plan_stages(source_config, target_config, num_stages: int, expert_multiple: int = 64) -> list:
    """The geometric multi-stage schedule from `source_config` to `target_config` (any supported family).

    Args:
        source_config: configuration of the model being compressed (the teacher).
        target_config: the final size; must differ from the source only in the expert width, `num_key_value_heads`
            (with the same query heads per group) and the shared expert width, see `slim_config`.
        num_stages: number of prune-then-distill stages T (2 for Phi-mini-MoE, 3 for Phi-tiny-MoE; 1 is one-shot).
        expert_multiple: intermediate stages round widths to a multiple of this (the target is kept as is).

    Returns:
        `num_stages` configurations of the source's class, non-increasing in every pruned dimension; the last has
        the target's sizes.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}.")
    if isinstance(expert_multiple, bool) or not isinstance(expert_multiple, int) or expert_multiple < 1:
        raise ValueError(f"expert_multiple must be a positive integer, got {expert_multiple!r}.")
    check_target(source_config, target_config)
    arch = get_architecture(source_config)
    source, target = stage_sizes(source_config), stage_sizes(target_config)
    stages, previous = [], source
    for i in range(1, num_stages + 1):
        sizes = dict(target) if i == num_stages else _geometric_sizes(source, target, i / num_stages, expert_multiple)
        sizes = {name: min(value, previous[name]) for name, value in sizes.items()}  # never grow back
        stages.append(slim_config(source_config, **_stage_arguments(arch, sizes, target_config)))
        previous = stage_sizes(stages[-1])
    return stages


def pinned_stages(source_config, sizes: Sequence[Mapping[str, int]]) -> list:
    """Stage configurations from explicit per-stage sizes, e.g. `[{"intermediate_size": 2240}, {...}]`.

    Each entry may give the expert width (`expert_width` or the family's field, e.g. `intermediate_size` /
    `moe_intermediate_size`), `num_key_value_heads`, the shared expert width (`shared_expert_width` or the family's
    field) and, as a check, `num_attention_heads`; a missing size keeps the previous stage's value. Sizes must not
    grow from one stage to the next.
    """
    if not sizes:
        raise ValueError("stages.sizes is empty: give at least one stage size.")
    keys = size_keys(source_config)
    stages, previous = [], source_config
    for i, entry in enumerate(sizes, start=1):
        if not isinstance(entry, Mapping):
            raise ValueError(f"stages.sizes[{i - 1}] must be a mapping of {', '.join(keys)}, got {entry!r}.")
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise ValueError(f"stages.sizes[{i - 1}] has unknown key(s) {unknown}; allowed: {', '.join(keys)}.")
        arguments = {keys[key]: value for key, value in entry.items() if keys[key] != "num_attention_heads"}
        try:
            config = slim_config(previous, **arguments)
        except ValueError as e:
            message = str(e).replace("slim_config: ", "")
            for key in entry:  # name the sizes as the recipe wrote them
                message = message.replace(f"{keys[key]}=", f"{key}=") if key != keys[key] else message
            raise ValueError(f"stages.sizes[{i - 1}] (stage {i}): {message}") from None
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


def plan_rows(source_config, stages: Sequence) -> list[dict]:
    """One dict per model of the plan (stage 0 = the source), with sizes and total/active parameters."""
    total0, active0 = count_parameters(source_config)
    rows = []
    for i, config in enumerate([source_config, *stages]):
        total, active = count_parameters(config)
        sizes = stage_sizes(config)
        rows.append({
            "stage": i,
            "model_type": config.model_type,
            "expert_width": sizes["expert_width"],
            "intermediate_size": sizes["expert_width"],  # the expert width, under its PhiMoE name
            "shared_expert_width": sizes.get("shared_expert_width"),
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "num_parameters": total,
            "num_active_parameters": active,
            "percent_of_teacher": 100.0 * total / total0,
            "percent_active_of_teacher": 100.0 * active / active0,
        })
    return rows


def format_plan(source_config, stages: Sequence, budgets: Sequence[str] | None = None,
                title: str | None = None) -> str:
    """The plan as a text table: stage, d_expert (and the shared expert width where the family has one), heads q/kv,
    total and active parameters, % of the teacher, and (optionally) each stage's training budget; the last line is
    the total-parameter trajectory."""
    shared = get_architecture(source_config).shared_expert is not None
    header = ["stage", "d_expert", *(["d_shared"] if shared else []), "heads q/kv", "total", "active",
              "% teacher (total/active)"]
    if budgets is not None:
        header.append("budget")
    table = []
    for row in plan_rows(source_config, stages):
        line = [
            "teacher" if row["stage"] == 0 else str(row["stage"]),
            str(row["expert_width"]),
            *([str(row["shared_expert_width"])] if shared else []),
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
        human_count(count_parameters(c)[0]) for c in [source_config, *stages]))
    return "\n".join(lines)


__all__ = [
    "config_between",
    "plan_stages",
    "pinned_stages",
    "check_target",
    "plan_rows",
    "format_plan",
    "stage_sizes",
    "size_keys",
    "geometric_size",
    "SIZE_NAMES",
]
