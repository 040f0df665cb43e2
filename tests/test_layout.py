"""Dependencies run one way: kernels/ is a library that knows nothing of sparse_lm, and runtime code never imports
a benchmark (sparse_lm/bench/)."""

import ast
import os
import subprocess
import sys

from tests.conftest import REPO


def imported_modules(path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_kernels_import_every_module_with_sparse_lm_unimportable():
    code = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['sparse_lm'] = None  # any import of it now raises\n"
        "import kernels\n"
        "names = [m.name for m in pkgutil.iter_modules(kernels.__path__)]\n"
        "for name in names:\n"
        "    importlib.import_module('kernels.' + name)\n"
        "print(sorted(names))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"abstopk", "compress", "crossover", "linear", "select", "spmm"} <= set(eval(proc.stdout))
    for path in (REPO / "kernels").glob("*.py"):  # lazy imports inside functions too
        assert not [m for m in imported_modules(path) if m.split(".")[0] == "sparse_lm"], path


def test_runtime_code_never_imports_a_benchmark():
    runtime = [p for p in (REPO / "sparse_lm").rglob("*.py") if "bench" not in p.relative_to(REPO / "sparse_lm").parts]
    runtime += list((REPO / "kernels").glob("*.py")) + [REPO / "train.py"]
    assert len(runtime) > 20
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.startswith(("sparse_lm.bench", "kernels.bench")))
                 for p in runtime}
    assert {p: m for p, m in offenders.items() if m} == {}
    # The check can fail: the benchmarks themselves do import the runtime.
    assert "sparse_lm.trainer" in imported_modules(REPO / "sparse_lm" / "bench" / "train.py")
