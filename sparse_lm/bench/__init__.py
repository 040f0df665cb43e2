"""Benchmarks, run as `python -m sparse_lm.bench mode=<ops|train|versus|profile>` (fields: BenchConfig in sparse_lm/config.py).

- ops:    each sparse op (SpMM, selection, AbsTopK) against its references on the same inputs (ops.py);
- train:  whole training steps, one run per `kernels` setting, in one process (train.py);
- versus: this checkout's training steps against another git revision's, alternating in one process (versus.py);
- profile: per-op CPU time of training steps, this checkout and optionally a revision (profile.py).

Nothing outside this package imports it: runtime code never depends on a benchmark.
"""
