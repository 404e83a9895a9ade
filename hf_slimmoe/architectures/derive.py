"""Read a family's [`MoeArchitecture`] off a model built from its configuration on the meta device.

Nothing here names a family. A model of the configuration is built on the meta device (no memory, no weights) and
walked:

- **routed experts**: the module of each decoder layer holding a 3D `down_proj` parameter (transformers' fused layout);
  its layout flags (`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`) are the ones
  `@use_experts_implementation` records, or, for an undecorated experts module, read from the shapes;
- **configuration fields**: the field of the expert width (expert count, shared width, ...) is the one whose value
  matches the shape *and* that changes the shape when it changes (a second meta build with the field perturbed
  tells apart fields of equal value and shows which widths are tied: a shared expert sized `x n_shared` or equal to the
  routed width, a dense MLP sized by the expert width field);
- **router, shared expert, gate**: the block's children holding a `[E, H]` weight, a dense MLP (`down_proj` Linear),
  a `Linear(H, 1)`;
- **attention**: per layer, the module with `q_proj`/`k_proj`/`v_proj`/`o_proj` Linears; what else it holds (per-head
  norms, per-query-head parameters such as sinks, queries interleaved with per-head gates) decides whether whole GQA
  groups can leave exactly. Layers without such a module (linear attention, Mamba, MLA) keep their attention.

What cannot be read off the model comes from `FAMILY_OVERRIDES` (a refusal reason, vLLM's architecture name).
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import replace

import torch
from torch import nn

from .adapter import MoeArchitecture, SharedExpert
from .skeleton import UnsupportedArchitecture, build_skeleton, config_key, decoder_layers, skeleton, submodule

logger = logging.getLogger(__name__)

# Parameters an experts module may hold besides its weights: their per-expert biases.
_EXPERT_PARAMETERS = {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"}
_GQA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _is_experts(module: nn.Module) -> bool:
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3


def find_experts(layer: nn.Module) -> str | None:
    """Path (in `layer`) of its fused routed experts module, `None` on a layer without one."""
    paths = [name for name, module in layer.named_modules() if name and _is_experts(module)]
    if len(paths) > 1:
        raise UnsupportedArchitecture(f"a decoder layer holds {len(paths)} experts modules ({', '.join(paths)}).")
    return paths[0] if paths else None


def experts_layout(experts: nn.Module, hidden_size: int) -> dict:
    """The layout flags of a fused experts module and its `(num_experts, width)`."""
    down = experts.down_proj
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:  # undecorated: [E, I, H] when transposed, [E, H, I] otherwise
        transposed = down.shape[2] == hidden_size and down.shape[1] != hidden_size
    has_gate = getattr(experts, "has_gate", isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter))
    return {"transposed": bool(transposed), "concatenated": bool(getattr(experts, "is_concatenated", True)),
            "bias": bool(getattr(experts, "has_bias", False)), "gate": bool(has_gate),
            "num_experts": down.shape[0], "width": down.shape[1] if transposed else down.shape[2]}


def _int_fields(config) -> dict[str, int]:
    return {k: v for k, v in config.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)}


def _perturbed(config, name: str, value: int):
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
    values[name] = value
    try:
        return type(config)(**values)
    except Exception:  # the family's validation refuses the value: not a field we can probe this way
        return None


def _changes(config, name: str, value: int, probe) -> object | None:
    """`probe(model)` of a meta model built with `config.name = value`, or `None` if it cannot be built."""
    changed = _perturbed(config, name, value)
    if changed is None:
        return None
    try:
        return probe(build_skeleton(changed))
    except Exception:
        return None


def field_of(config, value: int, probe, hint: str = "", only_hint: bool = False) -> str | None:
    """The configuration field holding `value` that `probe(meta model)` follows: among the fields whose value is
    `value` (those whose name contains `hint` first; only those with `only_hint`), the first one whose doubling
    changes `probe`'s reading."""
    now = probe(skeleton(config))
    candidates = sorted((k for k, v in _int_fields(config).items() if v == value and (hint in k or not only_hint)),
                        key=lambda k: hint not in k)
    for name in candidates:
        if _changes(config, name, value * 2, probe) not in (None, now):
            return name
    return None


def _block_children(block: nn.Module, experts_name: str, num_experts: int, hidden: int,
                    extra_rows: set[int]) -> dict[str, str | None]:
    """Router, shared expert and shared-expert gate among the MoE block's direct children. A router has a row per
    expert, plus as many as a configuration field of experts says (`extra_rows`: zero-compute experts)."""
    found = {"router": None, "shared": None, "shared_gate": None}
    for name, child in block.named_children():
        if name == experts_name:
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[1] == hidden and (
                weight.shape[0] - num_experts in {0, *extra_rows} or weight.shape[0] == 1) and (
                not isinstance(getattr(child, "down_proj", None), nn.Linear)):
            if weight.shape[0] == 1 and num_experts > 1:
                found["shared_gate"] = name
            elif found["router"] is None:
                found["router"] = name
        elif isinstance(getattr(child, "down_proj", None), nn.Linear) and isinstance(
                getattr(child, "up_proj", None), nn.Linear):
            found["shared"] = name
        elif isinstance(child, nn.Linear) and child.out_features == 1:
            found["shared_gate"] = name
    return found


def _join(*parts: str | None) -> str | None:
    if any(part is None for part in parts[1:]):
        return None
    return ".".join(part for part in parts if part)


def _experts_path(model_type: str, layers: nn.ModuleList) -> str:
    try:
        paths = {find_experts(layer) for layer in layers} - {None}
    except UnsupportedArchitecture as error:
        raise UnsupportedArchitecture(f"{model_type}: routed experts: {error}") from None
    if not paths:
        raise UnsupportedArchitecture(
            f"{model_type}: routed experts: no decoder layer of this configuration holds fused experts (a module "
            "with a 3D down_proj parameter, the layout `@use_experts_implementation` decorates): the configuration "
            "is dense, or keeps its experts as separate modules or in another layout, which cannot go through the "
            "same slicing.")
    if len(paths) > 1:
        raise UnsupportedArchitecture(f"{model_type}: routed experts: the layers keep them at different paths "
                                      f"({', '.join(sorted(paths))}).")
    return paths.pop()


def _check_experts(model_type: str, experts: nn.Module, hidden_size: int) -> dict:
    layout = experts_layout(experts, hidden_size)
    extra = {name for name, _ in experts.named_parameters()} - _EXPERT_PARAMETERS
    if extra:
        raise UnsupportedArchitecture(f"{model_type}: routed experts: the experts module holds {sorted(extra)} besides "
                                      "its projections and biases; slicing them is not defined.")
    if not layout["gate"] and not isinstance(getattr(experts, "up_proj", None), nn.Parameter):
        raise UnsupportedArchitecture(f"{model_type}: routed experts: no gate_up_proj or up_proj parameter.")
    return layout


def widths(model: nn.Module, paths: dict[str, str | None]) -> dict[str, int | None]:
    """The routed, shared and dense MLP widths of a (meta) model, read at `paths` in the first layer having each."""
    out = {"experts": None, "shared": None, "dense": None}
    for layer in decoder_layers(model):
        experts = submodule(layer, paths["experts"])
        if experts is not None:
            out["experts"] = out["experts"] or experts_layout(experts, model.config.hidden_size)["width"]
            shared = submodule(layer, paths["shared"])
            out["shared"] = out["shared"] or (shared.down_proj.in_features if shared is not None else None)
        else:
            down = getattr(submodule(layer, paths["block"]) if paths["block"] else None, "down_proj", None)
            out["dense"] = out["dense"] or (down.in_features if isinstance(down, nn.Linear) else None)
    return out


def _shared_expert(config, paths, width_field: str, base: dict, widened: dict, shared_gate: str | None):
    """The [`SharedExpert`] of the block: a width tied to the routed field (`x count` or equal) or its own field."""
    module = paths["shared"].rpartition(".")[2]
    if widened["shared"] != base["shared"]:  # follows the routed width field
        ratio, rest = divmod(base["shared"], base["experts"])
        if rest or ratio < 1:
            raise UnsupportedArchitecture(f"{config.model_type}: shared expert: its width {base['shared']} follows "
                                          f"{width_field} but is not a multiple of it.")
        count = field_of(config, ratio, lambda m: widths(m, paths)["shared"], hint="shared", only_hint=ratio == 1)
        if ratio > 1 and count is None:
            raise UnsupportedArchitecture(f"{config.model_type}: shared expert: width {base['shared']} = "
                                          f"{ratio} x {width_field} but no configuration field holds {ratio}.")
        return SharedExpert(module=module, count=count, gate=shared_gate, tied=True)
    field = field_of(config, base["shared"], lambda m: widths(m, paths)["shared"], hint="shared")
    if field is None:
        raise UnsupportedArchitecture(f"{config.model_type}: shared expert: no configuration field holds its "
                                      f"width {base['shared']}.")
    return SharedExpert(module=module, width=field, gate=shared_gate)


def _moe_block_facts(config, layers: nn.ModuleList) -> dict:
    """Paths, layout and configuration fields of the routed experts, router, shared expert and dense layers."""
    model_type, hidden = config.model_type, config.hidden_size
    experts_path = _experts_path(model_type, layers)
    block_path, _, experts_name = experts_path.rpartition(".")
    index = next(i for i, layer in enumerate(layers) if submodule(layer, experts_path) is not None)
    layout = _check_experts(model_type, layers[index].get_submodule(experts_path), hidden)
    block = layers[index].get_submodule(block_path) if block_path else layers[index]
    extra = {v for k, v in _int_fields(config).items() if re.search(r"(zero|null|identity).*expert", k) and v > 0}
    children = _block_children(block, experts_name, layout["num_experts"], hidden, extra)
    paths = {"experts": experts_path, "block": block_path, "shared": _join(block_path, children["shared"])}
    width_field = field_of(config, layout["width"], lambda m: widths(m, paths)["experts"], hint="intermediate")
    count_field = field_of(config, layout["num_experts"], lambda m: experts_layout(
        decoder_layers(m)[index].get_submodule(experts_path), hidden)["num_experts"], hint="expert")
    for part, field in (("expert width", width_field), ("expert count", count_field)):
        if field is None:
            raise UnsupportedArchitecture(f"{model_type}: {part}: no configuration field changes it.")
    base = widths(skeleton(config), paths)
    widened = widths(build_skeleton(_perturbed(config, width_field, 2 * layout["width"])), paths)
    shared = None if base["shared"] is None else _shared_expert(
        config, paths, width_field, base, widened, children["shared_gate"])
    dense_tied = base["dense"] is not None and widened["dense"] != base["dense"]
    if dense_tied and base["dense"] != base["experts"]:
        raise UnsupportedArchitecture(f"{model_type}: dense layers: their MLP width {base['dense']} follows the "
                                      f"experts' field {width_field} ({base['experts']}) without being equal to it.")
    return {"layout": layout, "paths": paths, "router": children["router"], "shared": shared,
            "width_field": width_field, "count_field": count_field, "dense_tied": dense_tied, "block": block}


def _top_k_field(config, block: nn.Module, router: str | None) -> str | None:
    """The configuration field of the experts per token: the one holding the router's (or block's) `top_k`
    attribute, else the field named like it (a default configuration may leave it unset)."""
    holders = [getattr(block, router) if router else None, block]
    value = next((getattr(h, a) for h in holders if h is not None for a in ("top_k", "num_experts_per_tok")
                  if isinstance(getattr(h, a, None), int)), None)
    named = [k for k in config.to_dict()
             if re.search(r"(^|_)(top_?k(_experts)?|moe_k)$|per_tok", k) and "group" not in k]
    candidates = [k for k, v in _int_fields(config).items() if v == value] if value is not None else []
    return min(candidates, key=lambda k: (k not in named, len(k)), default=named[0] if named else None)


def _expert_groups_field(config, block: nn.Module, router: str | None) -> str | None:
    holders = [getattr(block, router) if router else None, block]
    value = next((getattr(h, a) for h in holders if h is not None for a in ("n_group", "num_group", "num_expert_group")
                  if isinstance(getattr(h, a, None), int)), None)
    if not isinstance(value, int) or value <= 1:
        return None
    return next((k for k, v in _int_fields(config).items() if v == value and "group" in k and "topk" not in k), None)


def _aux_loss(model: nn.Module) -> str | None:
    """`"module:load_balancing_loss_func"` when the family's causal LM adds its own load-balancing loss."""
    owner = next(c for c in type(model).__mro__ if "forward" in vars(c))  # SlimMoE runs PhiMoE's forward
    module = inspect.getmodule(owner)
    function = getattr(module, "load_balancing_loss_func", None)
    if function is None or "load_balancing_loss_func" not in inspect.getsource(owner.forward):
        return None
    parameters = list(inspect.signature(function).parameters)
    if parameters[:3] != ["gate_logits", "num_experts", "top_k"]:
        return None
    return f"{module.__name__}:load_balancing_loss_func"


def _gqa_modules(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in layer.named_modules()
            if all(isinstance(getattr(module, p, None), nn.Linear) for p in _GQA_PROJECTIONS)]


def _gqa_facts(config, attention: nn.Module) -> dict:
    """What a GQA attention module holds besides its projections; raises `ValueError` with the reason when whole
    groups cannot leave it exactly."""
    heads, groups = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    head_dim = attention.o_proj.in_features // heads
    if not groups or attention.o_proj.in_features != heads * head_dim:
        raise ValueError(f"o_proj has {attention.o_proj.in_features} inputs for {heads} heads")
    for name in ("k_proj", "v_proj"):
        if getattr(attention, name).out_features != groups * head_dim:
            raise ValueError(f"{name} has {getattr(attention, name).out_features} outputs, not num_key_value_heads x "
                             f"head_dim = {groups} x {head_dim}")
    rows, rest = divmod(attention.q_proj.out_features, heads * head_dim)
    if rest or rows not in (1, 2):
        raise ValueError(f"q_proj has {attention.q_proj.out_features} outputs for {heads} heads of {head_dim}")
    for name, child in attention.named_children():
        shapes = [tuple(p.shape) for p in child.parameters()]
        if name in _GQA_PROJECTIONS or not shapes or all(shape == (head_dim,) for shape in shapes):
            continue  # projections, modules without weights (rotary), per-head norms
        raise ValueError(f"{name} holds weights of shapes {shapes}, not per-head ({head_dim},) ones (a norm over the "
                         "whole projection, an indexer, ...), so the kept heads would not compute what they did")
    query_parameters = []
    for name, param in attention.named_parameters(recurse=False):
        if param.dim() == 0 or param.shape[0] != heads:
            raise ValueError(f"parameter {name} {list(param.shape)} is not one entry per query head")
        query_parameters.append(name)
    return {"gated_queries": rows == 2, "query_head_parameters": tuple(query_parameters), "head_dim": head_dim}


def _follows_head_counts(config, path: str, attention_class: str, head_dim: int, rows: int) -> str | None:
    """Why fewer GQA groups cannot be expressed, or `None`: a model built with half the groups (as many query heads
    per group, the same `head_dim`) must size every attention module of class `attention_class` at `path` by the new
    `num_attention_heads` / `num_key_value_heads`, and nothing else by them (a hybrid's linear attention may be)."""
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    if groups < 2:
        return None  # a single group cannot be checked (nor pruned)
    groups_new = groups // 2
    heads_new = groups_new * (heads // groups)
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
    values.update(num_attention_heads=heads_new, num_key_value_heads=groups_new, head_dim=head_dim)
    try:
        model = build_skeleton(type(config)(**values))
    except Exception as error:
        return f"a model with fewer num_key_value_heads cannot be built ({type(error).__name__}: {error})"
    original = decoder_layers(skeleton(config))
    for index, layer in enumerate(decoder_layers(model)):
        attention, pruned = submodule(layer, path), "\0"
        if type(attention).__name__ == attention_class:
            if not all(isinstance(getattr(attention, p, None), nn.Linear) for p in _GQA_PROJECTIONS):
                return (f"a model built with fewer num_key_value_heads has {attention_class} layers without "
                        "q/k/v/o_proj")
            if (attention.q_proj.out_features != heads_new * head_dim * rows
                    or attention.k_proj.out_features != groups_new * head_dim
                    or attention.o_proj.in_features != heads_new * head_dim):
                return "a model built with fewer num_key_value_heads does not size every attention layer by them"
            pruned = f"{path}."
        before = dict(original[index].named_parameters())
        for name, param in layer.named_parameters():
            if not name.startswith(pruned) and name in before and before[name].shape != param.shape:
                return (f"num_attention_heads also sizes {name} of layer {index} (not GQA attention), which would "
                        "have to narrow with the pruned heads")
    return None


def _attention_facts(config, layers: nn.ModuleList) -> dict:
    """The GQA attention path and class and what pruning whole groups of it needs, or why it cannot be pruned. A
    module with q/k/v/o projections that fails the checks is taken for another kind of mixer (a hybrid's linear
    attention) when another class at the same path passes them."""
    refused = {"attention": None, "attention_class": None, "gated_queries": False, "query_head_parameters": (),
               "attention_prunable": False}
    candidates = {}  # (path, class) -> first module
    for layer in layers:
        for path, module in _gqa_modules(layer):
            candidates.setdefault((path, type(module).__name__), module)
    if not candidates:
        mla = any(hasattr(module, "kv_b_proj") for module in layers[0].modules())
        reason = ("it uses multi-head latent attention (MLA): keys and values are decoded per head from one shared "
                  "latent (kv_b_proj) with a shared rotary key, so there are no GQA groups to remove" if mla else
                  "no layer has an attention module with q_proj/k_proj/v_proj/o_proj Linears")
        return {**refused, "attention_refusal": reason}
    passed, reasons = [], []
    for (path, name), module in candidates.items():
        try:
            passed.append((path, name, _gqa_facts(config, module)))
        except ValueError as error:
            reasons.append(f"{name}: {error}")
    if len(passed) != 1 or len({path for path, _ in candidates}) > 1:
        reason = "; ".join(reasons) if not passed else (
            f"GQA attention of several kinds or paths ({', '.join(f'{n} at {p}' for p, n in candidates)})")
        return {**refused, "attention_refusal": reason}
    path, name, facts = passed[0]
    reason = _follows_head_counts(config, path, name, facts["head_dim"], 2 if facts["gated_queries"] else 1)
    if reason:
        return {**refused, "attention_refusal": reason}
    return {"attention": path, "attention_class": name, "gated_queries": facts["gated_queries"],
            "attention_refusal": "", "query_head_parameters": facts["query_head_parameters"],
            "attention_prunable": True}


def _derive(config) -> MoeArchitecture:
    from .families import FAMILY_OVERRIDES

    overrides = dict(FAMILY_OVERRIDES.get(config.model_type, {}))
    if "refusal" in overrides:
        raise UnsupportedArchitecture(f"{config.model_type}: {overrides['refusal']}")
    model = skeleton(config)
    layers = decoder_layers(model)
    moe = _moe_block_facts(config, layers)
    top_k = _top_k_field(config, moe["block"], moe["router"])
    if top_k is None:
        raise UnsupportedArchitecture(f"{config.model_type}: router: no configuration field holds its experts per "
                                      "token.")
    attention = _attention_facts(config, layers)
    block, _, experts = moe["paths"]["experts"].rpartition(".")
    layout = moe["layout"]
    arch = MoeArchitecture(
        model_type=config.model_type, architecture=type(model).__name__, expert_width=moe["width_field"],
        num_experts=moe["count_field"], top_k=top_k, moe_block=block, router=moe["router"], experts=experts,
        shared_expert=moe["shared"], expert_groups=_expert_groups_field(config, moe["block"], moe["router"]),
        dense_tied=moe["dense_tied"],
        expert_bias=layout["bias"], expert_gate=layout["gate"], expert_transposed=layout["transposed"],
        expert_concatenated=layout["concatenated"], aux_loss=_aux_loss(model), **attention)
    return replace(arch, **overrides)


_ARCHITECTURES: dict[tuple, MoeArchitecture] = {}


def derive_architecture(config) -> MoeArchitecture:
    """The [`MoeArchitecture`] of `config`'s family, read off a meta-device model of it (cached per configuration).

    Raises:
        [`UnsupportedArchitecture`] (a `ValueError`): naming the `model_type`, the part and the reason.
    """
    key = config_key(config)
    if key not in _ARCHITECTURES:
        _ARCHITECTURES[key] = _derive(config)
    return _ARCHITECTURES[key]


__all__ = ["find_experts", "experts_layout", "field_of", "widths", "derive_architecture"]
