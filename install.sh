#!/usr/bin/env bash
# Creates .venv and installs kvmem with its test tools.
#
# If the python3 on PATH already imports torch (a CUDA build, say), the
# environment sees it (--system-site-packages) and keeps it. Otherwise the
# CPU build torch==2.13.0 is installed first, so that no dependency pulls the
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
EXTRAS=${KVMEM_EXTRAS:-dev,server}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[$EXTRAS]"
echo "kvmem installed in .venv: activate with '. .venv/bin/activate'"
