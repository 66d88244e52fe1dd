#!/usr/bin/env bash
# One-shot GPU benchmark suite (bench/gpu_suite.py): one markdown table and one JSON line, under 8 minutes.
# On the lent GPU machine, from the repository root:
#     bash bench/gpu_suite.sh
# Which Python runs it:
#   - a wheelhouse (bench/wheelhouse/, or $PARSIMONY_WHEELHOUSE; built beforehand by bench/wheelhouse.sh) on
#     a machine with torch and no registry: ${PYTHON:-python3}, the machine's own Python with its torch and
#     torchvision, with bench/gpu_suite_requirements.txt and this project installed from the wheelhouse alone
#     (pip --no-index, each package as pinned there, no dependency resolution against the index) into
#     $GPU_SUITE_SITE (default .gpu-suite-site) on its PYTHONPATH;
#   - else the project's .venv when there is one (make install), else ${PYTHON:-python3} as it is: a row
#     whose package is missing reads "skipped: <reason>".
# Arguments pass through: bash bench/gpu_suite.sh --batch 128 --out suite.json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
WHEELHOUSE="${PARSIMONY_WHEELHOUSE:-bench/wheelhouse}"
log() { echo "[gpu_suite] $*" >&2; }

if [ -d "$WHEELHOUSE" ]; then
  "$PY" -c "import torch, torchvision" 2>/dev/null || {
    log "$PY cannot import torch and torchvision: the wheelhouse does not carry them (set PYTHON to a Python that has them)"
    exit 2; }
  SITE="${GPU_SUITE_SITE:-.gpu-suite-site}"
  stamp="$(ls "$WHEELHOUSE" | sha1sum | cut -c1-16)"
  if [ "$(cat "$SITE/.wheelhouse" 2>/dev/null)" != "$stamp" ]; then
    log "installing from $WHEELHOUSE into $SITE (no index)"
    rm -rf "$SITE.tmp"
    # the requirements file is closed over DeepSpeed's own requirements: --no-deps leaves torch alone
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "$WHEELHOUSE" \
        --target "$SITE.tmp" -r bench/gpu_suite_requirements.txt "$WHEELHOUSE"/parsimony-*.whl
    echo "$stamp" >"$SITE.tmp/.wheelhouse"
    rm -rf "$SITE"; mv "$SITE.tmp" "$SITE"
  fi
  export PYTHONPATH="$(cd "$SITE" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import deepspeed, yaml, safetensors" || { log "$SITE does not give the suite what it imports"; exit 2; }
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi
exec "$PY" bench/gpu_suite.py "$@"
