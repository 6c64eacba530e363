"""rlhfkit.core must stay importable without the heavy stack (STYLE.md §5)."""

import ast
import os
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parents[2] / "rlhfkit" / "core"
ALLOWED = {"torch", "math", "dataclasses", "typing", "__future__"}


def test_core_modules_import_only_torch_and_stdlib_basics():
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 7
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}  # relative imports stay in core
            else:
                continue
            assert roots <= ALLOWED, f"{path.name} imports {roots - ALLOWED}"


def test_importing_core_does_not_pull_heavy_packages():
    # a fresh interpreter, so other tests' imports cannot mask a leak
    code = (
        "import sys, rlhfkit.core\n"
        "heavy = [m for m in ('transformers', 'deepspeed', 'ray', 'vllm') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    root = str(CORE.parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    leaked = [m for m in out.stdout.strip().split(",") if m]
    assert leaked == [], f"importing rlhfkit.core imported {leaked}"
