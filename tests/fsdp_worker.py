"""FSDP2 on CPU ranks (gloo), run by tests/test_distributed.py as `torchrun --nproc_per_node 2 tests/fsdp_worker.py
MODE OUT_DIR`; rank r writes `OUT_DIR/MODE-r.json`.

- `score`: first, when OUT_DIR/model holds a checkpoint, `architectures.load_sharded` of it (rank 0 loads, the
  others build on the meta device and receive their shards): each rank reports its peak RSS, measured right after,
  and digests of the gathered weights and buffers; and, when OUT_DIR/qwen3_next holds one, the same in bfloat16
  ([`load_in_bf16`]). Then a tiny model sharded with `fully_shard` (one unit per decoder
  layer, plus the root) is scored, with itself and with a sharded online teacher, and compared with an unsharded copy
  scored in this process on all batches.
- `trainer-killed` / `trainer-resumed`: `DistillationTrainer.train()` with `args.fsdp` (FSDP2 inside the Trainer) on
  a tiny Qwen3-Next student and online teacher, evaluated before training ([`trainer_run`]). `trainer-killed` first
  trains OUT_DIR/whole uninterrupted and saves it, then starts OUT_DIR/killed, which SIGKILLs itself after step 3
  (its step-2 checkpoint is on disk); `trainer-resumed` resumes OUT_DIR/killed from that checkpoint to the end and
  saves it. The test runs the same steps in one process with gradient accumulation ([`trainer_run`] is shared) and
  compares.
"""

import copy
import hashlib
import json
import os
import signal
import sys

import torch
from transformers import TrainerCallback

from hf_slimmoe import DistillationConfig, DistillationTrainer, SlimMoeConfig, SlimMoeForCausalLM, compute_sensitivity
from hf_slimmoe.pruning.surgery import keep_indices
from hf_slimmoe.utils.distributed import destroy_process_group, is_sharded, shard_decoder_layers

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


# Qwen3-Next: its `shared_expert_gate` `(1, H)` has an empty shard on rank 1
QWEN3_NEXT = dict(model_type="qwen3_next", vocab_size=96, hidden_size=32, intermediate_size=48,
                  moe_intermediate_size=16, shared_expert_intermediate_size=24, num_hidden_layers=2,
                  layer_types=["linear_attention", "full_attention"], num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, num_experts=4, num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=8, linear_value_head_dim=8, max_position_embeddings=64)
TRAINER_STEPS = 4


class KillAfterStep3(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:  # checkpoint-2 is on disk on every rank: step 3 needed both ranks' collectives
            os.kill(os.getpid(), signal.SIGKILL)


def qwen3_next(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN3_NEXT))


def trainer_run(out_dir: str, fsdp: bool, resume: bool = False, kill: bool = False,
                **overrides) -> DistillationTrainer:
    """A DistillationTrainer run of `TRAINER_STEPS` steps of 8 rows, evaluated first: on 2 ranks x 4 rows with FSDP2
    (`args.fsdp`), or in one process with 2 accumulated micro-batches of 4; SGD with momentum (state to resume,
    updates linear in the gradients), a checkpoint every 2 steps, the final model saved to `out_dir/final`.
    `overrides` replace arguments of the `DistillationConfig` (benchmarks/fsdp_trainer_checks.py uses them)."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(5)
    data = Dataset.from_dict({"input_ids": [torch.randint(0, 96, (int(n),), generator=generator).tolist()
                                            for n in torch.randint(6, 13, (8 * TRAINER_STEPS + 4,),
                                                                   generator=generator)]})
    student, teacher = qwen3_next(0), qwen3_next(1)
    fsdp_args = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                             "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}) if fsdp else {}
    values = dict(output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=1 if fsdp else 2,
                  max_steps=TRAINER_STEPS, save_steps=2, optim="sgd", optim_args="momentum=0.9", learning_rate=0.5,
                  kd_loss="topk_tail", aux_loss_coef=0.01, logging_steps=1, report_to=[], use_cpu=True,
                  disable_tqdm=True, **fsdp_args)
    args = DistillationConfig(**{**values, **overrides})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=data.select(range(8 * TRAINER_STEPS)),
                                  eval_dataset=data.select(range(8 * TRAINER_STEPS, len(data))),
                                  callbacks=[KillAfterStep3()] if kill else None)
    trainer.evaluate()  # as a compression stage does: under FSDP2 the student is sharded before training starts
    trainer.train(resume_from_checkpoint=resume or None)
    trainer.save_model(os.path.join(out_dir, "final"))
    return trainer


def trainer_whole(out_dir: str) -> dict:
    whole = trainer_run(os.path.join(out_dir, "whole"), fsdp=True)
    return {"wrapper": type(whole.model_wrapped).__name__, "sharded": is_sharded(whole.model),
            "teacher_sharded": is_sharded(whole.teacher_model)}


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


def tensors_digest(model) -> dict:
    """Name -> dtype of every parameter and buffer, and a digest of their values (a collective for a sharded model:
    the full state dict is gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if is_sharded(model) else \
        model.state_dict()
    tensors = {**state, **dict(model.named_buffers())}
    values = b"".join(tensors[k].detach().float().contiguous().numpy().tobytes() for k in sorted(tensors))
    return {"dtypes": {k: str(t.dtype) for k, t in tensors.items()}, "digest": hashlib.sha256(values).hexdigest()}


def load_in_bf16(out_dir: str) -> dict:
    """`load_sharded` of the float32 Qwen3-Next checkpoint in OUT_DIR/qwen3_next in bfloat16 (`from_pretrained` keeps
    some tensors float32 on rank 0; the other ranks must build the same dtypes)."""
    from hf_slimmoe.architectures import load_sharded

    return tensors_digest(load_sharded(os.path.join(out_dir, "qwen3_next"), dtype=torch.bfloat16))


def main(mode: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if mode == "score":  # a saved checkpoint is loaded sharded first, so the peak RSS measured is the load's
        result = {"load": load(out_dir)} if os.path.isdir(os.path.join(out_dir, "model")) else {}
        if os.path.isdir(os.path.join(out_dir, "qwen3_next")):
            result["load_in_bf16"] = load_in_bf16(out_dir)
        result.update(score())
    elif mode == "trainer-killed":  # the uninterrupted run, reported; then the killed one, which does not return
        result = trainer_whole(out_dir)
    elif mode == "trainer-resumed":
        resumed = trainer_run(os.path.join(out_dir, "killed"), fsdp=True, resume=True)
        result = {"sharded": is_sharded(resumed.model), "global_step": resumed.state.global_step}
    with open(os.path.join(out_dir, f"{mode}-{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    if mode == "trainer-killed":
        trainer_run(os.path.join(out_dir, "killed"), fsdp=True, kill=True)
    destroy_process_group()  # frees the group the sharded models' meshes hold: its threads end before exit
    tasks = "/proc/self/task"  # the names of this process's native threads (Linux)
    names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else None
    with open(os.path.join(out_dir, f"threads-{os.environ['RANK']}.json"), "w") as f:
        json.dump(names, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
