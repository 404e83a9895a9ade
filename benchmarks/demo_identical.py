"""Does a restructuring keep behaviour? `slimmoe demo --fast` (or `--full`: the whole demo) at two commits, every saved
tensor compared.

Each commit is checked out into a temporary git worktree and runs the demo in its own output directory with one torch
thread (the demo teacher comes from the shared cache, `~/.cache/hf_slimmoe`, when its settings are unchanged). Then
every `*.safetensors` file of one output directory is compared tensor by tensor with the same file of the other, and
the demo's summary tables are compared as text, all but their two speed columns.

    python benchmarks/demo_identical.py BASE_COMMIT              # BASE_COMMIT against HEAD
    python benchmarks/demo_identical.py BASE_COMMIT OTHER_COMMIT
    python benchmarks/demo_identical.py BASE_COMMIT --full   # the full demo: its summary table and every model

Exit status 0 when every tensor is identical (bit for bit) and the tables are the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(commit: str, work: str, full: bool = False) -> tuple[str, str]:
    """The demo's output directory and its summary table without the speed columns, at `commit`."""
    tree, out = os.path.join(work, f"tree-{commit}"), os.path.join(work, f"demo-{commit}")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", tree, commit], check=True,
                   capture_output=True)
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    try:
        result = subprocess.run([sys.executable, "-m", "hf_slimmoe.cli", "demo", out, *([] if full else ["--fast"]),
                                 "--threads", "1"],
                                cwd=tree, env=env, capture_output=True, text=True)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"demo at {commit} failed:\n{result.stderr[-3000:]}")
    rows = [line.strip().strip("|").split("|") for line in result.stdout.splitlines() if line.lstrip().startswith("|")]
    return out, "\n".join("|".join(cells[:-2]) for cells in rows)  # the last two columns are speeds


def compare(a: str, b: str) -> list[str]:
    """Differences between the safetensors files of two output directories (empty: identical)."""
    import torch
    from safetensors.torch import load_file

    def files(root):
        return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
                if n.endswith(".safetensors") and "checkpoint-" not in d}

    left, right = files(a), files(b)
    problems = [f"only in one run: {name}" for name in sorted(left ^ right)]
    for name in sorted(left & right):
        x, y = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        if x.keys() != y.keys():
            problems.append(f"{name}: different tensor names")
            continue
        problems += [f"{name}:{key}: max |diff| {(x[key].double() - y[key].double()).abs().max().item():.3g}"
                     for key in sorted(x) if not torch.equal(x[key], y[key])]
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the commit before the restructuring")
    parser.add_argument("other", nargs="?", default="HEAD", help="the commit after it (default: HEAD)")
    parser.add_argument("--full", action="store_true", help="the full demo instead of --fast (minutes per commit)")
    args = parser.parse_args()
    commits = [subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", c], check=True, capture_output=True,
                              text=True).stdout.strip() for c in (args.base, args.other)]
    with tempfile.TemporaryDirectory(prefix="demo-identical-") as work:
        (a, table_a), (b, table_b) = (run_demo(c, work, args.full) for c in commits)
        count = sum(1 for d, _, names in os.walk(a) for n in names if n.endswith(".safetensors")
                    and "checkpoint-" not in d)
        problems = compare(a, b)
        if table_a != table_b:
            problems.append(f"the summary tables differ:\n{table_a}\n---\n{table_b}")
    print(f"{commits[0]} vs {commits[1]}: {count} safetensors files, "
          + ("every tensor identical, same summary" if not problems else f"{len(problems)} difference(s)"))
    for problem in problems[:40]:
        print("  " + problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
