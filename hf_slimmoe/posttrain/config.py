"""Configuration of `slimmoe sft | lora | dpo`: [`SFTDistillationConfig`] (the SFT trainer's), TRL's `ModelConfig`
(model and LoRA fields) and [`PostTrainScriptArguments`] (TRL's `ScriptArguments` plus the data and saving fields of
these commands)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, ScriptArguments, SFTConfig
from trl.trainer.utils import get_peft_config

from ..distillation.settings import KDSettings

BUILTIN_DOCSTRINGS = "builtin:stdlib-docstrings"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclass
class SFTDistillationConfig(KDSettings, SFTConfig):
    r"""
    Configuration for [`SFTDistillationTrainer`]: every field of `trl.SFTConfig` plus the distillation fields.

    Parameters that control the teacher:
        teacher_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Instruct teacher (Hub id or directory) loaded when the trainer gets no `teacher_model`. It must share the
            student's vocabulary. `None` with no teacher cache columns in the data means plain SFT (`ce_mix=1`).
        teacher_model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments of `AutoModelForCausalLM.from_pretrained` for a teacher given as a path or Hub id (a JSON
            string on the command line), as TRL's `GKDConfig` has them. Default: `model_init_kwargs`.
        teacher_cache_dir (`str` or `None`, *optional*, defaults to `None`):
            Directory of a cached teacher pass (the cache `kd_loss` reads: samples or top-k) over the *formatted*
            (tokenized, masked, packed) training data. If it holds a cache made for the same data, teacher, k / S and
            `temperature`, it is read and no teacher runs;
            otherwise the teacher makes it once before training (then it is released).

    Parameters that control the loss:
        The KD fields of [`KDSettings`] (`kd_loss`, `kd_samples`, `kd_samples_seed`, `top_k`, `temperature`,
        `renormalize`, `kd_chunk_size`, `kd_chunk_bytes`), declared once for `slimmoe sft`, `slimmoe distill` and
        the recipes (`teacher_cache_dir` holds the cache `kd_loss` reads); and:
        ce_mix (`float`, *optional*, defaults to `0.0`):
            Mixing weight: `loss = ce_mix * CE + (1 - ce_mix) * KD + router_aux_loss_coef * aux`. CE and KD
            are both per-token means over the same tokens (the completion / assistant tokens TRL keeps in
            `labels`). `0.0` is pure KD (the paper's, with `kd_loss="topk"`); `1.0` is plain `SFTTrainer`.

    Defaults that differ from `SFTConfig`: `learning_rate=2e-6` and `weight_decay=1e-4` (paper, Appendix A.5).
    """

    learning_rate: float = field(default=2e-6, metadata={"help": "AdamW learning rate (paper: 2e-6 for SFT)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (paper: 1e-4 for SFT)."})
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Instruct teacher (Hub id or directory) sharing the student's vocabulary."}
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "from_pretrained keyword arguments of a teacher given as a path (JSON)."}
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the cached teacher pass (samples or top-k) over the formatted data."},
    )
    ce_mix: float = field(
        default=0.0, metadata={"help": "loss = ce_mix * CE + (1 - ce_mix) * KD + aux; 1.0 is plain SFT."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ce_mix <= 1.0:
            raise ValueError(f"ce_mix={self.ce_mix} must be between 0 and 1.")
        self.check_kd_settings()
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
        if self.kd_loss == "full" and self.teacher_cache_dir is not None:
            raise ValueError("kd_loss='full' needs the teacher online: drop teacher_cache_dir or use "
                             "kd_loss='sampled'.")


@dataclass
class PostTrainScriptArguments(ScriptArguments):
    r"""
    `trl.ScriptArguments` for `slimmoe sft | lora | dpo`, with the fields these commands add. The model and LoRA fields
    are those of `trl.ModelConfig` (`model_name_or_path`, `dtype`, `use_peft`, `lora_r`, `lora_alpha`,
    `lora_dropout`, `lora_target_modules`, `lora_target_parameters`, ...).

    Defaults that differ from `ScriptArguments`: `dataset_name="builtin:stdlib-docstrings"` (instruction / preference
    pairs built from the local Python standard library) and `dataset_test_split=None` (no evaluation unless a split is
    named).

    Parameters:
        dataset_name (`str`, *optional*, defaults to `"builtin:stdlib-docstrings"`):
            Hub dataset id, a local `.json`/`.jsonl`/`.parquet`/`.csv` file, a `save_to_disk` directory, or
            `builtin:stdlib-docstrings`.
        dataset_test_split (`str` or `None`, *optional*, defaults to `None`):
            Evaluation split, if any.
        max_train_samples (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first examples of the training split.
        ref_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            DPO reference model; `None` lets TRL use a frozen copy of the model (or the adapter-free base with LoRA).
        tiny_init (`bool`, *optional*, defaults to `False`):
            CPU demo only: when `model_name_or_path` (and the teacher) do not exist, build tiny random SlimMoE models
            there with a BPE tokenizer trained on this machine's Python standard library.
        merge_lora (`bool`, *optional*, defaults to `True`):
            With `use_peft`: save the merged model in `output_dir` (a complete checkpoint) and the adapter in
            `output_dir/adapter`.
    """

    dataset_name: str = field(
        default=BUILTIN_DOCSTRINGS, metadata={"help": f"Hub id, local file/dir, or {BUILTIN_DOCSTRINGS}."}
    )
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split (default: none)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "DPO reference model."})
    tiny_init: bool = field(default=False, metadata={"help": "Build tiny random models when paths are missing."})
    merge_lora: bool = field(default=True, metadata={"help": "Save the merged model; adapter in output_dir/adapter."})


def lora_config(model_args: ModelConfig):
    """TRL's `get_peft_config(model_args)` (a `peft.LoraConfig`, or `None` without `use_peft`); LoRA targets the
    attention projections unless `lora_target_modules` is set. The fused expert parameters take adapters through
    `lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]` (see `EXPERT_PARAMETERS`)."""
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args = dataclasses.replace(model_args, lora_target_modules=list(ATTENTION_PROJECTIONS))
    return get_peft_config(model_args)


__all__ = [
    "ATTENTION_PROJECTIONS",
    "BUILTIN_DOCSTRINGS",
    "EXPERT_PARAMETERS",
    "PostTrainScriptArguments",
    "SFTDistillationConfig",
    "lora_config",
]
