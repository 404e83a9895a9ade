"""FSDP2 on 2 CPU ranks (gloo): sensitivity scores under `fully_shard` equal one process's, `DistillationTrainer`
shards with FSDP2 inside the Trainer and computes what one process computes (and resumes from its FSDP checkpoints),
`slimmoe compress` runs under `accelerate launch` with the shipped `recipes/accelerate/fsdp2.yaml`, and the iterative
baseline is refused under FSDP.

The whole file passed 10 runs in a row on its final code (the README's scale section has the figures). `torchrun
--standalone` and a free `--main_process_port` keep them off the default port 29500, which other jobs on the machine
may hold."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process references run on one thread, as the workers do (`ENV`): with more threads the CPU kernels sum in
    another order, so "bit-identical to one process" would compare two different summation orders."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A TCP port free right now (other jobs on the machine may run their own multi-process tests on 29500)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """The processes started, directly or not, by process `pid` (read from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def torchrun_worker(mode: str, out_dir, killed: bool = False) -> list[dict]:
    """The `MODE-r.json` of both ranks of `torchrun ... fsdp_worker.py MODE OUT_DIR` (which must exit 0, or with
    `killed`, not)."""
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(HERE, "fsdp_worker.py"),
                             mode, str(out_dir)], env=ENV, capture_output=True, text=True, timeout=300)
    assert (result.returncode != 0) == killed, result.stderr[-3000:]
    return [json.load(open(os.path.join(out_dir, f"{mode}-{r}.json"))) for r in range(2)]


@pytest.fixture(scope="module")
def score_run(tmp_path_factory):
    """One `torchrun` of the worker's `score` mode for the tests below (each launch costs ~15 s): first it loads a 433
    MiB checkpoint (113.5M float32 parameters) with `load_sharded`, and a tiny Qwen3-Next one in bfloat16, then it
    scores. Returns the output directory
    and each rank's results."""
    sys.path.insert(0, HERE)
    import fsdp_worker

    from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM

    out = tmp_path_factory.mktemp("score")
    config = SlimMoeConfig(**{**fsdp_worker.TINY, "hidden_size": 1024, "intermediate_size": 1024,
                              "num_hidden_layers": 4, "num_local_experts": 8})
    torch.manual_seed(0)
    SlimMoeForCausalLM(config).save_pretrained(out / "model")
    fsdp_worker.qwen3_next(0).save_pretrained(out / "qwen3_next")
    return out, torchrun_worker("score", out)


def test_sensitivity_scores_under_fsdp2_equal_one_process(score_run):
    """Self-teacher and a sharded online teacher, 5 batches over 2 ranks (one padding step): the scores of the
    sharded model match an unsharded copy's to float rounding and keep the same neurons and groups."""
    for rank in score_run[1]:
        for name in ("self_teacher", "online_teacher"):
            result = rank[name]
            assert result["sharded"] and result["allclose"], result
            assert result["same_kept_neurons"] and result["same_kept_groups"], result
            assert result["tokens"][0] == result["tokens"][1] and result["batches"] == ["5", "5"], result


def test_load_sharded_gives_rank_1_only_its_shard_and_the_same_model(score_run):
    """`load_sharded` on 2 ranks: rank 0 loads the checkpoint, rank 1 builds the model on the meta device and
    receives its shards, so rank 1's peak host RSS is at most 60% of rank 0's (which held the whole model, as every
    rank did before), and the gathered weights and buffers equal a plain one-process load of the checkpoint, as does
    the teacher fingerprint a teacher cache records (of a sharded teacher: one gathered tensor at a time)."""
    import hashlib

    from hf_slimmoe.architectures import load_model
    from hf_slimmoe.distillation import teacher_fingerprint

    out, ranks = score_run
    reference = load_model(out / "model", dtype=torch.float32)
    state = reference.state_dict()
    digest = hashlib.sha256(b"".join(state[k].detach().contiguous().numpy().tobytes() for k in sorted(state)))
    buffers = hashlib.sha256(b"".join(b.contiguous().numpy().tobytes() for b in reference.buffers()))
    loads = [rank["load"] for rank in ranks]
    for load in loads:
        assert load["sharded"] and load["digest"] == digest.hexdigest() and load["buffers"] == buffers.hexdigest()
        assert load["fingerprint"] == teacher_fingerprint(reference)
    assert loads[1]["peak_mib"] <= 0.6 * loads[0]["peak_mib"], loads


def test_load_sharded_in_bf16_gives_every_rank_the_dtypes_from_pretrained_gives(score_run):
    """A float32 Qwen3-Next checkpoint loaded into shards in bfloat16: rank 1 (built on the meta device) holds each
    parameter and buffer in the dtype `from_pretrained` gives rank 0 (it keeps some float32), so the broadcasts match,
    and the gathered model equals a one-process bfloat16 load."""
    import fsdp_worker

    from hf_slimmoe.architectures import load_model

    out, ranks = score_run
    reference = fsdp_worker.tensors_digest(load_model(out / "qwen3_next", dtype=torch.bfloat16))
    assert {"torch.bfloat16", "torch.float32"} <= set(reference["dtypes"].values())  # both kinds are there
    assert [rank["load_in_bf16"] for rank in ranks] == [reference, reference]


def test_destroy_process_group_ends_the_gloo_threads_of_sharded_models(score_run):
    """`hf_slimmoe.utils.distributed.destroy_process_group` frees the group the FSDP2 models' device meshes (kept alive
    by DTensor's caches) still hold, so no gloo thread is left to abort the rank at interpreter exit (torch's own
    `destroy_process_group` left `pt_gloo_runloop` and `gloo_tcp_loop` running here)."""
    for rank in range(2):
        names = json.load(open(score_run[0] / f"threads-{rank}.json"))
        if names is None:
            pytest.skip("no /proc/self/task on this system")
        assert not [name for name in names if "gloo" in name], names


def test_the_trainer_distills_with_fsdp2_on_cpu_ranks_saves_full_checkpoints_and_resumes_after_a_kill(tmp_path):
    """`DistillationTrainer.train()` with `args.fsdp` (FSDP2, one unit per decoder layer) on 2 CPU ranks: the student
    and the online teacher are sharded inside the Trainer (not DDP), the student by a first `evaluate()` already
    (Qwen3-Next: a `(1, H)` gate has an empty shard on rank 1, see `DistillationTrainer.create_optimizer`); after 4
    steps the weights equal one process's accumulating the same two halves of every batch, `save_model` writes a full
    checkpoint that stock `from_pretrained` loads, and a run SIGKILLed after step 3 resumes from its step-2 FSDP
    checkpoint and ends bit-identical to the uninterrupted run."""
    sys.path.insert(0, HERE)
    import fsdp_worker
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ranks = torchrun_worker("trainer-killed", tmp_path, killed=True)
    assert all(r["sharded"] and r["teacher_sharded"] for r in ranks), ranks
    assert all(r["wrapper"].startswith("FSDP") for r in ranks), ranks  # fully_shard's class, not DDP
    killed = tmp_path / "killed"
    assert sorted(os.listdir(killed)) == ["checkpoint-2"]
    assert (killed / "checkpoint-2" / "pytorch_model_fsdp.bin").exists()
    assert [r["global_step"] for r in torchrun_worker("trainer-resumed", tmp_path)] == [4, 4]

    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(killed / "final" / "model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    one_process = fsdp_worker.trainer_run(str(tmp_path / "one_process"), fsdp=False).model.state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "final")
    assert type(loaded).__name__ == "Qwen3NextForCausalLM"
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, one_process[name], rtol=1e-5, atol=1e-7, msg=name)
    initial = fsdp_worker.qwen3_next(0).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in whole.items())  # it trained


# Teachers of two families, built tiny (`teacher.build.config`), and the stage-2 target: a DeepSeek-V3 (shared experts,
# a dense first layer, MLA attention kept) and a Qwen3-Next hybrid (linear-attention and full-attention layers; the GQA
# groups of the full-attention layer pruned, its shared expert kept). A Qwen3-MoE run was dropped to keep the suite
# short: its code paths (routed experts, GQA pruning, a top-k cache) are a subset of Qwen3-Next's. PhiMoE goes through
# the same code (and through FSDP2 scoring in the tests above); each run takes 20-30 s.
FSDP_TEACHERS = {
    "deepseek_v3": ({"model_type": "deepseek_v3", "hidden_size": 32, "intermediate_size": 48,
                     "moe_intermediate_size": 32, "num_hidden_layers": 2, "first_k_dense_replace": 1,
                     "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1,
                     "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "q_lora_rank": 24, "kv_lora_rank": 16,
                     "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "max_position_embeddings": 128},
                    {"expert_width": 16}),
    "qwen3_next": ({"model_type": "qwen3_next", "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 32,
                    "shared_expert_intermediate_size": 24, "num_hidden_layers": 2,
                    "layer_types": ["linear_attention", "full_attention"], "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
                    "linear_value_head_dim": 8, "max_position_embeddings": 128},
                   {"expert_width": 16, "num_key_value_heads": 1}),
}


@pytest.mark.parametrize("family", list(FSDP_TEACHERS))
def test_compress_under_accelerate_launch_with_the_fsdp2_config(tmp_path, family):
    """`accelerate launch --config_file recipes/accelerate/fsdp2.yaml` on 2 CPU processes runs a tiny recipe end to
    end for teachers of several families: the teacher is loaded into FSDP2 shards (and caches, evaluates and scores
    sharded, in lockstep), each stage is scored on its parent loaded into shards (3 calibration batches over 2 ranks),
    pruned by streaming surgery and distilled; the stage-1 scores equal those one process computes on the teacher, and
    the last stage has the target sizes."""
    from test_pipeline import STAGE_FILES, tiny_recipe

    from hf_slimmoe import compute_sensitivity
    from hf_slimmoe.architectures import get_architecture, load_model
    from hf_slimmoe.compression.recipe import recipe_from_dict
    from hf_slimmoe.compression.resume import is_finished_stage
    from hf_slimmoe.compression.sources import load_blocks
    from hf_slimmoe.pruning import SensitivityScores
    from hf_slimmoe.utils.data import batches

    accelerate = shutil.which("accelerate") or pytest.skip("accelerate is not installed")
    out = tmp_path / "fsdp"
    config, target = FSDP_TEACHERS[family]
    values = tiny_recipe(out, stages__budget__steps=[3, 3], early_stopping__enabled=False, data__eval_blocks=4,
                         data__calibration_blocks=6, scoring__batch_size=2, stages__target=target,
                         distillation__cache_teacher=family != "deepseek_v3")  # one runs its sharded teacher online
    values["teacher"]["build"].update(config=config, pretrain_steps=10)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(values))
    result = subprocess.run(
        [accelerate, "launch", "--config_file", os.path.join(ROOT, "recipes", "accelerate", "fsdp2.yaml"),
         "--main_process_port", str(free_port()), "--num_processes", "2", "--mixed_precision", "no",
         "-m", "hf_slimmoe.cli", "compress", str(tmp_path / "recipe.yaml"), "--log-level", "INFO"],
        env=ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Streaming surgery of") == 2  # the main process cut each parent on disk
    assert result.stderr.count("The teacher is loaded into FSDP2 shards on rank") == 2  # both ranks: a shard each
    assert "The Trainer shards with FSDP2 on CPU rank 1" in result.stderr  # distillation too, not DDP
    assert result.stderr.count("Loading the pruned student of stage") == 4  # 2 stages x 2 ranks: into shards
    for stage in (1, 2):
        assert is_finished_stage(out / f"stage-{stage}") and STAGE_FILES <= set(os.listdir(out / f"stage-{stage}"))
    info = json.load(open(out / "stage-2" / "stage.json"))
    assert info["training"]["tokens"] == 3 * 4 * 32 * 2  # two ranks of 4 x 32-token rows per step

    from transformers import AutoTokenizer

    recipe = recipe_from_dict(values)
    tokenizer = AutoTokenizer.from_pretrained(out / "teacher")
    calibration = batches(load_blocks(recipe, tokenizer)["calibration"], 2, tokenizer.pad_token_id or 0)
    assert len(calibration) == 3
    teacher = load_model(out / "teacher")
    expected = compute_sensitivity(teacher, calibration, show_progress=False)
    sharded = SensitivityScores.load(out / "stage-1" / "scores.safetensors")
    expected = expected.experts + expected.kv_groups + expected.shared_experts
    sharded = sharded.experts + sharded.kv_groups + sharded.shared_experts
    assert len(expected) == len(sharded)
    for a, b in zip(expected, sharded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10)
    model = load_model(out / "stage-2")
    arch = get_architecture(model.config)
    assert arch.expert_width_of(model.config) == target["expert_width"]
    assert model.config.num_key_value_heads == target.get("num_key_value_heads", config["num_key_value_heads"])


def test_iterative_baseline_is_refused_under_fsdp(tmp_path, monkeypatch):
    from test_pipeline import tiny_recipe

    from hf_slimmoe.compression.plan import check
    from hf_slimmoe.compression.recipe import recipe_from_dict

    recipe = recipe_from_dict(tiny_recipe(tmp_path, method="iterative"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config exports
    with pytest.raises(ValueError, match="method: iterative does not run under FSDP"):
        check(recipe)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    fsdp = recipe_from_dict(tiny_recipe(tmp_path, method="iterative", training__fsdp="full_shard"))
    with pytest.raises(ValueError, match="iterative does not run under FSDP"):
        check(fsdp)


def test_cache_teacher_on_two_ranks_equals_one_process_and_resumes_after_a_kill(tmp_path):
    """`torchrun --nproc_per_node 2 -m hf_slimmoe.cli cache-teacher`, SIGKILLed once a few shards are written, then
    run again: the finished shards are reused, and the cache equals the one-process cache row for row. The sampled
    cache (`--kd-loss sampled`) is split over the ranks the same way and equals one process's too."""
    import signal
    import time

    from datasets import Dataset, load_from_disk

    from hf_slimmoe import SlimMoeConfig, SlimMoeForCausalLM, cache_teacher_samples, cache_teacher_topk

    torch.manual_seed(0)
    teacher = SlimMoeForCausalLM(SlimMoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               num_local_experts=4, num_experts_per_tok=2,
                                               max_position_embeddings=64)).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 128, (int(n),), generator=generator).tolist()
            for n in torch.randint(20, 49, (240,), generator=generator)]
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "data"))
    expected = cache_teacher_topk(teacher, load_from_disk(str(tmp_path / "data")), top_k=4, batch_size=2,
                                  output_dir=tmp_path / "one", shard_size=4)

    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    out, partial = tmp_path / "two", tmp_path / "two.partial"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "hf_slimmoe.cli", "cache-teacher",
               str(tmp_path / "teacher"), str(tmp_path / "data"), str(out), "--top-k", "4", "--batch-size", "2",
               "--shard-size", "4"]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, finished = time.time() + 200, []
    try:
        while time.time() < deadline and process.poll() is None:
            finished = [p for p in partial.glob("shard-*.parquet")] if partial.is_dir() else []
            if len(finished) >= 3:
                break
            time.sleep(0.01)
        assert process.poll() is None, f"ended before it was killed: {process.stderr.read()[-3000:]}"
        for pid in [process.pid] + descendants(process.pid):  # torchrun starts its workers in their own sessions
            os.kill(pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not out.exists() and len(finished) >= 3

    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reused = [int(line.split("reused ")[1].split()[0]) for line in result.stderr.splitlines()
              if "Teacher topk cache: rank" in line]
    assert len(reused) == 2 and sum(reused) >= len(finished), result.stderr[-2000:]
    assert not partial.exists()
    cached = load_from_disk(str(out))
    assert cached.column_names == expected.column_names and len(cached) == len(expected) == 240
    for column in expected.column_names:  # row for row, bit for bit
        assert cached[column] == expected[column], column

    samples = cache_teacher_samples(teacher, load_from_disk(str(tmp_path / "data")), num_samples=3, seed=5,
                                    batch_size=2, output_dir=tmp_path / "one-samples", shard_size=16)
    result = subprocess.run(command[:9] + [str(tmp_path / "two-samples"), "--kd-loss", "sampled", "--num-samples", "3",
                                           "--seed", "5", "--batch-size", "2", "--shard-size", "16"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cached = load_from_disk(str(tmp_path / "two-samples"))
    assert cached.column_names == samples.column_names and "teacher_sample_packed" in cached.column_names
    for column in samples.column_names:
        assert cached[column] == samples[column], column
