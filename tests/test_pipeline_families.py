"""`slimmoe plan / compress / info` on teachers of other families than PhiMoE: a two-stage compression of a tiny
built Qwen3-MoE (pruned in memory) and a tiny built Mixtral (pruned by streaming surgery); every stage is a stock
checkpoint of the teacher's family."""

import copy
import json
import os
import subprocess
import sys

import yaml
from test_pipeline import RECIPES, TINY

from hf_slimmoe.cli import main
from hf_slimmoe.compression.resume import is_finished_stage

BUILDS = {
    "qwen3_moe": ({"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 64,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                   "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 128},
                  {"moe_intermediate_size": 16, "num_key_value_heads": 1}, "Qwen3MoeForCausalLM",
                  "moe_intermediate_size"),
    "mixtral": ({"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                 "num_experts_per_tok": 2, "max_position_embeddings": 128},
                {"expert_width": 16, "num_key_value_heads": 1}, "MixtralForCausalLM", "intermediate_size"),
}

STOCK_LOAD = r"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
for directory in sys.argv[1:]:
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), (directory, info)
    ids = AutoTokenizer.from_pretrained(directory)("import json", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    print(type(model).__name__)
assert "hf_slimmoe" not in sys.modules
"""


def recipe_for(model_type: str, output_dir) -> dict:
    config, target, _, _ = BUILDS[model_type]
    values = copy.deepcopy(TINY)
    values.update(name=f"test-{model_type}", output_dir=str(output_dir))
    values["teacher"]["build"].update(config=config, pretrain_steps=20)
    values["stages"].update(target=target, budget={"steps": [4, 4]})
    values["early_stopping"]["enabled"] = False
    values["data"].update(train_blocks=64, eval_blocks=8)  # what 2 x 4 steps use; the teacher cache stays small
    values["prune"] = {"streaming": model_type == "mixtral"}  # the Mixtral stages are cut on disk (streaming surgery)
    return values


def test_two_stage_compression_of_a_qwen3_moe_and_a_mixtral_teacher(tmp_path, capsys):
    finals = []
    for model_type, (_, _, architecture, width_field) in BUILDS.items():
        out = tmp_path / model_type
        recipe = tmp_path / f"{model_type}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for(model_type, out)))
        assert main(["plan", str(recipe)]) == 0
        plan = capsys.readouterr().out
        assert "64" in plan and "32" in plan and "16" in plan and "4/2" in plan and "2/1" in plan  # 64 -> 32 -> 16
        assert main(["compress", str(recipe), "--log-level", "WARNING"]) == 0
        capsys.readouterr()  # the Trainer's evaluation logs
        for stage, width in ((1, 32), (2, 16)):
            stage_dir = out / f"stage-{stage}"
            assert is_finished_stage(stage_dir)
            config = json.loads((stage_dir / "config.json").read_text())
            assert config["model_type"] == model_type and config["architectures"] == [architecture]
            assert config[width_field] == width and config["head_dim"] == 8
            info = json.loads((stage_dir / "stage.json").read_text())
            assert info["teacher_config"]["intermediate_size"] == 64  # the teacher's expert width
            assert "mixture-of-experts" in (stage_dir / "README.md").read_text()
        assert main(["info", str(out / "stage-2"), "--json"]) == 0
        described = json.loads(capsys.readouterr().out)
        assert described["model_type"] == model_type and described["intermediate_size"] == 16
        assert described["num_parameters"] == described["stored_parameters"]
        finals += [str(out / "stage-1"), str(out / "stage-2")]
    result = subprocess.run([sys.executable, "-c", STOCK_LOAD, *finals], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["Qwen3MoeForCausalLM"] * 2 + ["MixtralForCausalLM"] * 2


# Published sizes (model cards / papers), in billions: total, and active with the embedding table (we count it as
# active, as the SlimMoE paper does; OpenAI and DeepSeek publish active counts without it).
PUBLISHED = {
    "qwen3-30b-a3b.yaml": ("qwen3_moe", 30.5, 3.35, 0.0),  # "30.5B in total and 3.3B activated"
    "mixtral-8x7b.yaml": ("mixtral", 46.7, 12.9, 0.0),
    "olmoe-1b-7b.yaml": ("olmoe", 6.9, 1.3, 0.0),  # 6.9B total, 1.3B active
    "gpt-oss-20b.yaml": ("gpt_oss", 20.9, 3.6, 201088 * 2880 / 1e9),  # 20.91B total, 3.61B active w/o embeddings
    "deepseek-v2-lite.yaml": ("deepseek_v2", 15.7, 2.4, 102400 * 2048 / 1e9),  # 15.7B total, 2.4B active
}


def test_real_recipes_plan_without_downloading_and_match_published_sizes(capsys):
    from hf_slimmoe import count_parameters
    from hf_slimmoe.compression.recipe import load_recipe

    for name, (model_type, total, active, embedding) in PUBLISHED.items():
        recipe = load_recipe(os.path.join(RECIPES, name))
        teacher = recipe.teacher_config()
        assert teacher.model_type == model_type
        counted_total, counted_active = count_parameters(teacher)
        assert round(counted_total / 1e9, 1) == total, name
        assert abs(counted_active / 1e9 - embedding - active) < 0.06, (name, counted_active)
        stages = recipe.stage_configs(teacher)
        assert len(stages) == 2 and count_parameters(stages[-1])[0] < counted_total / 2
        assert main(["plan", os.path.join(RECIPES, name)]) == 0
        assert f"total parameters: {total}B -> " in capsys.readouterr().out


# Flagship recipes: the sizes `slimmoe plan` prints (teacher total, teacher active, final total; billions) and the
# published total / active. A published total may count what transformers does not build (multi-token-prediction
# layers, Llama-4's vision encoder); a published active count leaves out the embedding table and lm_head (which we
# count) and is rounded ("A3B").
FLAGSHIPS = {
    "qwen3-next-80b-a3b.yaml": ("qwen3_next", (79.7, 3.9, 21.6), (80, 3)),  # "80B in total and 3B activated"
    "glm-4.6.yaml": ("glm4_moe", (352.8, 33.6, 121.2), (355, 32)),  # GLM-4.5 report: 355B total, 32B activated
    "deepseek-v3.2.yaml": ("deepseek_v32", (671.9, 38.4, 179.5), (671, 37)),  # DeepSeek-V3: 671B, 37B activated
    "minimax-m2.yaml": ("minimax_m2", (228.7, 11.0, 78.9), (230, 10)),  # 230B total, 10B active
    "llama-4-scout.yaml": ("llama4_text", (107.8, 17.2, 29.3), (109, 17)),  # 109B with the vision encoder, 17B active
    "gpt-oss-120b.yaml": ("gpt_oss", (116.8, 5.7, 47.5), (116.83, 5.13)),  # 116.83B, 5.13B active w/o embeddings
}


def test_flagship_recipes_plan_without_downloading_in_multiples_of_128(capsys):
    """Every stage's expert width is a multiple of 128 (block-FP8 and FlashInfer MoE kernels), and the counted sizes
    are the published ones up to what transformers does not build and the embedding tables."""
    from hf_slimmoe import count_parameters
    from hf_slimmoe.architectures import get_architecture
    from hf_slimmoe.compression.recipe import load_recipe

    for name, (model_type, (total, active, final), (published_total, published_active)) in FLAGSHIPS.items():
        recipe = load_recipe(os.path.join(RECIPES, name))
        teacher = recipe.teacher_config()
        assert teacher.model_type == model_type
        counted_total, counted_active = (n / 1e9 for n in count_parameters(teacher))
        assert (round(counted_total, 1), round(counted_active, 1)) == (total, active), name
        assert abs(counted_total / published_total - 1) < 0.03, name
        embeddings = 2 * teacher.vocab_size * teacher.hidden_size / 1e9  # embedding table and lm_head
        assert 0 <= counted_active - published_active <= embeddings + 0.5, name
        stages = recipe.stage_configs(teacher)
        arch = get_architecture(teacher)
        assert len(stages) == 2 and all(arch.expert_width_of(c) % 128 == 0 for c in stages), name
        assert all(arch.shared_width_of(c) is None or arch.shared_width_of(c) % 128 == 0 for c in stages), name
        assert round(count_parameters(stages[-1])[0] / 1e9, 1) == final, name
        assert main(["plan", os.path.join(RECIPES, name)]) == 0
        assert f"total parameters: {total}B -> " in capsys.readouterr().out


def test_mixtral_recipe_is_the_rebuttal_setting():
    """20% of the MoE parameters and 50% of the attention parameters of Mixtral-8x7B are kept."""
    from hf_slimmoe.architectures import get_architecture
    from hf_slimmoe.architectures.accounting import parameter_groups
    from hf_slimmoe.compression.recipe import load_recipe

    recipe = load_recipe(os.path.join(RECIPES, "mixtral-8x7b.yaml"))
    teacher = recipe.teacher_config()
    target = recipe.stage_configs(teacher)[-1]
    arch = get_architecture(teacher)
    before, after = parameter_groups(arch, teacher), parameter_groups(arch, target)
    assert round(after["experts"] / before["experts"], 2) == 0.20
    assert after["attention"] / before["attention"] == 0.5


def test_iterative_baseline_on_a_qwen3_moe_teacher(tmp_path):
    """`method: iterative` on another family than PhiMoE: the masks grow on the full-size Qwen3-MoE while it distills,
    and the one stage is pruned physically to the target, a stock checkpoint of the family."""
    from hf_slimmoe.compression.loop import compress
    from hf_slimmoe.compression.recipe import recipe_from_dict

    values = recipe_for("qwen3_moe", tmp_path / "out")
    values.update(method="iterative", iterative={"mask_every_steps": 2, "target_fraction": None})
    compress(recipe_from_dict(values))
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("stage-")) == ["stage-1"]
    config = json.loads((tmp_path / "out" / "stage-1" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["moe_intermediate_size"], config["num_key_value_heads"]) == (16, 1)
    info = json.loads((tmp_path / "out" / "stage-1" / "stage.json").read_text())
    assert info["method"] == "iterative" and info["training"]["steps"] == 8  # the multi-stage total, 4 + 4
