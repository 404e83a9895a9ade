"""Start-up time of `slimmoe --help` and `import hf_slimmoe`: this tree against a baseline revision, in the same run.

The baseline (default: the last commit before the lazy package import, `ca55f7f`) is extracted with `git archive` into
a temporary directory; both trees run through the same interpreter and the installed `slimmoe` console script, with
`PYTHONPATH` pointing at one tree or the other. Each command runs `--rounds` times, interleaved between the trees, and
the median wall time is reported, with `python -X importtime`'s count of imported modules and the heavy packages
that ended up in `sys.modules`.

    python benchmarks/bench_startup.py [--baseline ca55f7f] [--rounds 7] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "matplotlib")
COMMANDS = {
    "`slimmoe --help`": [shutil.which("slimmoe") or "slimmoe", "--help"],
    "`python -c 'import hf_slimmoe'`": [sys.executable, "-c", "import hf_slimmoe"],
}


def extract(revision: str, directory: str) -> str:
    """The `hf_slimmoe/` package of `revision`, extracted under `directory`."""
    archive = os.path.join(directory, "tree.tar")
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", ROOT, "archive", revision, "hf_slimmoe"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    return directory


# An empty working directory: `python -c` puts the current directory first on sys.path, ahead of PYTHONPATH.
NEUTRAL_CWD = tempfile.mkdtemp(prefix="bench-startup-")


def wall_time(command: list[str], tree: str) -> float:
    env = {**os.environ, "PYTHONPATH": tree}
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=NEUTRAL_CWD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def import_profile(tree: str) -> tuple[int, float, list[str]]:
    """`import hf_slimmoe` as `python -X importtime` sees it: (modules imported, its cumulative seconds, heavy
    packages among the modules)."""
    code = f"import sys, hf_slimmoe; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env={**os.environ, "PYTHONPATH": tree},
                            cwd=NEUTRAL_CWD, capture_output=True, text=True, check=True)
    lines = [line.split("|") for line in result.stderr.splitlines() if line.startswith("import time:")][1:]
    cumulative = next(int(fields[1]) for fields in lines if fields[2].strip() == "hf_slimmoe") / 1e6
    return len(lines), cumulative, [m for m in result.stdout.strip().split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="ca55f7f", help="git revision to compare against (default: ca55f7f)")
    parser.add_argument("--rounds", type=int, default=7, help="runs per command and tree (default: 7)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        trees = {f"baseline `{args.baseline}`": extract(args.baseline, tmp), "this tree": ROOT}
        for tree in trees.values():  # each tree imports its own package
            code = "import hf_slimmoe; print(hf_slimmoe.__file__)"
            found = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": tree},
                                   cwd=NEUTRAL_CWD, capture_output=True, text=True, check=True).stdout
            assert found.startswith(tree), (tree, found)
        times = {(label, tree): [] for label in COMMANDS for tree in trees}
        for _ in range(args.rounds):  # interleaved, so load changes hit both trees alike
            for label, command in COMMANDS.items():
                for tree, path in trees.items():
                    times[label, tree].append(wall_time(command, path))
        profiles = {tree: import_profile(path) for tree, path in trees.items()}

    base, new = list(trees)
    rows = [f"| command | {base} | {new} | ratio |", "|---|---:|---:|---:|"]
    for label in COMMANDS:
        before, after = statistics.median(times[label, base]), statistics.median(times[label, new])
        rows.append(f"| {label} | {before:.2f} s | {after:.2f} s | {after / before:.2f}x |")
    rows.append(f"| `-X importtime`: cumulative time of `hf_slimmoe` | {profiles[base][1]:.2f} s | "
                f"{profiles[new][1]:.2f} s | {profiles[new][1] / profiles[base][1]:.3f}x |")
    rows.append(f"| `-X importtime`: modules imported | {profiles[base][0]} | {profiles[new][0]} | |")
    heavy = [", ".join(profiles[tree][2]) or "none" for tree in (base, new)]
    rows.append(f"| heavy packages in `sys.modules` after `import hf_slimmoe` | {heavy[0]} | {heavy[1]} | |")
    help_time = statistics.median(times["`slimmoe --help`", new])
    load = os.getloadavg()[0]
    markdown = "\n".join([
        "## Start-up: `slimmoe --help` and `import hf_slimmoe` (`benchmarks/bench_startup.py`)",
        "",
        f"Median wall time of {args.rounds} interleaved runs per command and tree; Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPU cores, load average {load:.1f} at the end. "
        "Command: `python benchmarks/bench_startup.py`.",
        "",
        *rows,
        "",
        f"Goal (`slimmoe --help` <= 1.5 s): **{'met' if help_time <= 1.5 else 'not met'}** ({help_time:.2f} s). "
        "The package's public names load from their submodules on first use, and the Auto-class registration of "
        "\"slimmoe\" waits for transformers' Auto modules (`hf_slimmoe/model/registration.py`), so neither command "
        "imports torch or transformers; a command that runs imports what it needs.",
    ])
    print(markdown)
    if not args.no_write:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from results import write_section

        write_section("bench_startup", markdown)
        print("updated benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
