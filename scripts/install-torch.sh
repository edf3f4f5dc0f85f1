#!/usr/bin/env bash
# Install the pinned torch into the given Python, CPU-only on a machine without an NVIDIA GPU.
#
# - No NVIDIA GPU and the PyTorch CPU index reachable: the CPU wheel from download.pytorch.org/whl/cpu
#   (about 200 MB on Linux; nothing from NVIDIA).
# - No NVIDIA GPU and only the standard index reachable: torch from PyPI. On Linux x86-64 that is the
#   CUDA build (about 900 MB plus about 2.5 GB of nvidia-* packages); it runs fine on the CPU. On macOS
#   and Windows the PyPI wheel is CPU-only anyway.
# - An NVIDIA GPU (nvidia-smi works): torch from the standard index, with CUDA.
# Either way a wheel already on this machine (a pip cache, a local wheel folder in pip's config) is used.
set -euo pipefail
PY=${1:?usage: install-torch.sh PYTHON}
VERSION=${TORCH_VERSION:-2.13.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu

if "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$VERSION' else 1)" 2>/dev/null; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing torch==$VERSION with CUDA from the standard index."
  exec "$PY" -m pip install -q "torch==$VERSION"
fi
if "$PY" - "$CPU_INDEX" <<'PYCODE' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)
PYCODE
then
  echo "No NVIDIA GPU: installing the CPU-only torch==$VERSION from $CPU_INDEX."
  exec "$PY" -m pip install -q "torch==$VERSION" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
fi
echo "No NVIDIA GPU, and $CPU_INDEX is not reachable: installing torch==$VERSION from the standard index"
echo "(or a wheel pip is configured to find locally; from PyPI on Linux x86-64 that is the CUDA build, several GB)."
exec "$PY" -m pip install -q "torch==$VERSION"
