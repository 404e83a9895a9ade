"""The families of the installed transformers whose causal LM keeps routed experts in the fused layout, and the few
facts about them that cannot be read off a model (`FAMILY_OVERRIDES`).

The list is transformers' own: every `model_type` of `AutoModelForCausalLM` whose configuration is a text-only one
(no `sub_configs`; multimodal wrappers are covered by their `*_text` family) and whose modeling file defines fused
experts (`@use_experts_implementation`, or a 3D `gate_up_proj` / `down_proj` parameter). It is found by reading the
installed sources, without importing them, so a new transformers release brings its new families by itself. Whether a
given configuration can be slimmed is then decided by [`derive_architecture`] on a meta-device model of it.
"""

from __future__ import annotations

import functools
import os
import re

# Only what a model cannot show: vLLM's architecture name where it differs from transformers' class name, the stock
# `model_type` hf_slimmoe's own SlimMoE checkpoints export as.
_PHIMOE = {"architecture": "PhiMoEForCausalLM"}  # transformers' class is PhimoeForCausalLM (loads by model_type)
FAMILY_OVERRIDES: dict[str, dict] = {
    "phimoe": _PHIMOE,
    "slimmoe": {**_PHIMOE, "export_model_type": "phimoe"},
}

_FUSED_EXPERTS = re.compile(r"@use_experts_implementation|self\.(gate_up_proj|down_proj) = nn\.Parameter\(\s*torch\."
                            r"(empty|zeros|ones)\(\s*self\.num_experts")


def _source(models_dir: str, family: str, kind: str) -> str:
    path = os.path.join(models_dir, family, f"{kind}_{family}.py")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=1)
def fused_moe_families() -> tuple[str, ...]:
    """`model_type`s of the installed transformers' causal LMs with fused routed experts and a text-only
    configuration, plus hf_slimmoe's own `slimmoe` (sorted)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    models_dir = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = {"slimmoe"}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config_class = CONFIG_MAPPING_NAMES.get(model_type)
        if config_class is None:
            continue
        family = _family_dir(models_dir, model_type)
        configuration = _source(models_dir, family, "configuration")
        if _config_has_sub_configs(configuration, config_class):
            continue
        if _FUSED_EXPERTS.search(_source(models_dir, family, "modeling")):
            found.add(model_type)
    return tuple(sorted(found))


def _family_dir(models_dir: str, model_type: str) -> str:
    """The folder of `transformers/models/` holding `model_type` (`qwen3_5_moe_text` lives in `qwen3_5_moe`)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    family = model_type_to_module_name(model_type)
    if not os.path.isdir(os.path.join(models_dir, family)) and family.endswith("_text"):
        family = family[: -len("_text")]
    return family


def _config_has_sub_configs(source: str, config_class: str) -> bool:
    """Whether the class `config_class` in a configuration file declares `sub_configs` (a multimodal wrapper)."""
    match = re.search(rf"class {re.escape(config_class)}\(.*?(?=\nclass |\Z)", source, re.S)
    return bool(match and re.search(r"\n    sub_configs\w*\s*(:[^=\n]*)?=", match.group(0)))


__all__ = ["FAMILY_OVERRIDES", "fused_moe_families"]
