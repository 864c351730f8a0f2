#!/usr/bin/env bash
# Create .venv-trl: the same torch / transformers / accelerate as .venv, protege (editable, with its
# llm extra) and TRL (benchmarks/trl-requirements.txt), for benchmarks/vs_trl.py.
#
#   bash scripts/setup_trl_venv.sh          # PY=python3.11 to choose the interpreter
#
# Every package .venv already has that TRL also uses (torch, transformers, accelerate, datasets,
# tokenizers, safetensors) is pinned to .venv's version (read from its metadata, without importing
# it), so the two sides of the benchmark differ only by the framework. torch comes from the local
# wheel indexes pip is configured with on the project's machines (see setup_torchdistill_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
VENV=.venv-trl
SHARED="torch transformers accelerate datasets tokenizers safetensors"

version_in_venv() {  # version of package $1 in .venv, or nothing
  [ -x .venv/bin/python ] || return 0
  .venv/bin/python - "$1" <<'PYEOF' 2>/dev/null || true
import importlib.metadata as m, sys
print(m.version(sys.argv[1]))
PYEOF
}

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
for package in $SHARED; do
  version=$(version_in_venv "$package")
  if [ -n "$version" ]; then
    printf '%s==%s\n' "$package" "$version" >>"$constraints"
  fi
done
grep -q '^torch==' "$constraints" || echo 'torch==2.14.1' >>"$constraints"
echo "pinned from .venv:"; sed 's/^/  /' "$constraints"

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c "$constraints" "$(grep '^torch==' "$constraints")"
"$VENV/bin/python" -m pip install -q -c "$constraints" -e '.[llm]' -r benchmarks/trl-requirements.txt
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as m

import torch
import transformers  # noqa: F401
from trl.experimental.gkd import GKDTrainer  # noqa: F401

import protege  # noqa: F401

print({p: m.version(p) for p in ("torch", "transformers", "accelerate", "trl")}, f"{torch.get_num_threads()=}")
PYEOF
echo "ready: $VENV/bin/python benchmarks/vs_trl.py --quick"
