"""The iterative-pruning baseline of the paper's Section 4.2 (after Liang et al. 2023, without layer-wise
distillation): the full-size model is distilled while masks remove its lowest-scoring expert neurons and GQA groups
gradually, then it is pruned physically once.

The masks address the same units as the tensor surgery (`expert_neurons`, `gqa_rows`), so a masked model computes
exactly what the pruned one computes.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from ..architectures import get_architecture
from ..configuration_slimmoe import SlimMoeConfig
from ..schedule import geometric_size
from .sensitivity import SensitivityScores, compute_sensitivity
from .surgery import expert_neurons, gqa_rows

logger = logging.getLogger(__name__)


class IterativeMaskCallback(TrainerCallback):
    """Grows pruning masks on the model a `Trainer` distills.

    The unmasked sizes shrink geometrically (the schedule of `plan_stages`, in continuous time) from the full size at
    step 0 to the target at `target_step`. Every `mask_every_steps` the sensitivity scores of the masked model are
    recomputed on the calibration batches and the masks grow; masked weights are zeroed after every optimizer step,
    which makes the masked model compute exactly what the pruned one would. `finalize()` prunes physically.
    On resume the masks are read back from the zeroed weights of the checkpoint.
    """

    def __init__(self, model, target: SlimMoeConfig, calibration: list[dict], teacher, criterion: str, top_k: int,
                 mask_every_steps: int, target_step: int, expert_multiple: int):
        self.model, self.target, self.calibration, self.teacher = model, target, calibration, teacher
        self.criterion, self.top_k = criterion, top_k
        self.every, self.target_step, self.multiple = mask_every_steps, target_step, expert_multiple
        self.source = SlimMoeConfig.from_config_dict(model.config.to_dict())
        self.arch = get_architecture(self.source)
        c = self.source
        self.expert_keep = [torch.ones(c.num_local_experts, c.intermediate_size, dtype=torch.bool)
                            for _ in range(c.num_hidden_layers)]
        self.group_keep = [torch.ones(c.num_key_value_heads, dtype=torch.bool) for _ in range(c.num_hidden_layers)]
        self.scores = None

    def sizes_at(self, step: int) -> tuple[int, int]:
        """The unmasked `(intermediate_size, num_key_value_heads)` at optimizer step `step`."""
        f = min(1.0, step / self.target_step)
        return (geometric_size(self.source.intermediate_size, self.target.intermediate_size, f, self.multiple)
                if f < 1 else self.target.intermediate_size,
                geometric_size(self.source.num_key_value_heads, self.target.num_key_value_heads, f, 1))

    def config_at(self, step: int) -> SlimMoeConfig:
        """The configuration the masked model computes like at step `step`."""
        intermediate, groups = self.sizes_at(step)
        return self.source.slimmed(intermediate_size=intermediate, num_key_value_heads=groups)

    def update_masks(self, step: int) -> None:
        """Re-score the masked model and keep the best of the still unmasked units, when the sizes shrank."""
        intermediate, groups = self.sizes_at(step)
        if intermediate == int(self.expert_keep[0][0].sum()) and groups == int(self.group_keep[0].sum()):
            return
        self.scores = compute_sensitivity(self.model, self.calibration, teacher=self.teacher,
                                          criterion=self.criterion, top_k=self.top_k, show_progress=False)
        for layer in range(self.source.num_hidden_layers):
            experts = self.scores.experts[layer].masked_fill(~self.expert_keep[layer], float("-inf"))  # [E, I]
            keep = torch.zeros_like(self.expert_keep[layer])
            self.expert_keep[layer] = keep.scatter(1, experts.topk(intermediate, dim=1).indices, True)
            kv = self.scores.kv_groups[layer].masked_fill(~self.group_keep[layer], float("-inf"))  # [KV]
            self.group_keep[layer] = torch.zeros_like(self.group_keep[layer]).scatter(0, kv.topk(groups).indices, True)
        logger.info("Iterative pruning at step %d: masks keep d_expert %d, %d KV groups", step, intermediate, groups)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked expert neuron (its gate, up and down weights) and every masked GQA group."""
        c = self.source
        per_group = c.num_attention_heads // c.num_key_value_heads
        for layer, block in enumerate(self.model.model.layers):
            drop = ~self.expert_keep[layer].to(block.mlp.experts.down_proj.device)  # [E, I]
            for weight in expert_neurons(self.arch, block.mlp.experts):  # [E, I, H] views
                weight.data[drop] = 0
            dropped = torch.nonzero(~self.group_keep[layer]).flatten()
            if dropped.numel() == 0:
                continue
            attention = block.self_attn
            q_rows, kv_rows = gqa_rows(dropped, per_group, c.head_dim)
            for proj, rows in ((attention.q_proj, q_rows), (attention.k_proj, kv_rows), (attention.v_proj, kv_rows)):
                proj.weight.data[rows.to(proj.weight.device)] = 0
                if proj.bias is not None:
                    proj.bias.data[rows.to(proj.bias.device)] = 0
            attention.o_proj.weight.data[:, q_rows.to(attention.o_proj.weight.device)] = 0

    def read_masks(self) -> None:
        """Read the masks back from the model's zeroed units (a resumed run's checkpoint)."""
        c = self.source
        for layer, block in enumerate(self.model.model.layers):
            down = expert_neurons(self.arch, block.mlp.experts)[-1]  # [E, I, H]
            self.expert_keep[layer] = down.detach().abs().sum(dim=-1).cpu() > 0
            o = block.self_attn.o_proj.weight.detach().abs().sum(dim=0).cpu()  # [heads * head_dim]
            self.group_keep[layer] = o.view(c.num_key_value_heads, -1).sum(dim=1) > 0

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
        experts = [keep.float() * (1 + (last.experts[i].clamp(min=0) if last else 0))
                   for i, keep in enumerate(self.expert_keep)]
        groups = [keep.float() * (1 + (last.kv_groups[i].clamp(min=0) if last else 0))
                  for i, keep in enumerate(self.group_keep)]
        scores = SensitivityScores(experts=experts, kv_groups=groups, metadata={"method": "iterative"})
        model.prune_to(self.target, scores)
        return model, scores


__all__ = ["IterativeMaskCallback"]
