#!/usr/bin/env bash
# The benchmark environment: bench/.venv, a virtual environment layered on the project's .venv (a .pth file puts
# the main venv's site-packages, torch, transformers and the editable rlhfkit included, on its path) plus the `bench` extra, trl==1.16.0,
# installed into bench/.venv only. The main venv is never modified and the package never depends on TRL.
#   bash bench/setup_env.sh            # then: bench/.venv/bin/python bench/suite.py
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=${MAIN_VENV:-.venv}
PY="$MAIN/bin/python"
[ -x "$PY" ] || { echo "no $PY: create the project venv first (see README)" >&2; exit 1; }
BASE=$("$PY" -c "import sys; print(sys._base_executable)")
MAIN_SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ -x bench/.venv/bin/python ] || "$BASE" -m venv bench/.venv
SITE=$(bench/.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir (not a bare path) so the main venv's own .pth files run too (the editable rlhfkit install)
echo "import site; site.addsitedir('$MAIN_SITE')" > "$SITE/_rlhfkit_main_venv.pth"
# trl's own requirements (accelerate, datasets, transformers, ...) are met by the main venv; pip installs only
# what is missing, into bench/.venv
bench/.venv/bin/pip install --quiet "trl==1.16.0"
bench/.venv/bin/python -c "import trl, torch, transformers, rlhfkit; print('bench/.venv: trl', trl.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__)"
