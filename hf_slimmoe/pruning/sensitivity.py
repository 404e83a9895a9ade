"""Sensitivity scores for expert slimming and GQA-group pruning (SlimMoE Eq. 2-4).

For a weight `W_ij`, `s_ij = |dL/dW_ij * W_ij|` (first-order Taylor estimate of the loss change when `W_ij` is set to
0), with `L` the loss over the whole calibration set:

- `criterion="kd"` (the paper's choice, Eq. 3): `L = mean_n KL(p_teacher_top-k^n || p_student^n) + c * Aux`, the
  top-k KD loss against the teacher plus the MoE load-balancing loss;
- `criterion="clm"` (the ablation of Table 3): next-token cross-entropy `+ c * Aux`.

Only the down projections are scored, so only they keep gradients, located through the family's
[`~hf_slimmoe.architectures.MoeArchitecture`]: the routed experts' `down_proj` (`[E, H, I]`, neuron `i` of expert `e`
is column `i` of `down_proj[e]`; gpt-oss stores it transposed, `[E, I, H]`), a shared expert's `down_proj.weight`
(`[H, I_s]`) and the attention output projection (`o_proj.weight`, `[H, num_heads * head_dim]`; its columns are the
attention neurons). A neuron's score is the l2 norm of its entries' scores (Eq. 4); a GQA group's score is the mean
of the neuron scores of all its query heads' `o_proj` columns. Dense layers (Qwen `mlp_only_layers`, DeepSeek
`first_k_dense_replace`) get empty expert scores.

Stage 1 subtlety: when the student *is* the teacher, the full-vocabulary KL is at its minimum and has zero gradient,
so it carries no information. The *top-k truncated* teacher distribution keeps only the top-k probabilities (their
sum is below 1) and the gradient `q * sum_k p_k - p_topk` of the student logits is not zero: the scores measure how
much each neuron contributes to the model's confident predictions. This is why `teacher=None` works.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..architectures import get_architecture
from ..distillation.losses import chunked_cross_entropy, topk_kl_loss
from ..utils.distributed import (
    all_reduce_sum,
    call_through_forward,
    full_tensor,
    is_sharded,
    rank_and_world,
    rank_share,
)
from ..utils.modeling import backbone, check_same_vocabulary, teacher_topk_from_hidden, teacher_topk_from_model

logger = logging.getLogger(__name__)

CRITERIA = ("kd", "clm")


@dataclass
class SensitivityScores:
    """
    Neuron-level sensitivity scores of a MoE model (any supported family), one float32 tensor per decoder layer.

    Attributes:
        experts (`list[torch.Tensor]`):
            `experts[layer]` has shape `[num_experts, expert_width]`: the l2 norm of the scores of neuron `i`'s
            entries in expert `e`'s down projection. Empty (`[0, 0]`) for a dense layer.
        kv_groups (`list[torch.Tensor]`):
            `kv_groups[layer]` has shape `[num_key_value_heads]`: the mean neuron score of the `o_proj` input columns
            of all query heads in the GQA group.
        metadata (`dict[str, str]`):
            How the scores were computed (criterion, top_k, number of tokens and batches); saved with them.
        shared_experts (`list[torch.Tensor]`):
            For families with a shared expert (Qwen2-MoE, DeepSeek), `shared_experts[layer]` has shape
            `[shared_width]` (empty for a dense layer); an empty list otherwise.
        dense (`list[torch.Tensor]`):
            For families whose dense MLPs are sized by the expert width field (Jamba), `dense[layer]` has shape
            `[expert_width]` on a dense layer (empty on a MoE layer); an empty list otherwise.
    """

    experts: list[torch.Tensor]
    kv_groups: list[torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    shared_experts: list[torch.Tensor] = field(default_factory=list)
    dense: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        if len(self.experts) != len(self.kv_groups):
            raise ValueError(
                f"SensitivityScores: experts has {len(self.experts)} layers but kv_groups has {len(self.kv_groups)}; "
                "both need one tensor per decoder layer."
            )
        for name in ("shared_experts", "dense"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.experts):
                raise ValueError(
                    f"SensitivityScores: {name} has {len(getattr(self, name))} layers but experts has "
                    f"{len(self.experts)}; it needs one tensor per decoder layer (or none at all)."
                )

    @property
    def num_layers(self) -> int:
        return len(self.experts)

    def save(self, path: str | os.PathLike) -> None:
        """Save to a safetensors file (keys `experts.{layer}`, `kv_groups.{layer}` and, where scored,
        `shared_experts.{layer}` and `dense.{layer}`; metadata in the header)."""
        tensors = {}
        for name in ("experts", "kv_groups", "shared_experts", "dense"):
            for layer, tensor in enumerate(getattr(self, name)):
                tensors[f"{name}.{layer}"] = tensor.detach().float().cpu().contiguous()
        metadata = {str(k): str(v) for k, v in self.metadata.items()}
        metadata["format"] = "hf_slimmoe.SensitivityScores"
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SensitivityScores":
        """Load scores written by [`SensitivityScores.save`]."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No sensitivity scores file at {path}; write one with `slimmoe score`.")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
        num_layers = sum(1 for key in tensors if key.startswith("experts."))
        missing = [key for layer in range(num_layers) for key in (f"experts.{layer}", f"kv_groups.{layer}")
                   if key not in tensors]
        if metadata.pop("format", None) != "hf_slimmoe.SensitivityScores" or missing or num_layers == 0:
            raise ValueError(
                f"{path} is not a SensitivityScores file (expected keys experts.<layer> and kv_groups.<layer>"
                f"{', missing ' + ', '.join(missing[:4]) if missing else ''})."
            )
        return cls(
            experts=[tensors[f"experts.{layer}"] for layer in range(num_layers)],
            kv_groups=[tensors[f"kv_groups.{layer}"] for layer in range(num_layers)],
            metadata=metadata,
            shared_experts=[tensors[f"shared_experts.{layer}"] for layer in range(num_layers)
                            if f"shared_experts.{layer}" in tensors],
            dense=[tensors[f"dense.{layer}"] for layer in range(num_layers) if f"dense.{layer}" in tensors],
        )


def scored_parameters(model: nn.Module) -> dict[str, dict[int, nn.Parameter]]:
    """The weights whose sensitivity is scored, by kind and decoder layer: routed experts' `down_proj` and shared
    experts' `down_proj.weight` (MoE layers only), the dense MLPs' `down_proj.weight` where they narrow with the
    experts (dense layers only), and the GQA attention's `o_proj.weight` (layers that have one: not the
    linear-attention or Mamba layers of a hybrid)."""
    arch = get_architecture(model)
    blocks = arch.moe_blocks(model)
    scored = {
        "experts": {i: arch.experts_of(block).down_proj for i, block in blocks.items()},
        "kv_groups": {i: arch.attention_of(layer).o_proj.weight for i, layer in enumerate(arch.decoder_layers(model))
                      if arch.attention_of(layer) is not None},
    }
    if arch.shared_expert is not None:
        scored["shared_experts"] = {i: arch.shared_of(block).down_proj.weight for i, block in blocks.items()}
    if arch.dense_tied:
        scored["dense"] = {i: mlp.down_proj.weight for i, mlp in arch.dense_blocks(model).items()}
    return scored


def _as_batch(batch: Mapping, device: torch.device) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            "compute_sensitivity: each calibration batch must be a mapping with `input_ids` of shape [batch, seq] "
            f"(optionally attention_mask, labels, teacher_topk_ids, teacher_topk_logprobs); got {type(batch).__name__}"
            f"{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}."
        )
    out = {}
    for key in ("input_ids", "attention_mask", "labels", "teacher_topk_ids", "teacher_topk_logprobs"):
        if batch.get(key) is not None:
            value = torch.as_tensor(batch[key])
            if key in ("input_ids", "labels") and value.dim() == 1 or key.startswith("teacher") and value.dim() == 2:
                value = value.unsqueeze(0)  # a single example
            out[key] = value.to(device)
    return out


def _cached_topk(batch: dict[str, torch.Tensor], top_k: int):
    ids, logprobs = batch["teacher_topk_ids"].long(), batch["teacher_topk_logprobs"].float()
    if ids.shape != logprobs.shape or ids.shape[:2] != batch["input_ids"].shape:
        raise ValueError(
            f"compute_sensitivity: cached teacher_topk_ids {list(ids.shape)} / teacher_topk_logprobs "
            f"{list(logprobs.shape)} do not match input_ids {list(batch['input_ids'].shape)}: the teacher cache was "
            "built for a different dataset or padding; rebuild it with `cache_teacher_topk`."
        )
    cached_k = ids.size(-1)
    if cached_k < top_k:
        raise ValueError(
            f"compute_sensitivity: the teacher cache holds top-{cached_k} entries, fewer than top_k={top_k}; pass "
            f"top_k={cached_k} or rebuild the cache with top_k={top_k}."
        )
    if cached_k > top_k:  # keep the top_k most probable of the cached entries
        logprobs, order = logprobs.topk(top_k, dim=-1)
        ids = ids.gather(-1, order)
    return ids, logprobs


def compute_sensitivity(
    model: nn.Module,
    batches: Iterable[Mapping],
    teacher: nn.Module | None = None,
    criterion: str = "kd",
    top_k: int = 8,
    aux_loss_coef: float | None = None,
    chunk_size: int = 1024,
    show_progress: bool = True,
) -> SensitivityScores:
    """
    Score every expert neuron and every GQA group of `model` by `|dL/dW * W|` over a calibration set.

    The gradient of the loss over the *whole* set is accumulated (in float32) before `|grad * W|` is taken, as in
    Eq. 2 with `L` the mean loss over all counted tokens. The model runs in `eval()` mode (deterministic routing, no
    dropout): two runs give the same scores. Memory-lean: only the scored weights (`mlp.experts.down_proj`,
    `self_attn.o_proj.weight`) require gradients while scoring, the student's logits are never materialized for all
    tokens (the loss is chunked over the vocabulary) and the model's `requires_grad` flags, `.grad` and train/eval
    mode are restored afterwards.

    Under FSDP2 (`model` sharded with `fully_shard`, e.g. by [`~hf_slimmoe.utils.distributed.shard_decoder_layers`])
    every rank passes the same batches and scores its share of them (`batches[rank::world_size]`, padded so every rank
    steps in lockstep); each loss runs inside the root's forward, the gradient shards are summed over ranks and
    gathered one weight at a time, and every rank returns the same scores as one process would on all batches (to
    float rounding). An FSDP2-sharded `teacher` is run through its own forward.

    Args:
        model (`PreTrainedModel`):
            The model to score (the student): any supported MoE family (`SlimMoeForCausalLM`, `MixtralForCausalLM`,
            `Qwen3MoeForCausalLM`, ...; see `hf_slimmoe.SUPPORTED_MODEL_TYPES`).
        batches (`Iterable[Mapping]`):
            Calibration batches: mappings with `input_ids` `[B, T]`, optionally `attention_mask` `[B, T]`,
            `labels` `[B, T]` (for `"clm"`; default: `input_ids`, padding ignored; shifted here) and cached teacher
            columns `teacher_topk_ids` / `teacher_topk_logprobs` `[B, T, k]` (from `cache_teacher_topk`); a batch
            with the cached columns needs no teacher forward.
        teacher (`nn.Module`, *optional*):
            For `"kd"`: `None` or `model` itself (stage 1: the teacher distribution is the model's own, taken from
            the same forward and detached), or a separate causal LM with the same vocabulary, run online in eval
            mode under `no_grad`. Ignored for `"clm"` and for batches that carry cached teacher columns.
        criterion (`str`, *optional*, defaults to `"kd"`):
            `"kd"` (top-k KL to the teacher + aux, Eq. 3) or `"clm"` (next-token cross-entropy + aux).
        top_k (`int`, *optional*, defaults to `8`):
            Number of teacher probabilities kept; the rest are 0 (not renormalized).
        aux_loss_coef (`float`, *optional*):
            Weight of the family's load-balancing loss; defaults to the model's `config.router_aux_loss_coef`, the
            weight it is trained with. `0` scores with the KD/CLM term alone, as do families trained without one
            (DeepSeek).
        chunk_size (`int`, *optional*, defaults to `1024`):
            Tokens projected to the vocabulary at a time.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm bar over the calibration batches.

    Returns:
        [`SensitivityScores`] on the CPU, float32.

    Raises:
        `ValueError`: for an unknown criterion, a bad `top_k`, a teacher with another vocabulary, a malformed batch,
            a teacher cache that does not match its batch, or an empty calibration set.
    """
    aux_loss, coef = _check_arguments(model, teacher, criterion, top_k, aux_loss_coef)
    teacher = None if teacher is model else teacher  # None: stage 1, the model's own distribution
    scored = scored_parameters(model)
    params = [p for per_layer in scored.values() for p in per_layer.values()]
    sharded, world_size = is_sharded(model), rank_and_world()[1]
    with _scoring_mode(model, teacher, params):
        buffers, total_tokens, num_batches = _summed_gradients(
            model, params, batches, teacher, sharded, show_progress,
            criterion=criterion, top_k=top_k, chunk_size=chunk_size, aux_loss=aux_loss, coef=coef)
    if num_batches == 0 or total_tokens == 0:
        raise ValueError("compute_sensitivity: the calibration set is empty (no batches or no counted tokens).")
    scores = _neuron_scores(model, scored, buffers, total_tokens, world_size if sharded else None)
    logger.info("Scored %d layers on %d tokens in %d batches (criterion=%s, top_k=%d, aux coef=%g)",
                model.config.num_hidden_layers, total_tokens, num_batches, criterion, top_k, coef)
    return SensitivityScores(
        **scores,
        metadata={"criterion": criterion, "top_k": str(top_k), "aux_loss_coef": str(coef),
                  "num_tokens": str(total_tokens), "num_batches": str(num_batches)},
    )


@contextlib.contextmanager
def _scoring_mode(model: nn.Module, teacher: nn.Module | None, params: list[nn.Parameter]):
    """`eval()` mode with only `params` requiring gradients (their `.grad` cleared); the `requires_grad` flags, the
    `.grad` of `params` and both models' train/eval modes are restored afterwards."""
    scored_ids = {id(p) for p in params}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_grads = [(p, p.grad) for p in params]
    was_training, teacher_was_training = model.training, None if teacher is None else teacher.training
    try:
        model.eval()
        if teacher is not None:
            teacher.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in scored_ids)
        for p in params:
            p.grad = None
        yield
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        for p, grad in saved_grads:
            p.grad = grad
        model.train(was_training)
        if teacher_was_training is not None:
            teacher.train(teacher_was_training)


def _accumulate_into(buffer: torch.Tensor):
    def hook(param):
        buffer.add_(param.grad)
        param.grad = None
    return hook


def _summed_gradients(model, params, batches, teacher, sharded: bool, show_progress: bool, **loss_args):
    """The gradients of `params` summed over every calibration batch, with the counted tokens and batches (all
    ranks' totals under FSDP2). Single process: hooks sum each gradient into a float32 buffer as it is accumulated.
    FSDP2 accumulates the reduce-scattered gradient shards in `.grad` itself (hooks on the shards would never fire)."""
    buffers = {} if sharded else {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params}
    hooks = [] if sharded else [p.register_post_accumulate_grad_hook(_accumulate_into(buffers[id(p)]))
                                for p in params]
    try:
        total_tokens, num_batches = _backward_over(model, batches, teacher, sharded, show_progress, **loss_args)
    finally:
        for hook in hooks:
            hook.remove()
    if sharded:  # the reduce-scattered shards: the mean over ranks of their sums
        buffers = {id(p): p.grad for p in params}
        total_tokens, num_batches = int(all_reduce_sum(total_tokens)), int(all_reduce_sum(num_batches))
    return buffers, total_tokens, num_batches


def _backward_over(model, batches, teacher, sharded: bool, show_progress: bool, **loss_args) -> tuple[int, int]:
    """Backpropagate the scoring loss of every calibration batch (under FSDP2, this rank's share, all ranks in
    lockstep); returns this process's counted tokens and batches."""
    device = next(model.parameters()).device
    work = rank_share(list(batches)) if sharded else ((raw, True) for raw in batches)
    total = len(work) if sharded else (len(batches) if hasattr(batches, "__len__") else None)
    total_tokens, num_batches = 0, 0
    for raw, counted in tqdm(work, total=total, desc=f"Sensitivity ({loss_args['criterion']})", unit="batch",
                             disable=not show_progress):
        # Through the root's forward: under FSDP2 the LM head is gathered there and reduce-scattered after.
        loss, num_tokens = call_through_forward(model, _batch_loss, model, _as_batch(raw, device), teacher,
                                                **loss_args)
        if not counted:  # a padding step of this rank: it runs the collectives and adds nothing
            loss, num_tokens = loss * 0.0, 0
        if loss.requires_grad:
            loss.backward()
        total_tokens += num_tokens
        num_batches += int(counted)
        del loss
    return total_tokens, num_batches


def _check_arguments(model: nn.Module, teacher: nn.Module | None, criterion: str, top_k: int, aux_loss_coef):
    """The model's load-balancing loss and its weight, after checking the criterion, `top_k`, the weight and the
    teacher's vocabulary."""
    if criterion not in CRITERIA:
        raise ValueError(f"compute_sensitivity: criterion={criterion!r} is not supported; use one of {CRITERIA}.")
    arch = get_architecture(model)
    config = model.config
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"compute_sensitivity: top_k={top_k!r} must be an integer in [1, {config.vocab_size}].")
    if criterion == "kd" and teacher is not None and teacher is not model:
        check_same_vocabulary(model, teacher)
    aux_loss = arch.aux_loss_function()
    if aux_loss is None and aux_loss_coef:
        raise ValueError(f"compute_sensitivity: {arch.model_type} models train without a load-balancing loss; pass "
                         "aux_loss_coef=0 (or None).")
    coef = 0.0 if aux_loss is None else float(
        getattr(config, "router_aux_loss_coef", 0.0) if aux_loss_coef is None else aux_loss_coef)
    return aux_loss, coef


def _batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], teacher: nn.Module | None, criterion: str,
                top_k: int, chunk_size: int, aux_loss, coef: float) -> tuple[torch.Tensor, int]:
    """The summed loss of one calibration batch (KD or CLM term + `coef` x the per-token aux loss) and the number of
    tokens it counts. `teacher=None` takes the teacher distribution from the model's own forward (stage 1)."""
    base, lm_head = backbone(model), model.get_output_embeddings()
    device = lm_head.weight.device
    input_ids = batch["input_ids"]  # [B, T]
    attention_mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=bool(coef),
                   use_cache=False)
    hidden = outputs.last_hidden_state  # [B, T, H]
    if criterion == "kd":
        num_tokens = int(mask.sum())
        if "teacher_topk_ids" in batch and "teacher_topk_logprobs" in batch:
            ids, logprobs = _cached_topk(batch, top_k)
        elif teacher is None:
            ids, logprobs = teacher_topk_from_hidden(hidden.detach(), lm_head, top_k, chunk_size=chunk_size)
        else:
            teacher_device = next(teacher.parameters()).device
            ids, logprobs = call_through_forward(  # [B, T, k], no [B, T, V] teacher logits
                teacher, teacher_topk_from_model, teacher, input_ids.to(teacher_device),
                None if attention_mask is None else attention_mask.to(teacher_device), top_k, chunk_size=chunk_size,
            )
            ids, logprobs = ids.to(device), logprobs.to(device)
        loss = topk_kl_loss(hidden, lm_head.weight, lm_head.bias, ids, logprobs, mask, chunk_size=chunk_size,
                            reduction="sum")
    else:
        labels = batch.get("labels", input_ids).masked_fill(~mask, -100)
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # next token
        num_tokens = int((labels != -100).sum())
        loss = chunked_cross_entropy(hidden, lm_head.weight, lm_head.bias, labels, chunk_size=chunk_size,
                                     reduction="sum")
    if coef:
        arch = get_architecture(model)
        aux = aux_loss(outputs.router_logits, arch.num_experts_of(model.config), arch.top_k_of(model.config),
                       attention_mask)
        loss = loss + coef * num_tokens * aux  # the per-token mean aux, weighted like the summed KD term
    return loss, num_tokens


@torch.no_grad()
def _neuron_scores(model: nn.Module, scored: dict[str, dict[int, nn.Parameter]], buffers: dict[int, torch.Tensor],
                   total_tokens: int, world_size: int | None = None) -> dict[str, list[torch.Tensor]]:
    """Eq. 2 on the gradient of the mean loss over the set, then Eq. 4 (l2 over a neuron's entries), per layer.
    With `world_size` (FSDP2) every weight and its gradient shard are gathered one at a time; the shards hold the
    mean over ranks, the loss is their sum."""
    arch, config = get_architecture(model), model.config
    blocks = arch.moe_blocks(model)
    out = {name: [] for name in scored}
    for layer in range(config.num_hidden_layers):
        for name, per_layer in scored.items():
            param = per_layer.get(layer)
            if param is None:  # a dense layer (no experts) or one without GQA attention
                out[name].append(torch.zeros((0, 0) if name == "experts" else (0,)))
                continue
            weight, grad = param, buffers[id(param)]
            if world_size is not None:
                weight, grad = full_tensor(param), full_tensor(grad) * world_size
            s = (grad / total_tokens * weight.float()).abs_()
            if name == "experts":  # [E, H, I] (or [E, I, H] transposed) -> [E, I]
                hidden_axis = 2 if arch.expert_transposed else 1
                out[name].append(torch.linalg.vector_norm(s, dim=hidden_axis).cpu())
            elif name in ("shared_experts", "dense"):  # [H, I] -> [I]
                out[name].append(torch.linalg.vector_norm(s, dim=0).cpu())
            else:  # o_proj [H, num_heads * head_dim] -> neurons -> mean per GQA group [num_kv]
                neurons = torch.linalg.vector_norm(s, dim=0)
                out[name].append(neurons.reshape(config.num_key_value_heads, -1).mean(dim=1).cpu())
            del s
    return out


__all__ = ["SensitivityScores", "compute_sensitivity", "scored_parameters", "CRITERIA"]
