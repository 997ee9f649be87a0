"""The training engine: torch, never Ray (a lint rule keeps it out: rayscale/engine/ruff.toml).

loop.py is one rank's training, driven through a context (context.py: Ray Train's in launch/, an in-process one
here); step.py is one optimizer step; components/ are the features that hook the loop; strategies/ are how the
workers' gradients become one update; state.py holds the typed payload and training state, checkpoint.py their
files.
"""
