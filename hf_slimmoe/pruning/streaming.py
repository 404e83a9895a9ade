"""Streaming surgery: prune a (sharded) safetensors checkpoint tensor by tensor, never holding the model in memory.

[`prune_checkpoint`] writes the tensors that `from_pretrained` + `prune_to(target, scores)` + `save_pretrained` write,
bit for bit, without loading the model. Scores and the target sizes fully determine every output tensor, so the input
is read one tensor at a time through `safetensors.safe_open` lazy slices, a block of at most `max_piece_bytes` at a
time (only the pages of the kept rows and columns of a pruned tensor are touched), and each output shard is written as
a stream: its header is computed from the input headers before any weight is read, then each piece is appended as
soon as it is cut (see `safetensors_stream`). The input is opened per piece, so its memory-mapped pages never add up:
peak memory is about a block of input plus a piece of output, whatever the checkpoint's size; an 84 GB Phi-3.5-MoE
prunes on a machine with a few GB.

The output mirrors the input: shard `k` holds the pruned tensors of input shard `k` under the same names and in the
same key layout, with `model.safetensors.index.json` (or a single `model.safetensors` for a single-file input), the
pruned `config.json`, the generation config, the tokenizer files and, with `card=True`, a `stage.json` and model card.

How a stored tensor is cut is data: a [`SliceRule`] says which module keys it matches, which kept-index set it uses
and along which dim; [`family_rules`] reads the rules of a family off its architecture adapter, in transformers'
module layout:

    fused experts                           layers.L.mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]
    fused transposed (gpt-oss)              layers.L.mlp.experts.gate_up_proj [E, H, 2I] (gate/up interleaved) and
                                            its bias [E, 2I], down_proj [E, I, H]
    shared expert (Qwen2-MoE, DeepSeek)     layers.L.mlp.shared_expert(s).gate_proj/up_proj (rows), down_proj (columns)
    GQA attention                           layers.L.self_attn.q/k/v_proj.weight|bias (rows), o_proj.weight (columns),
                                            per-query-head parameters (gpt-oss sinks)

A checkpoint stores its tensors in the family's *original* key layout, the one `save_pretrained` writes by reverting
transformers' conversion mapping (`transformers.conversion_mapping`): PhiMoE / Mixtral keep
`block_sparse_moe.experts.E.w1/w2/w3.weight`, Qwen / DeepSeek `mlp.experts.E.gate_proj/up_proj/down_proj.weight`,
GraniteMoE `input_linear` / `output_linear`, Aria `fc1` / `fc2`, Nemotron-H `backbone.` ... Every stored key is read
through that same mapping ([`ModuleKeys`]): renamed to its module key and, where a converter stacks the experts
(`MergeModulelist`) and concatenates the gate and up halves (`Concatenate`), cut as one expert's slice of the fused
tensor. No key layout is written here.

Every other tensor (dense layers' MLPs, routers, norms, MLA attention, embeddings) is copied unchanged. A checkpoint
whose experts are stored through other conversions, or that misses some layer or expert, is refused before anything
is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from ..architectures import config_from_dict, get_architecture
from ..architectures.skeleton import skeleton
from ..utils.outputs import staged_directory
from .safetensors_stream import SafetensorsStreamWriter, tensor_nbytes
from .surgery import gqa_rows, head_rows, keep_indices, validate_prune_target

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_LAYER = r"(?:.+\.)?layers\.(?P<layer>\d+)\."
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class SliceRule:
    """
    How one kind of stored tensor is cut.

    Attributes:
        pattern (`str`): a regular expression matched in full against module keys (a stored key as transformers'
            conversion mapping renames it); its group `layer` is the decoder layer.
        index (`str`): the kept indices used: `"neurons"` (the expert's kept neurons), `"gate_up"` (the expert's kept
            neurons in both halves of a fused gate/up projection, gate half first), `"gate_up_interleaved"` (the same
            in gpt-oss's interleaved gate/up: gate at even, up at odd positions), `"shared"` (the shared expert's
            kept neurons), `"q"` (the rows of the kept query heads), `"kv"` (the rows of the kept key/value heads) or
            `"q_heads"` (the kept query heads themselves, for one-entry-per-head parameters such as `sinks`).
        dim (`int`): the dim of the stored tensor those indices select.
        fused (`bool`): dim 0 enumerates the experts (transformers' fused layout); each expert is cut with its own
            kept neurons.
        required (`bool`): every layer (and expert) must store this tensor; `False` for optional ones such as biases.
        moe_only (`bool`): only the MoE layers hold it (routed and shared experts), not the dense ones.
        attention_only (`bool`): only the layers with GQA attention hold it (not a hybrid's linear-attention or Mamba
            layers).
        dense_only (`bool`): only the dense layers hold it (dense MLPs sized by the expert width field, Jamba).
        per_expert (`bool`): one stored tensor per expert (a piece of a fused tensor the conversion mapping stacks);
            its expert is read off the stored key.
    """

    pattern: str
    index: str
    dim: int
    fused: bool = False
    required: bool = True
    moe_only: bool = False
    attention_only: bool = False
    dense_only: bool = False
    per_expert: bool = False


def fused_rules(arch) -> tuple[SliceRule, ...]:
    """The rules of transformers' fused experts module at the family's path, in its layout: `gate_up_proj`
    `[E, 2I, H]` (`[E, H, 2I]` transposed; gate half first or interleaved) or an `up_proj` without gate, its bias,
    and `down_proj` `[E, H, I]` (`[E, I, H]` transposed)."""
    prefix = _LAYER + re.escape(".".join(part for part in (arch.moe_block, arch.experts) if part) + ".")
    transposed = arch.expert_transposed
    name, index = ("gate_up_proj", "gate_up" if arch.expert_concatenated else "gate_up_interleaved") \
        if arch.expert_gate else ("up_proj", "neurons")
    return (SliceRule(prefix + name, index, 2 if transposed else 1, fused=True, moe_only=True),
            SliceRule(prefix + name + "_bias", index, 1, fused=True, required=False, moe_only=True),
            SliceRule(prefix + "down_proj", "neurons", 1 if transposed else 2, fused=True, moe_only=True))


def attention_rules(arch) -> tuple[SliceRule, ...]:
    """The rules of the GQA attention at the family's path: `q_proj` rows (with each head's gate rows where the
    queries are gated), `k_proj`/`v_proj` rows, `o_proj` columns and the per-query-head parameters."""
    prefix = _LAYER + re.escape(arch.attention + ".")
    q = "q_gated" if arch.gated_queries else "q"
    rules = [SliceRule(prefix + r"q_proj\.weight", q, 0), SliceRule(prefix + r"q_proj\.bias", q, 0, required=False),
             SliceRule(prefix + r"o_proj\.weight", "q", 1)]
    for name in ("k_proj", "v_proj"):
        rules += [SliceRule(prefix + name + r"\.weight", "kv", 0),
                  SliceRule(prefix + name + r"\.bias", "kv", 0, required=False)]
    rules += [SliceRule(prefix + re.escape(name), "q_heads", 0) for name in arch.query_head_parameters]
    return tuple(SliceRule(r.pattern, r.index, r.dim, required=r.required, attention_only=True) for r in rules)


def family_rules(arch) -> tuple[SliceRule, ...]:
    """The slicing rules of a family's module keys, read off its adapter ([`MoeArchitecture`]): its fused routed
    experts, shared expert and attention."""
    rules = list(fused_rules(arch))
    if arch.shared_expert is not None:
        shared = _LAYER + re.escape(".".join(part for part in (arch.moe_block, arch.shared_expert.module) if part) + ".")
        rules += [SliceRule(shared + r"gate_proj\.weight", "shared", 0, required=False, moe_only=True),
                  SliceRule(shared + r"up_proj\.weight", "shared", 0, moe_only=True),
                  SliceRule(shared + r"down_proj\.weight", "shared", 1, moe_only=True),
                  SliceRule(shared + r"gate_proj\.bias", "shared", 0, required=False, moe_only=True),
                  SliceRule(shared + r"up_proj\.bias", "shared", 0, required=False, moe_only=True)]
    if arch.dense_tied:  # dense MLPs narrow with the experts: rows of gate_proj / up_proj, columns of down_proj
        dense = _LAYER + re.escape(arch.moe_block + ".")
        rules += [SliceRule(dense + r"gate_proj\.weight", "dense", 0, required=False, dense_only=True),
                  SliceRule(dense + r"up_proj\.weight", "dense", 0, dense_only=True),
                  SliceRule(dense + r"down_proj\.weight", "dense", 1, dense_only=True)]
    if arch.attention_prunable:
        rules += list(attention_rules(arch))
    return tuple(rules)


@dataclass
class TensorCut:
    """One stored tensor and how it is written: `rule` is `None` for a tensor copied unchanged."""

    key: str
    shard: str
    dtype: str
    shape: list[int]
    rule: SliceRule | None = None
    layer: int | None = None
    expert: int | None = None
    half: int | None = None
    out_shape: list[int] | None = None


# ----------------------------------------------------------------------------------------------------- reading
def checkpoint_shards(model_dir: str) -> tuple[dict[str, list[str]], bool]:
    """The safetensors files of a checkpoint directory and the keys each holds: `({file: [keys]}, sharded)`.

    Reads `model.safetensors.index.json` when present (`sharded=True`), else `model.safetensors`.

    Raises:
        `FileNotFoundError`: no weights, or a shard the index names is missing.
    """
    index_path = os.path.join(model_dir, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map") or {}
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise FileNotFoundError(f"{index_path} names shard(s) that are missing: {', '.join(sorted(missing)[:4])}.")
        return dict(sorted(shards.items())), True
    single = os.path.join(model_dir, WEIGHTS_NAME)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"No {WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME} in {model_dir}: streaming surgery reads "
                                "safetensors checkpoints (save the model with `save_pretrained`).")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {WEIGHTS_NAME: list(f.keys())}, False


def read_headers(model_dir: str, shards: dict[str, list[str]]) -> tuple[list[TensorCut], dict[str, dict]]:
    """Every stored tensor's dtype and shape, and every shard's metadata, from the safetensors headers only."""
    from safetensors import safe_open

    cuts, metadata = [], {}
    for shard, keys in shards.items():
        with safe_open(os.path.join(model_dir, shard), "pt") as f:
            stored = set(f.keys())
            absent = [k for k in keys if k not in stored]
            if absent:
                raise ValueError(f"{shard} does not hold {', '.join(absent[:4])}, which the index places there.")
            metadata[shard] = f.metadata()
            for key in keys:
                piece = f.get_slice(key)
                cuts.append(TensorCut(key=key, shard=shard, dtype=piece.get_dtype(), shape=list(piece.get_shape())))
    return cuts, metadata


# ----------------------------------------------------------------------------------------------------- planning
class ModuleKeys:
    """Reads stored keys as transformers' conversion mapping of the family does when it loads them
    (`get_model_conversion_mapping` of a meta-device model): every renaming, then at most one converter.

    A tensor stored whole has its module key (renamed or not); one expert's tensor that a converter stacks into a fused
    module tensor (`MergeModulelist` on dim 0, followed for a GLU by `Concatenate` on dim 1 of its gate and up source
    patterns, gate half first) is that tensor's `piece`.
    """

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        conversions = get_model_conversion_mapping(model, add_legacy=False)
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.converters = [c for c in conversions if isinstance(c, WeightConverter)]

    def read(self, key: str) -> tuple[str, str | None]:
        """`(module key, the matching converter's source pattern or None)` of a stored key."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(key, self.renamings, self.converters)

    def piece(self, key: str, name: str, pattern: str) -> tuple[int, int, int]:
        """`(expert, half, halves)` of the stored key `key` that the converter of `pattern` stacks into `name`."""
        from transformers.core_model_loading import Concatenate, MergeModulelist

        converter = next(c for c in self.converters if pattern in c.source_patterns)
        kinds = [type(op) for op in converter.operations]
        halves = len(converter.source_patterns)
        if (kinds not in ([MergeModulelist], [MergeModulelist, Concatenate]) or converter.operations[0].dim != 0
                or (len(kinds) == 2 and (converter.operations[1].dim != 1 or halves != 2))):
            ops = " + ".join(f"{type(op).__name__}(dim={getattr(op, 'dim', None)})" for op in converter.operations)
            raise ValueError(f"{key} is stored through {ops} into {name}; streaming surgery cuts experts stacked on "
                             "dim 0 (with gate and up halves concatenated on dim 1) only.")
        expert = re.search(pattern.replace("*", r"(\d+)"), key)
        if expert is None:
            raise ValueError(f"{key}: no expert number where {pattern!r} has its '*'.")
        return int(expert.group(1)), converter.source_patterns.index(pattern), halves


def piece_rule(rule: SliceRule, halves: int) -> SliceRule:
    """The rule of one expert's stored piece of the fused tensor `rule` cuts (see [`ModuleKeys`]): the expert dim is
    gone, and each of the gate and up halves is cut by the expert's kept neurons."""
    if rule.index == "gate_up_interleaved" or (rule.index == "gate_up") != (halves == 2):
        raise ValueError(f"{rule.pattern}: {halves} stored part(s) per expert do not fit its {rule.index} layout.")
    return SliceRule(rule.pattern, "neurons", rule.dim - 1, required=rule.required, moe_only=rule.moe_only,
                     per_expert=True)


def cut_sizes(arch, config) -> dict[str, int]:
    """The full size of every index kind in a model of `config` (the dim a rule's indices select)."""
    width, heads = arch.expert_width_of(config), config.num_attention_heads
    head_dim = arch.head_dim_of(config)
    return {"neurons": width, "gate_up": 2 * width, "gate_up_interleaved": 2 * width, "dense": width,
            "shared": arch.shared_width_of(config) or 0, "q": heads * head_dim, "q_gated": 2 * heads * head_dim,
            "kv": config.num_key_value_heads * head_dim, "q_heads": heads}


def _assign(cut: TensorCut, keys: ModuleKeys, rules: tuple[SliceRule, ...], arch, config,
            sizes: tuple[dict, dict]) -> None:
    """Attach the rule matching `cut`'s module key (if any), check its stored shape and set `out_shape`."""
    cut.out_shape = list(cut.shape)
    full_sizes, new_sizes = sizes
    name, pattern = keys.read(cut.key)
    for rule in rules:
        match = re.fullmatch(rule.pattern, name)
        if match is None:
            continue
        cut.layer, experts = int(match.group("layer")), arch.num_experts_of(config)
        if pattern is not None:
            if not rule.fused:
                raise ValueError(f"{cut.key} ({cut.shard}) is converted into {name}, which is no fused experts tensor.")
            cut.expert, cut.half, halves = keys.piece(cut.key, name, pattern)
            rule = piece_rule(rule, halves)
        cut.rule = rule
        if (cut.layer >= config.num_hidden_layers or (cut.expert is not None and cut.expert >= experts)
                or (rule.moe_only and cut.layer not in arch.moe_layer_indices(config))
                or (rule.attention_only and cut.layer not in arch.attention_layer_indices(config))
                or (rule.dense_only and cut.layer not in arch.dense_layer_indices(config))):
            raise ValueError(f"{cut.key} ({cut.shard}) names layer {cut.layer}" +
                             (f", expert {cut.expert}" if cut.expert is not None else "") +
                             f"; the config has {config.num_hidden_layers} layers (MoE layers "
                             f"{arch.moe_layer_indices(config)}) of {experts} experts.")
        full = full_sizes[rule.index]
        if len(cut.shape) <= rule.dim or cut.shape[rule.dim] != full or (rule.fused and cut.shape[0] != experts):
            raise ValueError(f"{cut.key} ({cut.shard}) has shape {cut.shape}; the config says dim {rule.dim} holds "
                             f"{full}{f' and dim 0 the {experts} experts' if rule.fused else ''}.")
        cut.out_shape[rule.dim] = new_sizes[rule.index]
        return


def plan_cuts(cuts: list[TensorCut], config, target) -> str:
    """Attach to every stored tensor its slicing rule (read off the family's adapter, see [`family_rules`], through
    its conversion mapping, see [`ModuleKeys`]) and output shape; returns how the experts are stored.

    Raises:
        `ValueError`: the experts are stored through conversions streaming surgery does not cut, a tensor's shape
            disagrees with the config, or a layer or expert lacks a required tensor.
    """
    arch = get_architecture(config)
    keys, rules = ModuleKeys(skeleton(config)), family_rules(arch)
    sizes = (cut_sizes(arch, config), cut_sizes(arch, target))
    for cut in cuts:
        _assign(cut, keys, rules, arch, config, sizes)
    moe_layers, attention_layers = arch.moe_layer_indices(config), arch.attention_layer_indices(config)
    per_expert = any(cut.expert is not None for cut in cuts)
    for rule in rules:
        parts = sorted({(c.rule, c.half) for c in cuts if c.rule is not None and c.rule.pattern == rule.pattern},
                       key=str) or [(rule, None)]
        halves = {half for _, half in parts}
        if halves != {None} and halves != set(range(2 if rule.index == "gate_up" else 1)):
            raise ValueError(f"The checkpoint stores parts {sorted(halves)} of {rule.pattern!r} per expert; the "
                             "conversion mapping has them in a different number.")
        for used, half in parts:
            seen = {(c.layer, c.expert) for c in cuts if c.rule == used and c.half == half}
            layers = (moe_layers if rule.moe_only else attention_layers if rule.attention_only
                      else arch.dense_layer_indices(config) if rule.dense_only else range(config.num_hidden_layers))
            wanted = {(layer, e if used.per_expert else None) for layer in layers
                      for e in range(arch.num_experts_of(config) if used.per_expert else 1)}
            if (rule.required or seen) and seen != wanted and not (rule.fused and per_expert and not seen):
                layer, expert = sorted(wanted - seen, key=str)[0]
                raise ValueError(f"The checkpoint has no tensor for {rule.pattern!r} of layer {layer}"
                                 f"{'' if expert is None else f', expert {expert}'}; it is incomplete.")
    return "per expert (as the conversion mapping stores them)" if per_expert else "fused"


# ----------------------------------------------------------------------------------------------------- cutting
def kept_indices(config, target, scores) -> dict[str, list]:
    """Per layer, the kept indices of every kind (`None` where the size does not change, or in a layer without it):
    `neurons` `[E, width_new]`, `shared` `[shared_width_new]`, `dense` `[width_new]` (dense MLPs sized by the expert
    width field), `q` `[q_rows]`, `kv` `[kv_rows]`, `q_heads`
    `[kept query heads]` (ascending; exactly those [`prune_model`] keeps)."""
    arch = get_architecture(config)
    full, new = cut_sizes(arch, config), cut_sizes(arch, target)
    per_group = config.num_attention_heads // config.num_key_value_heads
    moe_layers = set(arch.moe_layer_indices(config))
    kept: dict[str, list] = {"neurons": [], "shared": [], "dense": [], "q": [], "q_gated": [], "kv": [],
                             "q_heads": []}
    attention_layers, dense_layers = set(arch.attention_layer_indices(config)), set(arch.dense_layer_indices(config))
    for layer in range(config.num_hidden_layers):
        moe = layer in moe_layers
        kept["neurons"].append(keep_indices(scores.experts[layer], new["neurons"])
                               if moe and new["neurons"] != full["neurons"] else None)
        kept["dense"].append(keep_indices(scores.dense[layer], new["dense"])
                             if layer in dense_layers and new["dense"] != full["dense"] else None)
        kept["shared"].append(keep_indices(scores.shared_experts[layer], new["shared"])
                              if moe and new["shared"] != full["shared"] else None)
        rows = (None, None, None, None)
        if target.num_key_value_heads != config.num_key_value_heads and layer in attention_layers:
            groups = keep_indices(scores.kv_groups[layer], target.num_key_value_heads)
            q_heads, head_dim = head_rows(groups, per_group), arch.head_dim_of(config)
            rows = (*gqa_rows(groups, per_group, head_dim), q_heads, head_rows(q_heads, 2 * head_dim))
        for name, value in zip(("q", "kv", "q_heads", "q_gated"), rows):
            kept[name].append(value)
    return kept


def _index(cut: TensorCut, kept: dict[str, list], expert: int | None, full: int) -> list[int] | None:
    rule = cut.rule
    if rule.index in ("neurons", "gate_up", "gate_up_interleaved"):
        neurons = kept["neurons"][cut.layer]
        if neurons is None:
            return None
        mine = neurons[cut.expert if expert is None else expert]
        if rule.index == "gate_up":
            mine = torch.cat([mine, mine + full // 2])
        elif rule.index == "gate_up_interleaved":
            mine = torch.stack([2 * mine, 2 * mine + 1], dim=1).reshape(-1)
        return mine.tolist()
    rows = kept[rule.index][cut.layer]
    return None if rows is None else rows.tolist()


def piece_plan(cut: TensorCut, kept: dict[str, list], max_piece_bytes: int) -> Iterator[tuple]:
    """How to read the output tensor of `cut` in pieces along dim 0, in storage order: `(rows, dim, index)` reads the
    contiguous block `rows` (a slice of dim 0; `None` for the whole tensor) and keeps `index` along `dim` of it
    (`index` `None`: the whole block). A block holds at most `max_piece_bytes` of input (one expert of a fused
    tensor); blocks with no kept row are skipped."""
    rule = cut.rule
    if not cut.shape:
        yield None, None, None
        return
    full = cut.shape[rule.dim] if rule is not None else None
    if rule is not None and rule.fused:  # one expert at a time, each with its own neurons
        for expert in range(cut.shape[0]):
            index = _index(cut, kept, expert, full)
            yield slice(expert, expert + 1), rule.dim, None if index is None else torch.tensor(index)
        return
    index = _index(cut, kept, None, full) if rule is not None else None
    index = None if index is None else torch.tensor(index)
    step = max(1, max_piece_bytes // max(1, tensor_nbytes(cut.dtype, cut.shape[1:])))
    for start in range(0, cut.shape[0], step):
        if index is None or rule.dim != 0:
            yield slice(start, start + step), None if index is None else rule.dim, index
            continue
        local = index[(index >= start) & (index < start + step)] - start
        if local.numel():
            yield slice(start, start + step), 0, local


def tensor_pieces(path: str, cut: TensorCut, kept: dict[str, list], max_piece_bytes: int) -> Iterator[torch.Tensor]:
    """The output tensor of `cut` as pieces along dim 0, each cut from a block read from the safetensors file `path`.

    The file is opened per piece: safetensors memory-maps it and a block is read lazily, so only the pages of the kept
    rows and columns are touched, and they leave the resident set with the mapping; resident memory never holds more
    than about a block of input plus a piece of output, whatever the shard size.
    """
    from safetensors import safe_open

    for rows, dim, index in piece_plan(cut, kept, max_piece_bytes):
        with safe_open(path, "pt") as handle:
            block = handle.get_tensor(cut.key) if rows is None else handle.get_slice(cut.key)[rows]
            piece = block if index is None else block.index_select(dim, index)
            del block
        yield piece
        del piece  # before the next block is read: one piece in flight


def _write_shard(model_dir: str, staging: str, shard: str, cuts: list[TensorCut], metadata, kept,
                 max_piece_bytes: int, progress) -> int:
    """Write one output shard; returns its data bytes."""
    by_key = {cut.key: cut for cut in cuts}
    writer = SafetensorsStreamWriter(os.path.join(staging, shard),
                                     {c.key: (c.dtype, c.out_shape) for c in cuts}, metadata)
    try:
        for key in writer.order:
            writer.write(key, tensor_pieces(os.path.join(model_dir, shard), by_key[key], kept, max_piece_bytes))
            progress.update(1)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return sum(writer.sizes.values())


# ----------------------------------------------------------------------------------------------------- entry point
def read_source_config(model_dir: str):
    """The configuration loading `model_dir` builds: [`SlimMoeConfig`] for PhiMoE / SlimMoE checkpoints (as
    `SlimMoeForCausalLM.from_pretrained` does), the stock class of any other supported family.

    Raises:
        `FileNotFoundError` / `ValueError`: no config.json, or a `model_type` no adapter supports.
    """
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No config.json in {model_dir}: pass a checkpoint directory.")
    values, _ = PretrainedConfig.get_config_dict(path)  # JSON-encoded infinities decoded as transformers does
    if "model_type" not in values:
        raise ValueError(f"{path} has no model_type: streaming surgery needs to know the MoE family.")
    return config_from_dict(values)


def _pruned_config(config, target, cuts: list[TensorCut]):
    """`config` with the fields `prune_model` sets (the family's pruned fields, `head_dim` kept), as `save_pretrained`
    writes it: the model class in `architectures`, the stored dtype in `dtype`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..model.configuration_slimmoe import SlimMoeConfig

    arch = get_architecture(config)
    pruned = type(config)(**{k: v for k, v in config.to_dict().items()
                             if k not in ("model_type", "transformers_version")})
    for name in arch.pruned_fields():
        setattr(pruned, name, getattr(target, name))
    if arch.attention_prunable:
        pruned.head_dim = arch.head_dim_of(config)
    pruned.architectures = ["SlimMoeForCausalLM" if isinstance(config, SlimMoeConfig)
                            else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    stored = next((c.dtype for c in cuts if c.dtype in _FLOAT_DTYPES), None)
    if stored is not None:
        pruned.dtype = _FLOAT_DTYPES[stored]
    return pruned


def _write_companions(model_dir: str, staging: str, final_dir: str, config, card_info: dict | None) -> None:
    """config.json, generation_config.json, tokenizer files and (with `card_info`) stage.json and README.md."""
    from transformers import AutoTokenizer, GenerationConfig

    config.save_pretrained(staging)
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        GenerationConfig.from_pretrained(model_dir).save_pretrained(staging)
    else:
        GenerationConfig.from_model_config(config).save_pretrained(staging)
    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging)
    except (OSError, ValueError):
        logger.warning("No tokenizer found in %s; wrote the model only.", model_dir)
    if card_info is not None:
        with open(os.path.join(staging, "stage.json"), "w", encoding="utf-8") as f:
            json.dump(card_info, f, indent=2)
        from ..hub import write_model_card

        write_model_card(staging, local_dir=os.path.abspath(final_dir))


def prune_checkpoint(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    target,
    scores,
    card: bool = True,
    max_piece_bytes: int = 64 * 2**20,
    show_progress: bool = True,
) -> str:
    """
    Prune the checkpoint in `model_dir` to the sizes of `target` with `scores`, streaming, into `output_dir`.

    The tensors written are bit-identical to those of loading the model (`architectures.load_model(model_dir)`),
    `prune_to(model, target, scores)` and `save_pretrained`, in the input's own key layout and shard split; the
    config carries the new sizes. Nothing but one piece of one tensor is held in memory. Every family the
    architecture adapters support works: routed experts in any stored layout, shared experts, dense layers left as
    they are, GQA attention with its per-head parameters (gpt-oss `sinks`).

    Args:
        model_dir (`str`): a checkpoint directory of a supported MoE family (`model.safetensors` or a sharded index).
        output_dir (`str`): a new (or empty) directory; written under a temporary name, then renamed.
        target (`PretrainedConfig`): the sizes to prune to, of the same family (from [`slim_config`], or
            `SlimMoeConfig.slimmed`).
        scores ([`SensitivityScores`]): from [`compute_sensitivity`] on this checkpoint's model.
        card (`bool`, *optional*, defaults to `True`): also write `stage.json` (method `"prune"`) and a model card.
        max_piece_bytes (`int`, *optional*, defaults to 64 MiB): the most bytes read and written at a time (an
            expert of a fused layout is one piece whatever its size).
        show_progress (`bool`, *optional*, defaults to `True`): a tqdm bar over the tensors.

    Returns:
        `output_dir`.

    Raises:
        `ValueError` / `FileNotFoundError`: before anything is written, for a bad target or scores (see
            [`validate_prune_target`]), missing files, an unknown expert layout, a tensor whose shape disagrees with
            the config, or a non-empty `output_dir`.
    """
    model_dir, output_dir = os.fspath(model_dir), os.fspath(output_dir)
    config = read_source_config(model_dir)
    if type(target) is not type(config) and (get_architecture(target).stock_model_type
                                             == get_architecture(config).stock_model_type):
        target = config_from_dict({**target.to_dict(), "model_type": config.model_type})  # PhiMoE as SlimMoE
    if type(target) is not type(config):
        raise ValueError(f"prune_checkpoint: the target is a {type(target).__name__}, the checkpoint's config a "
                         f"{type(config).__name__}; build the target from it (slim_config(config, ...)).")
    validate_prune_target(config, target, scores)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ValueError(f"output directory {output_dir} exists and is not empty; choose a new directory.")
    shards, sharded = checkpoint_shards(model_dir)
    cuts, metadata = read_headers(model_dir, shards)
    layout = plan_cuts(cuts, config, target)
    kept = kept_indices(config, target, scores)
    logger.info("Streaming surgery of %s (%d tensors in %d shard(s), %s experts): d_expert %d -> %d, heads %d/%d -> "
                "%d/%d", model_dir, len(cuts), len(shards), layout, get_architecture(config).expert_width_of(config),
                get_architecture(config).expert_width_of(target), config.num_attention_heads, config.num_key_value_heads,
                target.num_attention_heads, target.num_key_value_heads)
    with staged_directory(output_dir) as staging:  # complete, then renamed: never half-written
        total_size = 0
        with tqdm(total=len(cuts), desc="Streaming surgery", unit="tensor", disable=not show_progress) as progress:
            for shard in shards:
                total_size += _write_shard(model_dir, staging, shard, [c for c in cuts if c.shard == shard],
                                           metadata[shard], kept, max_piece_bytes, progress)
        if sharded:
            index = {"metadata": {"total_parameters": sum(_numel(c.out_shape) for c in cuts),
                                  "total_size": total_size},
                     "weight_map": {c.key: c.shard for c in cuts}}
            with open(os.path.join(staging, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        pruned = _pruned_config(config, target, cuts)
        card_info = _card_info(model_dir, config, scores) if card else None
        _write_companions(model_dir, staging, output_dir, pruned, card_info)
    logger.info("Wrote the pruned checkpoint to %s (%.2f GB of weights)", output_dir, total_size / 1e9)
    return output_dir


def _card_info(model_dir: str, config, scores) -> dict:
    """The `stage.json` of a pruned (not yet distilled) checkpoint, from which its model card is written."""
    from ..architectures import count_parameters

    arch = get_architecture(config)
    total, active = count_parameters(config)
    sizes = {name: getattr(config, name) for name in ("num_attention_heads", "num_key_value_heads",
                                                      "num_hidden_layers")}
    sizes.update(intermediate_size=arch.expert_width_of(config), num_local_experts=arch.num_experts_of(config),
                 num_experts_per_tok=arch.top_k_of(config), model_type=config.model_type)
    return {"method": "prune", "parent": model_dir, "teacher": model_dir, "scores": dict(scores.metadata),
            "teacher_config": {**sizes, "num_parameters": total, "num_active_parameters": active}}


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


__all__ = [
    "prune_checkpoint",
    "SliceRule",
    "TensorCut",
    "ModuleKeys",
    "piece_rule",
    "fused_rules",
    "attention_rules",
    "family_rules",
    "cut_sizes",
    "checkpoint_shards",
    "read_headers",
    "plan_cuts",
    "kept_indices",
    "piece_plan",
    "tensor_pieces",
    "read_source_config",
]
