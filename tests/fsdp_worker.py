"""Run by `torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR` (see tests/test_distributed.py), on CPU with gloo.

Each rank scores a tiny model sharded with FSDP2 (`fully_shard` per decoder layer and the root) and compares the
scores with those of an unsharded copy scored in this process on all batches; rank r writes `OUT_DIR/rank-r.json`.
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM, compute_sensitivity
from hf_slimmoe.distributed import is_sharded, shard_decoder_layers
from hf_slimmoe.pruning.surgery import keep_indices

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            attention_bias=True, lm_head_bias=True)


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


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    student, teacher, data = model(0), model(1), batches()
    results = {}
    for name, online in (("self_teacher", None), ("online_teacher", teacher)):
        reference = compute_sensitivity(copy.deepcopy(student), data, teacher=online, show_progress=False)
        sharded_student = shard_decoder_layers(copy.deepcopy(student))
        sharded_teacher = None if online is None else shard_decoder_layers(copy.deepcopy(online))
        scores = compute_sensitivity(sharded_student, data, teacher=sharded_teacher, show_progress=False)
        results[name] = {**compare(reference, scores), "sharded": is_sharded(sharded_student)}
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
