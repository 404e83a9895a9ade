"""The iterative-pruning baseline of the paper's Section 4.2 (after Liang et al. 2023, without layer-wise
distillation): the full-size model is distilled while masks remove its lowest-scoring expert neurons (routed,
shared, and dense MLPs sized by the expert width) and GQA groups gradually, then it is pruned physically once. Any supported family.

The masks address the same units as the tensor surgery (`expert_neurons`, `gqa_rows`, a shared expert's rows), so a
masked model computes exactly what the pruned one computes.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from ..architectures import get_architecture
from .schedule import config_between, stage_sizes
from .sensitivity import SensitivityScores, compute_sensitivity
from .surgery import expert_neurons, gqa_rows, head_rows, prune_to

logger = logging.getLogger(__name__)


def _narrow(scores: torch.Tensor, keep: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` best-scoring of the still kept units along the last dim of `keep` (a boolean mask)."""
    best = scores.masked_fill(~keep, float("-inf")).topk(size, dim=-1).indices
    return torch.zeros_like(keep).scatter(-1, best, True)


class IterativeMaskCallback(TrainerCallback):
    """Grows pruning masks on the model a `Trainer` distills.

    The unmasked sizes shrink geometrically (the schedule of `plan_stages`, in continuous time: `config_between`)
    from the full size at step 0 to the target at `target_step`. Every `mask_every_steps` the sensitivity scores of
    the masked model are recomputed on the calibration batches and the masks grow; masked weights are zeroed after
    every optimizer step, which makes the masked model compute exactly what the pruned one would. `finalize()`
    prunes physically. On resume the masks are read back from the zeroed weights of the checkpoint.
    """

    def __init__(self, model, target, calibration: list[dict], teacher, criterion: str, top_k: int,
                 mask_every_steps: int, target_step: int, expert_multiple: int):
        self.model, self.target, self.calibration, self.teacher = model, target, calibration, teacher
        self.criterion, self.top_k = criterion, top_k
        self.every, self.target_step, self.multiple = mask_every_steps, target_step, expert_multiple
        self.source = model.config
        self.arch = arch = get_architecture(self.source)
        layers, blocks = arch.decoder_layers(model), arch.moe_blocks(model)
        width, shared = arch.expert_width_of(self.source), arch.shared_width_of(self.source)
        # masks by decoder layer: [E, width] for the routed experts, [shared width], [KV groups]
        self.expert_keep = {i: torch.ones(arch.num_experts_of(self.source), width, dtype=torch.bool) for i in blocks}
        self.shared_keep = {i: torch.ones(shared, dtype=torch.bool) for i in blocks} if shared else {}
        self.dense_keep = {i: torch.ones(width, dtype=torch.bool) for i in arch.dense_blocks(model)}  # Jamba
        groups = self.source.num_key_value_heads
        self.group_keep = {i: torch.ones(groups, dtype=torch.bool) for i, layer in enumerate(layers)
                           if arch.attention_prunable and arch.attention_of(layer) is not None}
        self.masked = stage_sizes(self.source)  # the sizes the masks keep now
        self.scores = None

    def config_at(self, step: int):
        """The configuration the masked model computes like at optimizer step `step`."""
        return config_between(self.source, self.target, step / self.target_step, self.multiple)

    def update_masks(self, step: int) -> None:
        """Re-score the masked model and keep the best of the still unmasked units, when the sizes shrank."""
        config = self.config_at(step)
        sizes = stage_sizes(config)
        if sizes == self.masked:
            return
        self.scores = compute_sensitivity(self.model, self.calibration, teacher=self.teacher,
                                          criterion=self.criterion, top_k=self.top_k, show_progress=False)
        arch = self.arch
        for i, keep in self.expert_keep.items():
            self.expert_keep[i] = _narrow(self.scores.experts[i], keep, arch.expert_width_of(config))
        for i, keep in self.shared_keep.items():
            self.shared_keep[i] = _narrow(self.scores.shared_experts[i], keep, arch.shared_width_of(config))
        for i, keep in self.dense_keep.items():
            self.dense_keep[i] = _narrow(self.scores.dense[i], keep, arch.expert_width_of(config))
        for i, keep in self.group_keep.items():
            self.group_keep[i] = _narrow(self.scores.kv_groups[i], keep, config.num_key_value_heads)
        self.masked = sizes
        logger.info("Iterative pruning at step %d: masks keep %s", step, sizes)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked expert neuron (gate, up and down), shared-expert or tied dense MLP neuron and GQA
        group."""
        arch, config = self.arch, self.source
        blocks, layers = arch.moe_blocks(self.model), arch.decoder_layers(self.model)
        for i, keep in self.expert_keep.items():
            experts = arch.experts_of(blocks[i])
            drop = ~keep.to(experts.down_proj.device)  # [E, I]
            for weight in expert_neurons(arch, experts):  # [E, I, in] views
                weight.data[drop] = 0
        dense = arch.dense_blocks(self.model)
        for mlp, keep in [*((arch.shared_of(blocks[i]), k) for i, k in self.shared_keep.items()),
                          *((dense[i], k) for i, k in self.dense_keep.items())]:
            rows = torch.nonzero(~keep).flatten().to(mlp.down_proj.weight.device)
            for name in ("gate_proj", "up_proj"):
                if getattr(mlp, name, None) is not None:
                    getattr(mlp, name).weight.data[rows] = 0
            mlp.down_proj.weight.data[:, rows] = 0
        per_group, head_dim = config.num_attention_heads // config.num_key_value_heads, arch.head_dim_of(config)
        for i, keep in self.group_keep.items():
            dropped = torch.nonzero(~keep).flatten()
            if dropped.numel() == 0:
                continue
            attention = arch.attention_of(layers[i])
            q_rows, kv_rows = gqa_rows(dropped, per_group, head_dim)
            if arch.gated_queries:  # each head's queries, then as many gate logits
                q_proj_rows = head_rows(head_rows(dropped, per_group), 2 * head_dim)
            else:
                q_proj_rows = q_rows
            for proj, rows in ((attention.q_proj, q_proj_rows), (attention.k_proj, kv_rows),
                               (attention.v_proj, kv_rows)):
                proj.weight.data[rows.to(proj.weight.device)] = 0
                if proj.bias is not None:
                    proj.bias.data[rows.to(proj.bias.device)] = 0
            attention.o_proj.weight.data[:, q_rows.to(attention.o_proj.weight.device)] = 0

    def read_masks(self) -> None:
        """Read the masks back from the model's zeroed units (a resumed run's checkpoint)."""
        arch = self.arch
        blocks, layers = arch.moe_blocks(self.model), arch.decoder_layers(self.model)
        for i in self.expert_keep:
            down = expert_neurons(arch, arch.experts_of(blocks[i]))[-1]  # [E, I, H]
            self.expert_keep[i] = down.detach().abs().sum(dim=-1).cpu() > 0
        for i in self.shared_keep:
            self.shared_keep[i] = arch.shared_of(blocks[i]).down_proj.weight.detach().abs().sum(dim=0).cpu() > 0
        dense = arch.dense_blocks(self.model)
        for i in self.dense_keep:
            self.dense_keep[i] = dense[i].down_proj.weight.detach().abs().sum(dim=0).cpu() > 0
        for i in self.group_keep:
            o = arch.attention_of(layers[i]).o_proj.weight.detach().abs().sum(dim=0).cpu()  # [heads * head_dim]
            self.group_keep[i] = o.view(self.source.num_key_value_heads, -1).sum(dim=1) > 0
        first = next(iter(self.expert_keep.values()))
        self.masked = {**self.masked, "expert_width": int(first[0].sum())}
        if self.shared_keep:
            self.masked["shared_expert_width"] = int(next(iter(self.shared_keep.values())).sum())
        if self.group_keep:
            self.masked["num_key_value_heads"] = int(next(iter(self.group_keep.values())).sum())

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the checkpoint's zeroed units are the masks
            self.read_masks()
        self.update_masks(state.global_step)
        self.apply_masks()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= self.target_step:
            self.update_masks(state.global_step)
        self.apply_masks()

    def finalize(self, model):
        """Reach the target masks if training stopped before `target_step`, then prune physically to the target.
        Returns the pruned model and the mask scores used (kept units score 1 + their last sensitivity)."""
        self.model = model
        self.update_masks(self.target_step)
        self.apply_masks()
        last = self.scores

        def mask_scores(masks: dict, name: str, empty: tuple) -> list[torch.Tensor]:
            return [masks[i].float() * (1 + (getattr(last, name)[i].clamp(min=0) if last else 0)) if i in masks
                    else torch.zeros(empty) for i in range(self.source.num_hidden_layers)]

        scores = SensitivityScores(
            experts=mask_scores(self.expert_keep, "experts", (0, 0)),
            kv_groups=mask_scores(self.group_keep, "kv_groups", (0,)),
            shared_experts=mask_scores(self.shared_keep, "shared_experts", (0,)) if self.shared_keep else [],
            dense=mask_scores(self.dense_keep, "dense", (0,)) if self.dense_keep else [],
            metadata={"method": "iterative"})
        prune_to(model, self.target, scores)
        return model, scores


__all__ = ["IterativeMaskCallback"]
