"""Activation plateaus and sensitive directions (docs/plateaus.md): perturb a real or random activation at a named
site toward a target and record how the model's output moves. `python -m sparse_lm.plateaus` (entry: __main__.py)."""
