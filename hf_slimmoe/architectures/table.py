"""What SlimMoE prunes and keeps, in words: per model ([`slimming_summary`], `slimmoe info`) and per family (the
README's family table, [`family_table`], read off each family's default configuration).

Regenerate the README's table after a transformers upgrade or an adapter change:

    python -m hf_slimmoe.architectures.table README.md    # rewrites the table between the family-table markers
    python -m hf_slimmoe.architectures.table              # prints it
"""

from __future__ import annotations

import sys
from collections import Counter

from torch import nn

from .adapter import MoeArchitecture
from .registry import SUPPORTED_MODEL_TYPES, get_architecture
from .skeleton import UnsupportedArchitecture, decoder_layers, skeleton

START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"
COLUMNS = ("family (`model_type`)", "expert width / count", "shared experts", "attention pruning",
           "kept as they are (default configuration)", "aux loss", "export (`architectures`)")


def _experts(arch: MoeArchitecture) -> str:
    layout = [note for note, shown in (("transposed", arch.expert_transposed),
                                       ("interleaved gate/up", arch.expert_gate and not arch.expert_concatenated),
                                       ("no gate: up_proj only", not arch.expert_gate), ("biases", arch.expert_bias))
              if shown]
    dense = "; the dense MLPs are sized by the same field and narrow with them" if arch.dense_tied else ""
    return f"`{arch.expert_width}` / `{arch.num_experts}`" + (f" ({', '.join(layout)})" if layout else "") + dense


def _shared(arch: MoeArchitecture) -> str:
    shared = arch.shared_expert
    if shared is None:
        return "none"
    gate = f", sigmoid gate `{shared.gate}`" if shared.gate else ""
    if not shared.tied:
        return f"`{shared.module}`: width `{shared.width}`{gate}"
    width = f"`{arch.expert_width}` x `{shared.count}`" if shared.count else f"= `{arch.expert_width}`"
    return f"`{shared.module}`: width {width}, narrows with the routed experts{gate}"


def _kept(arch: MoeArchitecture, layer: nn.Module, narrowed: list[nn.Module]) -> list[str]:
    """Class names of the layer's parts that SlimMoE keeps as they are: its children (items of a `ModuleList` child)
    with a matrix weight, other than the MoE block (holding the routed experts), the pruned GQA attention and the
    `narrowed` dense MLPs (sized by the expert width field)."""
    attention = arch.attention_of(layer) if arch.attention_prunable else None
    names = []
    for child in layer.children():
        for part in child if isinstance(child, nn.ModuleList) else [child]:
            modules = list(part.modules())
            experts = any(isinstance(getattr(m, "down_proj", None), nn.Parameter) for m in modules)
            pruned = attention in modules or any(m is part for m in narrowed)
            if any(p.dim() > 1 for p in part.parameters()) and not experts and not pruned:
                names.append(type(part).__name__)
    return list(dict.fromkeys(names))


def slimming_summary(arch: MoeArchitecture, config) -> dict[str, str]:
    """
    What SlimMoE prunes and what it keeps in a model of `config` (family `arch`), one short markdown text per part.

    Returns:
        `dict[str, str]`: `experts` (the routed expert width / count fields and their layout), `shared` (the shared
        experts and how their width is set), `attention` ("yes" with what leaves with a GQA group, or "no" and why),
        `kept` (the parts of the decoder layers kept as they are, by class, and in how many layers: dense MLPs,
        linear attention and Mamba mixers, an attention that cannot be pruned), `aux_loss` (the family's
        load-balancing loss, or none: KD alone) and `export` (the stock `model_type` and `architectures` name).
    """
    model = skeleton(config)
    layers, narrowed = decoder_layers(model), list(arch.dense_blocks(model).values())
    attention = set(arch.attention_layer_indices(config))
    if arch.attention_prunable:
        extras = [note for note, shown in (("each head's query gate rows leave with it", arch.gated_queries),
                                           (f"per-head {', '.join(f'`{p}`' for p in arch.query_head_parameters)}",
                                            arch.query_head_parameters)) if shown]
        where = f" in {len(attention)} of {len(layers)} layers" if len(attention) < len(layers) else ""
        attention_text = f"yes: GQA groups (`num_key_value_heads`){where}" + "".join(f"; {e}" for e in extras)
    else:
        attention_text = f"no: {arch.attention_refusal}"
    kept = Counter(name for layer in layers for name in _kept(arch, layer, narrowed))
    aux = arch.aux_loss
    return {
        "experts": _experts(arch),
        "shared": _shared(arch),
        "attention": attention_text,
        "kept": ", ".join(f"`{name}` ({n} of {len(layers)} layers)" for name, n in kept.items()) or "none",
        "aux_loss": f"`{aux.split(':')[0].rpartition('.')[2]}.{aux.split(':')[1]}`" if aux else "none (KD alone)",
        "export": f"`{arch.stock_model_type}` (`{arch.architecture}`)",
    }


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def family_row(model_type: str) -> list[str]:
    """The family table's row of `model_type`, from its default configuration: what is pruned and kept, or why the
    family is refused (the [`UnsupportedArchitecture`] message) or cannot be described."""
    from transformers import CONFIG_MAPPING

    try:
        config = CONFIG_MAPPING[model_type]()
        skeleton(config)
    except Exception as error:
        cause = error.__cause__ or error  # `skeleton` names the family around transformers' own error
        return [f"`{model_type}`", f"**default configuration does not build**: {type(cause).__name__}: {cause}"]
    try:
        arch = get_architecture(config)
    except UnsupportedArchitecture as error:
        return [f"`{model_type}`", f"**refused**: {str(error).removeprefix(f'{model_type}: ')}"]
    except Exception as error:  # a bug of the derivation, shown rather than hidden
        return [f"`{model_type}`", f"**adapter derivation fails**: {type(error).__name__}: {error}"]
    summary = slimming_summary(arch, config)
    return [f"`{model_type}`", *(summary[k] for k in ("experts", "shared", "attention", "kept", "aux_loss", "export"))]


def family_table(model_types=SUPPORTED_MODEL_TYPES) -> str:
    """The README's family table (markdown): a row per family of `model_types`, read off its default configuration."""
    rows = [COLUMNS, ["---"] * len(COLUMNS)]
    for model_type in model_types:
        row = family_row(model_type)
        rows.append(row + [""] * (len(COLUMNS) - len(row)))
    return "\n".join("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows) + "\n"


def replace_table(text: str, table: str) -> str:
    """`text` with what lies between the family-table markers replaced by `table`."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"no {START} ... {END} markers in the text.")
    return f"{head}{START}\n{table}{END}{tail}"


__all__ = ["family_row", "family_table", "replace_table", "slimming_summary"]


if __name__ == "__main__":
    if len(sys.argv) > 1:
        with open(sys.argv[1], encoding="utf-8") as f:
            updated = replace_table(f.read(), family_table())
        with open(sys.argv[1], "w", encoding="utf-8") as f:
            f.write(updated)
    else:
        print(family_table(), end="")
