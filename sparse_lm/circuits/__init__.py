"""Circuits (docs/method.md §5): prune a model to the smallest set of nodes that still performs a task, count its edges.

- nodes.py:   the node space (one node per channel of every prunable site) and mean-ablating forward passes
- pruning.py: site means, task loss, straight-through mask training, bisection, logit calibration
- edges.py:   nonzero weights joining kept nodes, with explicit conventions
- draw.py:    PNG and self-contained HTML pictures of a circuit
"""
