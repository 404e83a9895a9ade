"""Two checks of FSDP2 inside `DistillationTrainer` on 2 CPU ranks that the test suite does not run (the suite's test
is `tests/test_distributed.py -k trainer_distills`): bf16 mixed precision, and `load_best_model_at_end` reloading an
earlier FSDP checkpoint. Same tiny Qwen3-Next student and online teacher as that test (`tests/fsdp_worker.py`).

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_trainer_checks.py OUT_DIR

- `bf16: true` with AdamW: the sharded parameters the optimizer updates stay float32 (master weights), the forward
  runs under accelerate's `MixedPrecisionPolicy` (bfloat16 parameters and gradient reduction), both ranks gather the
  same weights, and the result is printed against the same run in float32.
- `load_best_model_at_end` with `metric_for_best_model: kl` and `greater_is_better: true` (so the best is the first
  evaluation, at step 2, not the last): after training, evaluating again gives step 2's `eval_kl`.

Rank 0 prints one line per check; the exit status is 1 when a check fails.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import fsdp_worker  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

from hf_slimmoe.utils.distributed import destroy_process_group  # noqa: E402


def gathered(trainer) -> dict[str, torch.Tensor]:
    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))


def same_on_every_rank(state: dict[str, torch.Tensor]) -> bool:
    flat = torch.cat([state[k].float().flatten() for k in sorted(state)])
    copies = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(copies, flat)
    return all(torch.equal(copies[0], c) for c in copies)


def bf16_check(out_dir: str) -> tuple[bool, str]:
    common = {"optim": "adamw_torch", "optim_args": None, "learning_rate": 1e-3}
    mixed = fsdp_worker.trainer_run(os.path.join(out_dir, "bf16"), fsdp=True, bf16=True, **common)
    dtypes = {p.dtype for p in mixed.model.parameters()}
    policy = mixed.accelerator.state.fsdp_plugin.mixed_precision_policy
    state = gathered(mixed)
    reference = gathered(fsdp_worker.trainer_run(os.path.join(out_dir, "fp32"), fsdp=True, **common))
    difference = max(float((state[k] - reference[k]).abs().max()) for k in state)
    in_sync = same_on_every_rank(state)
    ok = dtypes == {torch.float32} and policy.param_dtype == torch.bfloat16 and in_sync
    return ok, (f"bf16: parameters {sorted(map(str, dtypes))}, policy param/reduce {policy.param_dtype}/"
                f"{policy.reduce_dtype}, ranks in sync {in_sync}, max |bf16 - fp32| after 4 AdamW steps "
                f"{difference:.2e}")


def best_model_check(out_dir: str) -> tuple[bool, str]:
    trainer = fsdp_worker.trainer_run(os.path.join(out_dir, "best"), fsdp=True, eval_strategy="steps", eval_steps=2,
                                      load_best_model_at_end=True, metric_for_best_model="kl", greater_is_better=True)
    evaluated = [h["eval_kl"] for h in trainer.state.log_history if "eval_kl" in h]  # steps 2 and 4, then the end's
    again = trainer.evaluate()["eval_kl"]
    best = os.path.basename(trainer.state.best_model_checkpoint or "")
    ok = best == "checkpoint-2" and again == evaluated[0] != evaluated[1]
    return ok, f"load_best_model_at_end: best {best}, eval_kl at steps 2 / 4 {evaluated[:2]}, after loading {again}"


def main(out_dir: str) -> int:
    torch.distributed.init_process_group("gloo")
    results = [bf16_check(out_dir), best_model_check(out_dir)]
    if torch.distributed.get_rank() == 0:
        for ok, line in results:
            print(("ok    " if ok else "FAIL  ") + line, flush=True)
    destroy_process_group()
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
