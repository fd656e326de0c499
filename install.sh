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
# The native extension (csrc/) is compiled by torch.utils.cpp_extension, which needs ninja
# and a C++ compiler; without them kvmem runs its Python versions of the same operations.
if ! command -v ninja >/dev/null 2>&1 && [ ! -x .venv/bin/ninja ]; then
  .venv/bin/pip install -q ninja || echo "ninja not installed: kvmem will use its Python paths"
fi
if [ "${KVMEM_NATIVE:-1}" != "0" ]; then
  .venv/bin/python -c "import kvmem.native as n; print('kvmem native path:', n.status())" || true
fi
echo "kvmem installed in .venv: activate with '. .venv/bin/activate'"
