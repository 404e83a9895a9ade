"""Write one benchmark's section of `benchmarks/RESULTS.md`, leaving the other benchmarks' sections as they are."""

from __future__ import annotations

import os
import re

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(name: str, markdown: str, path: str = RESULTS) -> None:
    """Replace (or append) the block between `<!-- {name}:start -->` and `<!-- {name}:end -->` in RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nFigures measured on this repository's " \
        "CI machine class (2 CPU cores) unless a section says otherwise; every figure is a ratio against a baseline " \
        "measured in the same run.\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
