#!/usr/bin/env bash
# One-shot GPU benchmark suite (bench/gpu_suite.py): one markdown table and one JSON line, under 8 minutes.
# On the lent GPU machine, from the repository root:
#     pip install --no-deps --no-build-isolation -e . && bash bench/gpu_suite.sh
# (offline, add --no-build-isolation to pip, or pip tries to fetch setuptools; the suite also runs from the
# checkout without installing). Arguments pass through: bash bench/gpu_suite.sh --batch 128 --out suite.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
fi
exec "$PY" bench/gpu_suite.py "$@"
