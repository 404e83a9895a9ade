"""The model: `SlimMoeConfig` / `SlimMoeForCausalLM` (PhiMoE as one family among the others, with the promised methods
`slimmed`, `num_parameters`, `prune_to`, `save_stock` as thin calls into `architectures` and `pruning`) and their
registration with transformers' Auto classes (`registration`, run by `import hf_slimmoe`). Its modules are imported by
path (the public names are re-exported lazily by `hf_slimmoe` itself); this package re-exports nothing.
"""
