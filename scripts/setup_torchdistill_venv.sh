#!/usr/bin/env bash
# Create .venv-torchdistill: the same torch/torchvision as .venv, protege (editable) and
# torchdistill (benchmarks/torchdistill-requirements.txt), for benchmarks/vs_torchdistill.py.
#
#   bash scripts/setup_torchdistill_venv.sh          # PY=python3.11 to choose the interpreter
#
# torch is pinned to the version .venv has (read from its metadata, without importing it), or
# to TORCH_VERSION/TORCHVISION_VERSION if set, so pip takes the same wheel. On the project's
# machines pip is configured with local wheel indexes (`pip config list`: extra-index-url
# file:///opt/pypi/simple file:///opt/pypi-more/simple) that hold torch 2.14.1 and
# torchvision 0.29.1 for Python 3.11; pip ranks those file:// candidates first, so nothing
# huge is downloaded (only small packages such as cuda-bindings and torchdistill come from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
VENV=.venv-torchdistill

version_in_venv() {  # version of package $1 in .venv, or nothing
  [ -x .venv/bin/python ] || return 0
  .venv/bin/python - "$1" <<'PYEOF' 2>/dev/null || true
import importlib.metadata as m, sys
print(m.version(sys.argv[1]))
PYEOF
}

TORCH_VERSION=${TORCH_VERSION:-$(version_in_venv torch)}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-$(version_in_venv torchvision)}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION into $VENV"
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
# protege and torchdistill, with torch held at the version just installed
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$constraints"
"$VENV/bin/python" -m pip install -q -c "$constraints" -e . -r benchmarks/torchdistill-requirements.txt
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as m

import torch
import torchdistill  # noqa: F401

import protege  # noqa: F401

print(f"{m.version('torch')=} {m.version('torchvision')=} {m.version('torchdistill')=} {torch.get_num_threads()=}")
PYEOF
echo "ready: $VENV/bin/python benchmarks/vs_torchdistill.py --quick"
