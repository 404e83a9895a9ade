"""The knowledge-distillation settings, declared once: [`KDSettings`] is mixed into [`DistillationConfig`]
(`slimmoe distill`), `SFTDistillationConfig` (`slimmoe sft`) and the recipe's `distillation:` section
(`slimmoe compress`), so every KD field has one name, one default and one validator everywhere.

It is plain Python (its one import, [`CHUNK_BYTES`], comes from `hf_slimmoe.utils`, whose `__init__` imports nothing),
so the recipe schema that mixes it in loads neither torch nor TRL."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils import CHUNK_BYTES

KD_LOSSES = ("sampled", "topk_tail", "topk", "full")


@dataclass
class KDSettings:
    r"""
    The KD fields every distillation run has.

    Parameters:
        kd_loss (`str`, *optional*, defaults to `"sampled"`):
            The distillation objective, each computed chunked (never `(tokens, vocab)` logits):
            `"sampled"`: cross-entropy on `kd_samples` tokens drawn from the teacher per position, an unbiased
            estimate of the full-vocabulary KL gradient ([`sampled_kd_loss`]); online or from
            [`cache_teacher_samples`]. `"topk_tail"`: KL over the teacher's top-k plus one "rest of the vocabulary"
            outcome ([`topk_tail_kl_loss`]); online or from [`cache_teacher_topk`]. `"topk"`: the paper's Eq. 3
            ([`topk_kl_loss`]), whose minimizer drops the teacher's tail; online or from a top-k cache. `"full"`: the
            full-vocabulary KL ([`full_kl_loss`]); online teacher only. The default is the best unbiased objective
            that also works from a cache in the measurements of `benchmarks/RESULTS.md` ("Choosing the distillation
            loss").
        kd_samples (`int`, *optional*, defaults to `8`):
            Teacher samples per position of `kd_loss="sampled"` (S). A samples cache must hold exactly S. A cache
            holds one set of draws: trained on for several epochs, the student fits those draws rather than the
            teacher (see the README, "Choosing the distillation loss"); the online teacher draws afresh every epoch.
        kd_samples_seed (`int`, *optional*, defaults to `0`):
            Seed of the online teacher samples: epoch `e` draws with seed `kd_samples_seed + e`, per row, so a row
            gets the same draws in any batch, on any rank and after a resume; epoch 0 draws what
            [`cache_teacher_samples`] stores with `seed=kd_samples_seed`.
        top_k (`int`, *optional*, defaults to `8`):
            Number of teacher tokens per position kept by `kd_loss="topk"` / `"topk_tail"` and by the evaluation's
            `eval_kl` (the paper's top-8). With a cached teacher it must not exceed the cache's k; the first `top_k`
            cached entries are used.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of teacher and student in the KD loss (no `T**2` factor). A cache records the
            temperature it was made at and is refused at another one.
        renormalize (`bool`, *optional*, defaults to `False`):
            `kd_loss="topk"` only: renormalize the teacher's top-k probabilities to sum to 1. The default keeps them
            relative to the full vocabulary (the other probabilities set to 0), as in the paper.
        kd_chunk_size (`int`, *optional*):
            Tokens projected to the vocabulary at a time by the chunked KD loss, the online teacher's targets and the
            evaluation metrics. `None` (the default) sizes chunks from `kd_chunk_bytes` instead, so their memory stays
            the same at any vocabulary; an `int` overrides it.
        kd_chunk_bytes (`int`, *optional*, defaults to `134217728`, 128 MiB):
            Byte budget of one chunk's float32 `(chunk, vocab)` working blocks when `kd_chunk_size` is `None`: a
            chunk holds `kd_chunk_bytes / (blocks * 4 * vocab)` tokens, `blocks` being what that computation holds
            at its peak (2 for `sampled` / `topk` / `topk_tail`, 4 for `full`). Raise it on an accelerator with
            memory to spare: fewer, larger chunks read the `lm_head` weight fewer times.
    """

    kd_loss: str = field(default="sampled", metadata={"help": "Distillation objective.", "choices": list(KD_LOSSES)})
    kd_samples: int = field(default=8, metadata={"help": "Teacher samples per position of kd_loss='sampled'."})
    kd_samples_seed: int = field(default=0, metadata={"help": "Seed of the online teacher samples (per row)."})
    top_k: int = field(default=8, metadata={"help": "Teacher tokens kept per position by the top-k losses."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KD loss."})
    renormalize: bool = field(
        default=False, metadata={"help": "kd_loss='topk': renormalize the teacher top-k probabilities to sum to 1."}
    )
    kd_chunk_size: int | None = field(
        default=None, metadata={"help": "Tokens projected to the vocabulary at a time (default: from kd_chunk_bytes)."}
    )
    kd_chunk_bytes: int = field(
        default=CHUNK_BYTES, metadata={"help": "Byte budget of a chunk's (chunk, vocab) float32 blocks."}
    )

    def check_kd_settings(self) -> None:
        """Raise a `ValueError` naming the field for a KD setting out of range."""
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss={self.kd_loss!r} is not one of {list(KD_LOSSES)}.")
        for name in ("kd_samples", "top_k", "kd_chunk_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.kd_chunk_size is not None and self.kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size={self.kd_chunk_size} must be at least 1 (or None: from kd_chunk_bytes).")
        if self.renormalize and self.kd_loss != "topk":
            raise ValueError(f"renormalize=True applies to kd_loss='topk' only, not kd_loss={self.kd_loss!r}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be positive.")


@dataclass
class DistillationSettings(KDSettings):
    r"""
    [`KDSettings`] plus the terms a distillation (not SFT) run adds to the KD loss: the fields of
    [`DistillationConfig`] and of a recipe's `distillation:` section.

    Parameters:
        aux_loss_coef (`float`, *optional*, defaults to `0.01`):
            Weight of the MoE load-balancing loss computed on the student's router logits (Phi-3.5-MoE's
            `router_aux_loss_coef`; the recipes state each family's). `0` disables it and skips returning router
            logits; a family without a load-balancing loss trains on KD alone.
        ce_weight (`float`, *optional*, defaults to `0.0`):
            Weight of an optional next-token cross-entropy on the data's own tokens, added to the KD loss.
    """

    aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight of the student's MoE load-balancing loss (0 disables it)."}
    )
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of an optional next-token cross-entropy loss."})

    def check_kd_settings(self) -> None:
        super().check_kd_settings()
        if self.aux_loss_coef < 0 or self.ce_weight < 0:
            raise ValueError(
                f"aux_loss_coef={self.aux_loss_coef} and ce_weight={self.ce_weight} must be non-negative."
            )


__all__ = ["KD_LOSSES", "KDSettings", "DistillationSettings"]
