"""Algorithm recipes: advantages (per group) and per-token losses, as plain torch functions."""
