"""FSDP2 on CPU ranks (gloo), run by tests/test_distributed.py as `torchrun --nproc_per_node 2 tests/fsdp_worker.py
MODE OUT_DIR`; rank r writes `OUT_DIR/rank-r.json` (and rank 0 the distilled weights).

- `score`: first, when OUT_DIR/model holds a checkpoint, `architectures.load_sharded` of it (rank 0 loads, the
  others build on the meta device and receive their shards): each rank reports its peak RSS, measured right after,
  and digests of the gathered weights and buffers. Then a tiny model sharded with `fully_shard` (one unit per decoder
  layer, plus the root) is scored, with itself and with a sharded online teacher, and compared with an unsharded copy
  scored in this process on all batches.
- `distill`: the sharded student is distilled for a few SGD steps through `DistillationTrainer.compute_loss` (online
  sharded teacher, KD + aux), each rank on its half of every global batch; every rank then gathers the full state
  dict. The test runs the same steps in one process with gradient accumulation over the same two halves
  ([`train`] is shared) and compares.
"""

import copy
import hashlib
import json
import os
import sys

import torch

from hf_slimmoe import DistillationConfig, DistillationTrainer, SlimMoeConfig, SlimMoeForCausalLM, compute_sensitivity
from hf_slimmoe.pruning.surgery import keep_indices
from hf_slimmoe.utils.data import TokenCollator
from hf_slimmoe.utils.distributed import destroy_process_group, is_sharded, rank_and_world, shard_decoder_layers

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            attention_bias=True, lm_head_bias=True)
STEPS, GLOBAL_BATCH = 3, 8


def model(seed):
    torch.manual_seed(seed)
    return SlimMoeForCausalLM(SlimMoeConfig(**TINY)).eval()


def batches(count=5):  # odd: one rank pads its share with a step that counts nothing
    generator = torch.Generator().manual_seed(7)
    out = []
    for i in range(count):
        ids = torch.randint(0, 96, (2, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 12 - i:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def compare(reference, sharded) -> dict:
    pairs = list(zip(reference.experts + reference.kv_groups, sharded.experts + sharded.kv_groups))
    return {
        "max_rel_diff": max(float(((a - b).abs() / a.abs().clamp(min=1e-12)).max()) for a, b in pairs),
        "allclose": all(torch.allclose(a, b, rtol=1e-4, atol=1e-10) for a, b in pairs),
        "same_kept_neurons": all(torch.equal(keep_indices(a, 16), keep_indices(b, 16))
                                 for a, b in zip(reference.experts, sharded.experts)),
        "same_kept_groups": all(torch.equal(keep_indices(a, 2), keep_indices(b, 2))
                                for a, b in zip(reference.kv_groups, sharded.kv_groups)),
        "tokens": [reference.metadata["num_tokens"], sharded.metadata["num_tokens"]],
        "batches": [reference.metadata["num_batches"], sharded.metadata["num_batches"]],
    }


def score() -> dict:
    student, teacher, data = model(0), model(1), batches()
    results = {}
    for name, online in (("self_teacher", None), ("online_teacher", teacher)):
        reference = compute_sensitivity(copy.deepcopy(student), data, teacher=online, show_progress=False)
        sharded_student = shard_decoder_layers(copy.deepcopy(student))
        sharded_teacher = None if online is None else shard_decoder_layers(copy.deepcopy(online))
        scores = compute_sensitivity(sharded_student, data, teacher=sharded_teacher, show_progress=False)
        results[name] = {**compare(reference, scores), "sharded": is_sharded(sharded_student)}
    return results


def rows() -> list[list[dict]]:
    """Per step, the global batch as two halves (rows of varying length: padding is masked)."""
    generator = torch.Generator().manual_seed(11)
    steps = []
    for _ in range(STEPS):
        batch = [{"input_ids": torch.randint(0, 96, (int(n),), generator=generator).tolist()}
                 for n in torch.randint(6, 13, (GLOBAL_BATCH,), generator=generator)]
        steps.append([batch[:GLOBAL_BATCH // 2], batch[GLOBAL_BATCH // 2:]])
    return steps


def train(student, teacher, out_dir: str, halves: list[int]) -> list[float]:
    """SGD steps of `DistillationTrainer.compute_loss` on the given halves of every global batch (one half per rank,
    or both as gradient accumulation in one process); returns the losses."""
    args = DistillationConfig(output_dir=out_dir, per_device_train_batch_size=GLOBAL_BATCH // 2, aux_loss_coef=0.01,
                              report_to=[], use_cpu=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    collate, optimizer, losses = TokenCollator(), torch.optim.SGD(student.parameters(), lr=0.5), []
    student.train()
    for index, step in enumerate(rows()):
        labels = [collate(half)["labels"] for half in step]
        tokens = torch.tensor(sum(int((lab[:, 1:] != -100).sum()) for lab in labels))  # counted in the global batch
        trainer.current_gradient_accumulation_steps = len(halves)
        for half in halves:
            torch.manual_seed(100 * index + half)  # PhiMoE's sparsemixer samples its routing in training mode
            loss = trainer.compute_loss(student, collate(step[half]), num_items_in_batch=tokens)
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return losses


def distill(out_dir: str) -> dict:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    rank, _ = rank_and_world()
    student, teacher = shard_decoder_layers(model(0)), shard_decoder_layers(model(1))
    losses = train(student, teacher, os.path.join(out_dir, "trainer"), [rank])
    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))  # on every rank
    digest = hashlib.sha256(b"".join(state[k].detach().contiguous().numpy().tobytes() for k in sorted(state)))
    if rank == 0:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(out_dir, "distilled.safetensors"))
    return {"sharded": is_sharded(student), "losses": losses, "digest": digest.hexdigest()}


def load(out_dir: str) -> dict:
    """`load_sharded` of the checkpoint the test saved in OUT_DIR/model: this rank's peak RSS (measured before
    anything is gathered), a digest of the whole state dict, gathered afterwards, and its teacher fingerprint."""
    import resource

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from hf_slimmoe.architectures import load_sharded

    sharded = load_sharded(os.path.join(out_dir, "model"))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    digest = hashlib.sha256(b"".join(state[k].detach().contiguous().numpy().tobytes() for k in sorted(state)))
    buffers = hashlib.sha256(b"".join(b.contiguous().numpy().tobytes() for b in sharded.buffers()))
    from hf_slimmoe.distillation import teacher_fingerprint

    return {"sharded": is_sharded(sharded), "peak_mib": peak_mib, "digest": digest.hexdigest(),
            "buffers": buffers.hexdigest(), "fingerprint": teacher_fingerprint(sharded)}


def main(mode: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if mode == "score":  # a saved checkpoint is loaded sharded first, so the peak RSS measured is the load's
        result = {"load": load(out_dir)} if os.path.isdir(os.path.join(out_dir, "model")) else {}
        result.update(score())
    else:
        result = distill(out_dir)
    with open(os.path.join(out_dir, f"rank-{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    destroy_process_group()  # frees the group the sharded models' meshes hold: its threads end before exit
    tasks = "/proc/self/task"  # the names of this process's native threads (Linux)
    names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else None
    with open(os.path.join(out_dir, f"threads-{os.environ['RANK']}.json"), "w") as f:
        json.dump(names, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
