"""Per-method heads: tiny Triton functions on the per-row sums (docs/methods.md §3, step 2)."""
