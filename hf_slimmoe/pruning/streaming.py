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

How a stored tensor is cut is data: a [`SliceRule`] says which keys it matches, which kept-index set it uses and along
which dim; [`family_rules`] reads the rules of a family off its architecture adapter. Layouts understood:

    per-expert w1/w2/w3 (PhiMoE, Mixtral)   layers.L.block_sparse_moe.experts.E.w1/w3.weight [I, H], w2.weight [H, I]
    per-expert gate/up/down (Qwen2/3-MoE,   layers.L.mlp.experts.E.gate_proj/up_proj.weight [I, H], down_proj [H, I]
      OLMoE, DeepSeek-V2/V3)
    fused (transformers' module layout)     layers.L.mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]
    fused transposed (gpt-oss)              layers.L.mlp.experts.gate_up_proj [E, H, 2I] (gate/up interleaved) and
                                            its bias [E, 2I], down_proj [E, I, H]
    shared expert (Qwen2-MoE, DeepSeek)     layers.L.mlp.shared_expert(s).gate_proj/up_proj (rows), down_proj (columns)
    GQA attention                           layers.L.self_attn.q/k/v_proj.weight|bias (rows), o_proj.weight (columns),
                                            per-query-head parameters (gpt-oss sinks)

Every other tensor (dense layers' MLPs, routers, norms, MLA attention, embeddings) is copied unchanged. A checkpoint
whose expert tensors match none of its family's layouts, or miss some layer or expert, is refused before anything is
written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from ..architectures import get_architecture
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
        pattern (`str`): a regular expression matched in full against stored keys; its group `layer` is the decoder
            layer and, in per-expert layouts, its group `expert` the expert.
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
    """

    pattern: str
    index: str
    dim: int
    fused: bool = False
    required: bool = True
    moe_only: bool = False
    attention_only: bool = False

    @property
    def per_expert(self) -> bool:
        """One stored tensor per expert (the pattern has an `expert` group)."""
        return "(?P<expert>" in self.pattern


PER_EXPERT_W123 = (  # PhiMoE, Mixtral (what save_pretrained writes for them)
    SliceRule(_LAYER + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.w1\.weight", "neurons", 0, moe_only=True),
    SliceRule(_LAYER + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.w3\.weight", "neurons", 0, moe_only=True),
    SliceRule(_LAYER + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.w2\.weight", "neurons", 1, moe_only=True),
)
PER_EXPERT_GATE_UP_DOWN = (  # Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3
    SliceRule(_LAYER + r"mlp\.experts\.(?P<expert>\d+)\.gate_proj\.weight", "neurons", 0, moe_only=True),
    SliceRule(_LAYER + r"mlp\.experts\.(?P<expert>\d+)\.up_proj\.weight", "neurons", 0, moe_only=True),
    SliceRule(_LAYER + r"mlp\.experts\.(?P<expert>\d+)\.down_proj\.weight", "neurons", 1, moe_only=True),
)
EXPERT_LAYOUTS = {"per-expert w1/w2/w3": PER_EXPERT_W123, "per-expert gate/up/down": PER_EXPERT_GATE_UP_DOWN}


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


def family_rules(arch) -> tuple[dict[str, tuple[SliceRule, ...]], tuple[SliceRule, ...]]:
    """The slicing rules of a family, read off its adapter ([`MoeArchitecture`]): the candidate layouts of its
    routed experts (the one the checkpoint's keys match is used: the fused module's own, or the per-expert keys a
    conversion mapping writes for GLU experts stored gate half first) and the rules of its shared expert and
    attention."""
    layouts = {"fused": fused_rules(arch)}
    if arch.expert_gate and arch.expert_concatenated and not arch.expert_transposed:
        layouts.update(EXPERT_LAYOUTS)
    rules: list[SliceRule] = []
    if arch.shared_expert is not None:
        shared = _LAYER + re.escape(".".join(part for part in (arch.moe_block, arch.shared_expert.module) if part) + ".")
        rules += [SliceRule(shared + r"gate_proj\.weight", "shared", 0, required=False, moe_only=True),
                  SliceRule(shared + r"up_proj\.weight", "shared", 0, moe_only=True),
                  SliceRule(shared + r"down_proj\.weight", "shared", 1, moe_only=True),
                  SliceRule(shared + r"gate_proj\.bias", "shared", 0, required=False, moe_only=True),
                  SliceRule(shared + r"up_proj\.bias", "shared", 0, required=False, moe_only=True)]
    if arch.attention_prunable:
        rules += list(attention_rules(arch))
    return layouts, tuple(rules)


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
def _match_layout(cuts: list[TensorCut], layouts: dict[str, tuple[SliceRule, ...]]) -> tuple[str, tuple]:
    found = {name: rules for name, rules in layouts.items()
             if any(re.fullmatch(rule.pattern, cut.key) for rule in rules for cut in cuts)}
    if len(found) != 1:
        sample = ", ".join(cut.key for cut in cuts if ".layers." in cut.key or cut.key.startswith("layers."))[:300]
        raise ValueError(
            f"The checkpoint's expert tensors match {'none' if not found else ' and '.join(found)} of the layouts "
            f"known for this family ({', '.join(layouts)}); streaming surgery cannot tell how to cut them. Keys: "
            f"{sample}"
        )
    (name, rules), = found.items()
    return name, rules


def cut_sizes(arch, config) -> dict[str, int]:
    """The full size of every index kind in a model of `config` (the dim a rule's indices select)."""
    width, heads = arch.expert_width_of(config), config.num_attention_heads
    head_dim = arch.head_dim_of(config)
    return {"neurons": width, "gate_up": 2 * width, "gate_up_interleaved": 2 * width,
            "shared": arch.shared_width_of(config) or 0, "q": heads * head_dim, "q_gated": 2 * heads * head_dim,
            "kv": config.num_key_value_heads * head_dim, "q_heads": heads}


def _assign(cut: TensorCut, rules: tuple[SliceRule, ...], arch, config, sizes: tuple[dict, dict]) -> None:
    """Attach the rule matching `cut` (if any), check its stored shape and set `out_shape`."""
    cut.out_shape = list(cut.shape)
    full_sizes, new_sizes = sizes
    for rule in rules:
        match = re.fullmatch(rule.pattern, cut.key)
        if match is None:
            continue
        cut.rule, cut.layer = rule, int(match.group("layer"))
        cut.expert = int(match.group("expert")) if rule.per_expert else None
        experts = arch.num_experts_of(config)
        if (cut.layer >= config.num_hidden_layers or (cut.expert is not None and cut.expert >= experts)
                or (rule.moe_only and cut.layer not in arch.moe_layer_indices(config))
                or (rule.attention_only and cut.layer not in arch.attention_layer_indices(config))):
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
    """Attach to every stored tensor its slicing rule (read off the family's adapter, see [`family_rules`]) and
    output shape; returns the expert layout's name.

    Raises:
        `ValueError`: the expert tensors match no layout known for the family (or several), a tensor's shape
            disagrees with the config, or a layer or expert lacks a required tensor.
    """
    arch = get_architecture(config)
    layouts, other_rules = family_rules(arch)
    layout, expert_rules = _match_layout(cuts, layouts)
    rules = expert_rules + other_rules
    sizes = (cut_sizes(arch, config), cut_sizes(arch, target))
    for cut in cuts:
        _assign(cut, rules, arch, config, sizes)
    moe_layers, attention_layers = arch.moe_layer_indices(config), arch.attention_layer_indices(config)
    for rule in rules:
        seen = {(c.layer, c.expert) for c in cuts if c.rule is rule}
        layers = moe_layers if rule.moe_only else attention_layers if rule.attention_only else range(
            config.num_hidden_layers)
        wanted = {(layer, e if rule.per_expert else None)
                  for layer in layers
                  for e in range(arch.num_experts_of(config) if rule.per_expert else 1)}
        if (rule.required or seen) and seen != wanted:
            layer, expert = sorted(wanted - seen, key=str)[0]
            raise ValueError(f"The checkpoint has no tensor matching {rule.pattern!r} for layer {layer}"
                             f"{'' if expert is None else f', expert {expert}'} ({layout} layout); it is incomplete.")
    return layout


# ----------------------------------------------------------------------------------------------------- cutting
def kept_indices(config, target, scores) -> dict[str, list]:
    """Per layer, the kept indices of every kind (`None` where the size does not change, or in a dense layer):
    `neurons` `[E, width_new]`, `shared` `[shared_width_new]`, `q` `[q_rows]`, `kv` `[kv_rows]`, `q_heads`
    `[kept query heads]` (ascending; exactly those [`prune_model`] keeps)."""
    arch = get_architecture(config)
    full, new = cut_sizes(arch, config), cut_sizes(arch, target)
    per_group = config.num_attention_heads // config.num_key_value_heads
    moe_layers = set(arch.moe_layer_indices(config))
    kept: dict[str, list] = {"neurons": [], "shared": [], "q": [], "q_gated": [], "kv": [], "q_heads": []}
    attention_layers = set(arch.attention_layer_indices(config))
    for layer in range(config.num_hidden_layers):
        moe = layer in moe_layers
        kept["neurons"].append(keep_indices(scores.experts[layer], new["neurons"])
                               if moe and new["neurons"] != full["neurons"] else None)
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
    from ..architectures import config_from_dict

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

    from ..configuration_slimmoe import SlimMoeConfig

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
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".prune-", dir=parent)  # complete, then renamed: never half-written
    try:
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
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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


__all__ = ["prune_checkpoint", "SliceRule", "TensorCut", "EXPERT_LAYOUTS", "fused_rules", "attention_rules",
           "family_rules", "cut_sizes", "checkpoint_shards", "read_headers", "plan_cuts", "kept_indices", "piece_plan",
           "tensor_pieces", "read_source_config"]
