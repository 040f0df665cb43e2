"""The capability–interpretability frontier (docs/frontier.md): a sweep of training runs, their circuits, one table
and one picture. `python -m sparse_lm.frontier frontier=cpu` (the entry point: __main__.py; the stages: sweep.py)."""
