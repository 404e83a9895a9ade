"""The `slimmoe` command. One sub-command per step of the method; `slimmoe COMMAND --help` documents each.

Each sub-command is a pair: `_add_<command>(subparsers)` declares its arguments, `_run_<command>(args)` runs it.
Library code logs through `logging`; this module sets logging up and prints results for people.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

logger = logging.getLogger("hf_slimmoe")


def _human(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# ----------------------------------------------------------------------------------------------------- info
def _add_info(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="print the architecture and total/active parameter counts of a checkpoint or config.json",
        description="Print the architecture and the analytic total/active parameter counts of a PhiMoE or SlimMoE "
        "checkpoint directory or config.json (nothing is loaded but the config and the safetensors headers). "
        "Without PATH, builds a tiny SlimMoE model in-process, saves it to a temporary directory and reports on it.",
    )
    p.add_argument("path", nargs="?", help="checkpoint directory or config.json (default: a tiny in-process model)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")


def _tiny_checkpoint(directory: str) -> str:
    import torch

    from . import SlimMoeConfig, SlimMoeForCausalLM

    torch.manual_seed(0)
    config = SlimMoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                           attention_bias=True, lm_head_bias=True, max_position_embeddings=256)
    SlimMoeForCausalLM(config).save_pretrained(directory)
    return directory


def _checkpoint_tensor_count(directory: str) -> int | None:
    """Parameters stored in a directory's safetensors files, read from their headers only."""
    from safetensors import safe_open

    files = [f for f in sorted(os.listdir(directory))  # the weights, not a stage's scores.safetensors
             if f.endswith(".safetensors") and f.startswith("model")]
    if not files:
        return None
    total = 0
    for name in files:
        with safe_open(os.path.join(directory, name), "pt") as f:
            for key in f.keys():
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                total += numel
    return total


def describe(path: str) -> dict:
    """Architecture and parameter counts of a checkpoint directory or a config.json of any supported family, as a
    dict (`intermediate_size` / `num_local_experts`: the routed experts' width and count, whatever the family calls
    them)."""
    from .architectures import SUPPORTED_MODEL_TYPES, config_from_dict, count_parameters, get_architecture

    config_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No config.json at {path}: pass a checkpoint directory or a config.json file.")
    with open(config_file) as f:
        values = json.load(f)
    model_type = values.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{config_file} has model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    config = config_from_dict(values)
    arch = get_architecture(config)
    total, active = count_parameters(config)
    info = {
        "path": path,
        "model_type": model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_local_experts": arch.num_experts_of(config),
        "num_experts_per_tok": arch.top_k_of(config),
        "intermediate_size": arch.expert_width_of(config),
        "shared_expert_width": arch.shared_width_of(config),
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": arch.head_dim_of(config),
        "vocab_size": config.vocab_size,
        "num_parameters": total,
        "num_active_parameters": active,
    }
    if os.path.isdir(path):
        info["stored_parameters"] = _checkpoint_tensor_count(path)
    return info


def _run_info(args) -> int:
    if args.path is None:
        directory = tempfile.mkdtemp(prefix="slimmoe-tiny-")
        logger.info("No PATH given: building a tiny SlimMoE model in %s", directory)
        args.path = _tiny_checkpoint(directory)
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("checkpoint", info["path"]),
        ("model_type", info["model_type"]),
        ("layers", info["num_hidden_layers"]),
        ("hidden size", info["hidden_size"]),
        ("experts", f"{info['num_local_experts']} (top-{info['num_experts_per_tok']})"),
        ("d_expert", info["intermediate_size"]),
        *([("d_shared (shared experts)", info["shared_expert_width"])] if info["shared_expert_width"] else []),
        ("heads q/kv", f"{info['num_attention_heads']}/{info['num_key_value_heads']} (head_dim {info['head_dim']})"),
        ("vocab", info["vocab_size"]),
        ("total parameters", f"{info['num_parameters']:,} ({_human(info['num_parameters'])})"),
        ("active parameters", f"{info['num_active_parameters']:,} ({_human(info['num_active_parameters'])})"),
    ]
    if info.get("stored_parameters") is not None:
        rows.append(("stored in safetensors", f"{info['stored_parameters']:,}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


# ----------------------------------------------------------------------------------------------------- export
def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a stock model_type: phimoe checkpoint that plain transformers loads without this plugin",
        description="Load a SlimMoE (or PhiMoE) checkpoint and save it as a stock PhiMoE checkpoint "
        "(config.json with model_type phimoe and an explicit head_dim; safetensors in the per-expert key layout), "
        "with its tokenizer and generation config, loadable by AutoModelForCausalLM with no remote code.",
    )
    p.add_argument("model", help="SlimMoE or PhiMoE checkpoint directory")
    p.add_argument("output_dir", help="directory to write the stock checkpoint to")


def _run_export(args) -> int:
    from transformers import AutoTokenizer

    from .modeling_slimmoe import SlimMoeForCausalLM

    model = SlimMoeForCausalLM.from_pretrained(args.model)
    model.export_phimoe(args.output_dir)
    try:
        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.output_dir)
    except (OSError, ValueError):
        logger.warning("No tokenizer found in %s; exported the model only.", args.model)
    print(f"exported {args.model} -> {args.output_dir} (model_type phimoe)")
    return 0


# ----------------------------------------------------------------------------------------------------- score
def _add_score(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="compute KD (or CLM) sensitivity scores of every expert neuron and GQA group; write a safetensors file",
        description="Compute SlimMoE sensitivity scores (|grad * W|, Eq. 2-4) of a checkpoint on calibration data "
        "and save them (safetensors) for `slimmoe prune`. The KD criterion uses the teacher's top-k distribution; "
        "without --teacher the model is its own teacher (stage 1). Calibration data: a `save_to_disk` dataset "
        "directory with input_ids (cached teacher_topk_* columns are used instead of a teacher forward), or a "
        ".txt/.jsonl file tokenized with the model directory's tokenizer.",
    )
    p.add_argument("model", help="SlimMoE or PhiMoE checkpoint directory to score")
    p.add_argument("--data", required=True, help="dataset directory (input_ids) or .txt/.jsonl calibration file")
    p.add_argument("--output", required=True, help="scores file to write, e.g. scores.safetensors")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (default: the model itself)")
    p.add_argument("--criterion", choices=("kd", "clm"), default="kd", help="kd (paper, default) or clm (ablation)")
    p.add_argument("--top-k", type=int, default=8, help="teacher probabilities kept by the KD loss (default 8)")
    p.add_argument("--aux-loss-coef", type=float, default=None,
                   help="weight of the load-balancing loss (default: the model's router_aux_loss_coef)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per calibration example (default 512)")
    p.add_argument("--num-examples", type=int, default=None, help="use the first N examples (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per forward/backward (default 4)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for text data (default: the model directory)")
    p.add_argument("--text-column", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype to load the model(s) in (default: as stored)")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")


def _run_score(args) -> int:
    import torch

    from .architectures import load_model
    from .pruning import compute_sensitivity
    from .pruning.calibration import load_calibration_batches

    batches = load_calibration_batches(args.data, args.tokenizer or args.model, max_length=args.max_length,
                                       num_examples=args.num_examples, batch_size=args.batch_size,
                                       text_column=args.text_column)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype).to(device)  # any supported family
    teacher = None
    if args.teacher is not None and args.criterion == "kd":
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype).to(device)
    scores = compute_sensitivity(model, batches, teacher=teacher, criterion=args.criterion, top_k=args.top_k,
                                 aux_loss_coef=args.aux_loss_coef)
    scores.metadata["model"] = args.model
    scores.metadata["teacher"] = args.teacher or "self"
    scores.save(args.output)
    print(f"scored {scores.num_layers} layers on {scores.metadata['num_tokens']} tokens -> {args.output}")
    return 0


# ----------------------------------------------------------------------------------------------------- prune
def _add_prune(subparsers) -> None:
    p = subparsers.add_parser(
        "prune",
        help="slim experts and drop GQA groups by sensitivity scores; save a model that loads with from_pretrained",
        description="Prune a checkpoint with scores from `slimmoe score`: every expert keeps its highest-scoring "
        "--intermediate-size neurons, every layer its highest-scoring --num-key-value-heads GQA groups (with their "
        "query heads). Writes a complete model directory (weights, config, generation config, tokenizer).",
    )
    p.add_argument("model", help="checkpoint directory of any supported MoE family (SlimMoE, PhiMoE, Mixtral, ...)")
    p.add_argument("--scores", required=True, help="scores file written by `slimmoe score`")
    p.add_argument("--output-dir", required=True, help="directory to write the pruned model to")
    p.add_argument("--intermediate-size", type=int, default=None,
                   help="new routed-expert width, whatever the family calls it (default: unchanged)")
    p.add_argument("--num-key-value-heads", type=int, default=None,
                   help="GQA groups to keep; query heads follow (default: unchanged)")
    p.add_argument("--shared-expert-width", type=int, default=None,
                   help="new shared-expert width (Qwen2-MoE, DeepSeek; default: the family's rule, see slim_config)")


def _run_prune(args) -> int:
    import shutil

    from transformers import AutoTokenizer

    from .architectures import count_parameters, get_architecture, load_model, slim_config
    from .pruning import SensitivityScores, prune_to

    scores = SensitivityScores.load(args.scores)  # fail on a missing/bad file before loading the model
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir} exists and is not empty; choose a new directory.")
    model = load_model(args.model, dtype="auto")
    before = count_parameters(model.config)[0]
    target = slim_config(model.config, expert_width=args.intermediate_size,
                         num_key_value_heads=args.num_key_value_heads, shared_expert_width=args.shared_expert_width)
    prune_to(model, target, scores)
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".prune-", dir=parent)  # complete, then renamed: never half-written
    try:
        model.save_pretrained(staging)
        try:
            AutoTokenizer.from_pretrained(args.model).save_pretrained(staging)
        except (OSError, ValueError):
            logger.warning("No tokenizer found in %s; saved the model only.", args.model)
        if os.path.isdir(args.output_dir):
            os.rmdir(args.output_dir)
        os.replace(staging, args.output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    after = count_parameters(model.config)[0]
    width = get_architecture(model).expert_width_of(model.config)
    print(f"pruned {args.model} -> {args.output_dir}: intermediate_size {width}, heads "
          f"{model.config.num_attention_heads}/{model.config.num_key_value_heads}, parameters {_human(before)} -> "
          f"{_human(after)}")
    return 0


# --------------------------------------------------------------------------------------------- cache-teacher
def _add_cache_teacher(subparsers) -> None:
    p = subparsers.add_parser(
        "cache-teacher",
        help="run the teacher once over a dataset and store its top-k ids/log-probs per token (resumable)",
        description="Run the teacher once over DATA and save DATA plus the columns teacher_topk_ids (int32), "
        "teacher_topk_logprobs (log-probs relative to the full vocabulary) and teacher_topk_fingerprint (a digest "
        "of each row's input_ids) to OUTPUT with `datasets.save_to_disk`. Every distillation stage then trains "
        "without a teacher forward. Interrupted runs continue from OUTPUT.partial/ when re-run. DATA: a "
        "save_to_disk directory with input_ids (or a text column), or a .jsonl/.txt file tokenized with the "
        "teacher's tokenizer.",
    )
    p.add_argument("teacher", help="teacher checkpoint directory (PhiMoE or SlimMoE)")
    p.add_argument("data", help="dataset directory or .jsonl/.txt file")
    p.add_argument("output", help="directory to write the cached dataset to")
    p.add_argument("--top-k", type=int, default=8, help="teacher tokens kept per position (default: 8)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per teacher forward (default: 8)")
    p.add_argument("--shard-size", type=int, default=512, help="rows per resumable shard (default: 512)")
    p.add_argument("--max-length", type=int, default=512, help="tokens kept per example of text data")
    p.add_argument("--text-column", default="text", help="text field of .jsonl files / text datasets")
    p.add_argument("--tokenizer", help="tokenizer directory for text data (default: the teacher directory)")
    p.add_argument("--device", help="device of the teacher (default: cuda if available, else cpu)")


def _run_cache_teacher(args) -> int:
    from transformers import AutoModelForCausalLM

    from .distillation import cache_teacher_topk
    from .distillation.run import _maybe_tokenizer, load_token_dataset

    tokenizer = _maybe_tokenizer(args.tokenizer or args.teacher)
    dataset = load_token_dataset(args.data, tokenizer, args.text_column, args.max_length)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).to(device)
    pad_token_id = getattr(tokenizer, "pad_token_id", None) or 0
    cached = cache_teacher_topk(teacher, dataset, top_k=args.top_k, batch_size=args.batch_size,
                                output_dir=args.output, shard_size=args.shard_size, pad_token_id=pad_token_id)
    print(f"cached teacher top-{args.top_k} for {len(cached)} rows -> {args.output}")
    return 0


# --------------------------------------------------------------------------------------------------- distill
def _distill_dataclasses():
    from .distillation import DistillationConfig
    from .distillation.run import DistillScriptArguments

    return DistillScriptArguments, DistillationConfig


def _add_distill(subparsers) -> None:
    from transformers import HfArgumentParser

    p = subparsers.add_parser(
        "distill",
        help="distill a student checkpoint from a teacher (online or cached) with top-k KD + MoE aux loss",
        description="Distill --student on --dataset with top-k KD from the teacher (--teacher_model_name_or_path, "
        "or the teacher cache columns of `slimmoe cache-teacher` in the dataset) plus the MoE load-balancing "
        "loss, and save the result to --output_dir. Every field of DistillationConfig (transformers' "
        "TrainingArguments plus top_k, temperature, renormalize, aux_loss_coef, ce_weight, kd_chunk_size) is a "
        "flag; --config FILE.yaml sets any of them, and flags given on the command line override the file. "
        "Runs unchanged under `torchrun` / `accelerate launch`.",
    )
    p.add_argument("--config", help="YAML file of flag values (keys are the flag names without --)")
    for action in HfArgumentParser(_distill_dataclasses())._actions:
        if action.dest in ("help", "log_level"):  # -h is the sub-parser's; --log-level is every command's
            continue
        action.default = argparse.SUPPRESS  # only flags given on the command line override the YAML file
        action.required = False
        p._add_action(action)


def _run_distill(args) -> int:
    import yaml
    from transformers import HfArgumentParser

    values = {}
    if args.config is not None:
        if not os.path.isfile(args.config):
            raise FileNotFoundError(f"No config file at {args.config}.")
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config} must hold a mapping of flag names to values.")
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config", "log_level")})
    from .distillation.run import run_distill

    script_args, config = HfArgumentParser(_distill_dataclasses()).parse_dict(values)
    metrics = run_distill(script_args, config)
    if metrics and config.process_index == 0:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------------- card
def _add_card(subparsers) -> None:
    p = subparsers.add_parser(
        "card",
        help="(re)generate the model card README.md and trajectory.png of a saved model directory",
        description="Write README.md (model card: metadata, architecture against the teacher, lineage, training, "
        "evaluation, usage, citation) and trajectory.png into STAGE_DIR from its stage.json, trajectory.json and "
        "config.json, without training. Works on stage-N/ directories and on SFT / DPO / LoRA outputs.",
    )
    p.add_argument("stage_dir", help="a saved model directory holding stage.json (e.g. OUTPUT_DIR/stage-2)")
    p.add_argument("--repo-id", default=None, help="Hub id to show in the usage snippets (default: the directory)")
    p.add_argument("--template", default=None, help="a Jinja card template (default: the packaged one)")


def _run_card(args) -> int:
    from .hub import write_model_card

    path = write_model_card(args.stage_dir, repo_id=args.repo_id, template_path=args.template)
    print(path)
    return 0


# ----------------------------------------------------------------------------------------------------- push
def _add_push(subparsers) -> None:
    p = subparsers.add_parser(
        "push",
        help="publish the complete stages of an output directory to the Hub (what is missing or changed)",
        description="Push every complete OUTPUT_DIR/stage-N/ to the Hub as the `hub:` section of "
        "OUTPUT_DIR/recipe.yaml says (repo per stage or branch per stage, private or public), regenerating each card with its Hub id. "
        "Unchanged stages make no new commit, so re-running after a failed push publishes only what is missing. "
        "The token comes from HF_TOKEN or `hf auth login`; the endpoint from HF_ENDPOINT. Exit status 1 if any "
        "push failed.",
    )
    p.add_argument("output_dir", help="output directory of `slimmoe compress` (holds recipe.yaml and stage-N/)")
    p.add_argument("--stage", type=int, default=None, help="push only this stage")
    p.add_argument("--repo-id", default=None, help="override hub.repo_id of the recipe")
    p.add_argument("--layout", choices=["repo-per-stage", "branch-per-stage"], default=None,
                   help="override hub.layout of the recipe")
    p.add_argument("--private", action="store_true", default=None, help="create the repositories private")


def _run_push(args) -> int:
    import dataclasses

    from .hub import HubSettings, is_complete_stage, publish_stage, read_hub_settings, stage_dirs

    settings = read_hub_settings(args.output_dir)
    overrides = {k: v for k, v in (("repo_id", args.repo_id), ("layout", args.layout), ("private", args.private))
                 if v is not None}
    settings = HubSettings(**{**dataclasses.asdict(settings), **overrides})
    if not settings.repo_id:
        raise ValueError(f"No hub.repo_id in {os.path.join(args.output_dir, 'recipe.yaml')}: set it there or pass "
                         "--repo-id, e.g. '{user}/phi-tiny-moe-stage{stage}'.")
    dirs = stage_dirs(args.output_dir)
    if args.stage is not None:
        dirs = [d for d in dirs if d.name == f"stage-{args.stage}"]
        if not dirs:
            raise FileNotFoundError(f"No stage-{args.stage}/ in {args.output_dir}.")
    pushed, skipped, failed = [], [], []
    for stage_dir in dirs:
        if not is_complete_stage(stage_dir):
            skipped.append(stage_dir.name)
            logger.info("Skipping %s: not a complete stage (no stage.json, config.json or weights yet).", stage_dir)
            continue
        (pushed if publish_stage(stage_dir, settings) else failed).append(stage_dir.name)
    print(f"pushed (or already up to date): {', '.join(pushed) or 'none'}")
    print(f"skipped (incomplete): {', '.join(skipped) or 'none'}")
    print(f"failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------- plan
def _add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="print the stage table of a recipe, or of a teacher config and a target (nothing is downloaded)",
        description="Print the multi-stage plan: per stage d_expert, heads q/kv, total and active parameters, % of "
        "the teacher, and the training budget. With RECIPE.yaml the numbers come from the recipe (teacher.architecture "
        "or teacher.build); otherwise give --teacher (a checkpoint directory or config.json) and the target sizes.",
    )
    p.add_argument("recipe", nargs="?", help="a compression recipe YAML (e.g. recipes/phi-tiny-moe.yaml)")
    p.add_argument("--teacher", help="checkpoint directory or config.json of the model to compress (without RECIPE)")
    p.add_argument("--intermediate-size", type=int,
                   help="target routed-expert width d_expert, whatever the family calls it (without RECIPE)")
    p.add_argument("--num-key-value-heads", type=int, help="target number of GQA groups (without RECIPE)")
    p.add_argument("--num-stages", type=int, default=2, help="number of stages T (without RECIPE; default 2)")
    p.add_argument("--expert-multiple", type=int, default=64,
                   help="round intermediate expert widths to a multiple of this (without RECIPE; default 64)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def _run_plan(args) -> int:
    from .architectures import config_from_dict, slim_config
    from .schedule import format_plan, plan_rows, plan_stages

    if args.recipe:
        from .pipeline import plan_text
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe)
        if args.json:
            from .pipeline import read_teacher_config

            teacher = recipe.teacher_config() or read_teacher_config(recipe)
            print(json.dumps(plan_rows(teacher, recipe.stage_configs(teacher)), indent=2))
        else:
            print(plan_text(recipe))
        return 0
    if not args.teacher:
        raise ValueError("give RECIPE.yaml, or --teacher with --intermediate-size and/or --num-key-value-heads.")
    describe(args.teacher)  # names a missing file or an unsupported family
    config_file = os.path.join(args.teacher, "config.json") if os.path.isdir(args.teacher) else args.teacher
    with open(config_file) as f:
        teacher = config_from_dict(json.load(f))
    target = slim_config(teacher, expert_width=args.intermediate_size, num_key_value_heads=args.num_key_value_heads)
    stages = plan_stages(teacher, target, args.num_stages, expert_multiple=args.expert_multiple)
    print(json.dumps(plan_rows(teacher, stages), indent=2) if args.json else format_plan(teacher, stages))
    return 0


# ----------------------------------------------------------------------------------------------------- compress
def _add_compress(subparsers) -> None:
    p = subparsers.add_parser(
        "compress",
        help="run a compression recipe: score -> prune -> distill -> save -> card -> push, stage by stage",
        description="Run a SlimMoE compression recipe (see recipes/). Every finished stage is saved to "
        "OUTPUT_DIR/stage-i/ as a Hub-ready model; re-running the same command after an interruption continues from "
        "the last finished stage and the latest checkpoint of the running one. Under `accelerate launch` it trains "
        "on all processes.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything (files, sizes, vocabulary, training arguments) and print the plan; no compute")
    p.add_argument("--output-dir", help="override the recipe's output_dir")


def _run_compress(args) -> int:
    from .pipeline import compress, plan_text
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    output_dir = compress(recipe, dry_run=args.dry_run)
    if args.dry_run:
        print(plan_text(recipe))
        print(f"{args.recipe}: OK (dry run; nothing computed). Output would go to {output_dir}")
    else:
        print(f"Compressed model stages are in {output_dir}")
    return 0


# ------------------------------------------------------------------------------------------- sft / lora / dpo
_POSTTRAIN_HELP = {
    "sft": "SFT with top-k distillation from an instruct teacher (TRL SFTTrainer + KD loss)",
    "lora": "LoRA fine-tuning (PEFT; optionally the fused expert parameters), adapter saved and merged",
    "dpo": "DPO on the SFT model (TRL DPOTrainer)",
}


def _add_posttrain(kind: str):
    def add(subparsers) -> None:
        p = subparsers.add_parser(
            kind,
            help=_POSTTRAIN_HELP[kind],
            description=f"{_POSTTRAIN_HELP[kind]}. RECIPE.yaml holds the fields of hf_slimmoe.posttrain."
            "PostTrainArguments and of the trainer config (SFTDistillationConfig, or trl.DPOConfig for dpo), plus an "
            "optional hub: section; any field can be overridden after it as --field value. "
            f"`slimmoe {kind} RECIPE.yaml --help` lists every field. Runs under `accelerate launch` unchanged.",
        )
        p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny-sft.yaml")
        p.add_argument("overrides", nargs=argparse.REMAINDER, help="--field value pairs overriding the recipe")

    return add


def _run_posttrain(kind: str):
    def run(args) -> int:
        from .posttrain import run_recipe

        output_dir = run_recipe(kind, args.recipe, args.overrides)
        print(f"{kind}: saved {output_dir}")
        return 0

    return run


# ----------------------------------------------------------------------------------------------------- demo
def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole method on the Python standard library: teacher, 2 stages, SFT, DPO, summary (~10 min CPU)",
        description="Train a byte-level BPE tokenizer and a small MoE teacher on this machine's Python standard "
        "library (train: the top-level modules; held-out: email/, http/, urllib/, xml/), cache the teacher's top-8, "
        "compress it in two stages, run SFT with KD and DPO, and write stage models, cards, trajectory.png and a "
        "summary table (parameters, held-out perplexity, KL to the teacher, speed) to OUTPUT_DIR. The trained "
        "teacher is cached ($HF_SLIMMOE_CACHE, default ~/.cache/hf_slimmoe) and re-running reuses finished steps. "
        "The numbers are in the packaged recipe hf_slimmoe/recipes/demo.yaml.",
    )
    p.add_argument("output_dir", nargs="?", help="output directory (default: outputs/demo, or outputs/demo-fast)")
    p.add_argument("--fast", action="store_true", help="a smaller run of about a minute (the CI smoke test)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, all cores); on a "
                   "machine shared with other jobs, --threads 1 avoids threads waiting on a busy core")


def _run_demo(args) -> int:
    import time

    from .demo import run_demo

    output_dir = args.output_dir or ("outputs/demo-fast" if args.fast else "outputs/demo")
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def banner(index: int, total: int, title: str) -> None:
        print(f"\n==== [{index}/{total}] {title}  ({time.perf_counter() - start:.0f}s) ====", flush=True)

    summary = run_demo(output_dir, fast=args.fast, on_step=banner)
    with open(os.path.join(output_dir, "summary.md"), encoding="utf-8") as f:
        print("\n" + f.read())
    print(f"demo finished in {time.perf_counter() - start:.0f}s; models, cards, trajectory.png and summary.md / "
          f"summary.json are in {summary['output_dir']}")
    return 0


# ----------------------------------------------------------------------------------------------------- eval
def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="held-out perplexity, KL to a teacher and top-1 agreement of a model (optionally lm-eval tasks)",
        description="Evaluate MODEL on held-out data: perplexity, and with --teacher (or a --data directory that "
        "carries a teacher top-k cache) the top-k KL to the teacher and top-1 agreement. Default data: the demo's "
        "held-out standard-library modules (email/, http/, urllib/, xml/), packed into --block-size blocks. "
        "--lm-eval-tasks runs lm-evaluation-harness tasks (pip install 'hf_slimmoe[eval]'); given alone, without "
        "--data or --teacher, only those tasks run.",
    )
    p.add_argument("model", help="model directory (SlimMoE or PhiMoE, with its tokenizer)")
    p.add_argument("--teacher", help="teacher directory for KL and top-1 agreement")
    p.add_argument("--data", help="a .txt/.py/.jsonl file, or a save_to_disk directory (input_ids or text, "
                   "optionally with a teacher cache); default: the held-out standard-library modules")
    p.add_argument("--top-k", type=int, default=8, help="teacher tokens kept for the KL (default: 8)")
    p.add_argument("--max-blocks", type=int, default=256, help="rows evaluated at most (default: 256)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per row of text data (default: 128)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward (default: 16)")
    p.add_argument("--text-column", default="text", help="text field of .jsonl files / text datasets")
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-eval task names or task YAML files/directories, "
                   "e.g. benchmarks/lm_eval_tasks (needs the `eval` extra)")
    p.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task at most")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of lines")


def _run_eval(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import evaluate_model, load_eval_data, run_lm_eval

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    teacher = None
    if args.teacher:
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).to(device)
    result = {"model": args.model, "teacher": args.teacher}
    if args.lm_eval_tasks is None or args.data or args.teacher:
        dataset = load_eval_data(tokenizer, args.data, block_size=args.block_size, max_blocks=args.max_blocks,
                                 text_column=args.text_column)
        result.update(evaluate_model(model, dataset, teacher=teacher, top_k=args.top_k, batch_size=args.batch_size,
                                     pad_token_id=tokenizer.pad_token_id), rows=len(dataset))
    if args.lm_eval_tasks:
        result["lm_eval"] = run_lm_eval(model, tokenizer, args.lm_eval_tasks.split(","), limit=args.lm_eval_limit,
                                        batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for key, value in result.items():
        if key == "lm_eval":
            for task, metrics in value.items():
                print(f"lm-eval {task}: " + ", ".join(f"{m} {v:.4f}" if isinstance(v, float) else f"{m} {v}"
                                                       for m, v in metrics.items()))
        elif value is not None:
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


# ----------------------------------------------------------------------------------------------------- main
COMMANDS = {
    "info": (_add_info, _run_info),
    "export": (_add_export, _run_export),
    "score": (_add_score, _run_score),
    "prune": (_add_prune, _run_prune),
    "cache-teacher": (_add_cache_teacher, _run_cache_teacher),
    "distill": (_add_distill, _run_distill),
    "sft": (_add_posttrain("sft"), _run_posttrain("sft")),
    "lora": (_add_posttrain("lora"), _run_posttrain("lora")),
    "dpo": (_add_posttrain("dpo"), _run_posttrain("dpo")),
    "card": (_add_card, _run_card),
    "push": (_add_push, _run_push),
    "plan": (_add_plan, _run_plan),
    "compress": (_add_compress, _run_compress),
    "demo": (_add_demo, _run_demo),
    "eval": (_add_eval, _run_eval),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimmoe",
        description="SlimMoE: compress a Mixture-of-Experts LM by expert slimming and staged distillation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(subparsers)
    for sub in subparsers.choices.values():  # every command takes --log-level
        sub.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING, ERROR")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command][1](args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"slimmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
