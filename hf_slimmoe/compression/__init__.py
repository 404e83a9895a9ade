"""The procedures: `slimmoe compress` as the paper's loop and what it is made of.

- `recipe`: the recipe schema (plain dataclasses and YAML, no torch) and its validation; `sources`: its data.
- `plan`: the checks of `--dry-run`, the stage table, the training arguments of a stage.
- `loop`: `compress`, the paper's loop read top to bottom; `run`: what the stages share; `stage`: one stage, one
  method per step; `resume`: the run's files and how a killed run finds its place again.
- `teacher` (building and locating the teacher), `provenance` (what an output directory records and the check before
  it is reused), `trajectory` (the points and their logging callback), `evaluation` (`slimmoe eval`), `demo`.

Its modules are imported by path: this package re-exports nothing, so importing the recipe schema loads neither torch
nor transformers.
"""
