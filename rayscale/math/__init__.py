"""Pure math: the batch plan, schedules, the noise scale, goodput, adaptive batch decisions, the curriculum.
Numbers in, numbers out: no torch, no Ray (a lint rule keeps them out: rayscale/math/ruff.toml)."""
