"""Circuits (docs/method.md §5): prune a model to the smallest set of nodes that still performs a task, count its
edges, and test whether the number can be trusted.

- tasks.py:    the binary next-token tasks on Python code
- nodes.py:    the node space (one node per channel of every prunable site); ablated forward passes
               (mean, zero, resample; optionally with frozen norms)
- pruning.py:  site means, task loss, straight-through mask training, calibration, the Judge, bisection
- search.py:   one search: masks, bisection, necessity → a `Circuit`
- controls.py: random-init and redrawn-weight models, nonsense tasks
- battery.py:  a task's circuit, its checks, controls and variants → a `TaskResult` (trusted or not, and why)
- edges.py:    nonzero weights joining kept nodes, with explicit conventions
- report.py:   summary table, per-task files, pictures (draw.py), safe publication of an invocation's files
- prune.py:    one invocation of `python -m sparse_lm.prune` (sparse_lm/prune.py is its Hydra entry point)
"""
