"""Write stdlib_completion.jsonl: a multiple-choice next-line task over held-out Python standard-library modules.

Each example is four consecutive lines of code from the demo's held-out packages (email/, http/, urllib/, xml/; never
trained on by `slimmoe demo`) and four candidate next lines: the real one and three lines drawn from other places of
the same files. The model scores each candidate's log-likelihood after the context (lm-eval `multiple_choice`, `acc`).
Deterministic for a given Python version:

    python benchmarks/lm_eval_tasks/make_stdlib_completion.py [--num-examples 200]
"""

import argparse
import glob
import json
import os
import random
import sysconfig

HELD_OUT = ("email/**/*.py", "http/*.py", "urllib/*.py", "xml/**/*.py")


def _code_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.rstrip("\n") for line in f]
    return [line for line in lines if line.strip() and not line.strip().startswith("#")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "stdlib_completion.jsonl"))
    args = parser.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted({f for pattern in HELD_OUT for f in glob.glob(os.path.join(stdlib, pattern), recursive=True)})
    lines = [_code_lines(f) for f in files]
    pool = [(i, j) for i, file_lines in enumerate(lines) for j in range(4, len(file_lines))
            if 20 <= len(file_lines[j].strip()) <= 80]
    rng = random.Random(args.seed)
    examples = []
    for i, j in rng.sample(pool, args.num_examples):
        answer = lines[i][j]
        distractors = set()
        while len(distractors) < 3:
            a, b = rng.choice(pool)
            if lines[a][b] != answer:
                distractors.add(lines[a][b])
        choices = [answer, *sorted(distractors)]
        rng.shuffle(choices)
        examples.append({"context": "\n".join(lines[i][j - 4:j]) + "\n", "choices": choices,
                         "label": choices.index(answer), "source": os.path.relpath(files[i], stdlib)})
    with open(args.output, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    print(f"wrote {len(examples)} examples from {len(files)} held-out files to {args.output}")


if __name__ == "__main__":
    main()
