"""Per-method heads: tiny Triton functions on the per-row sums (spec §3, step 2)."""
