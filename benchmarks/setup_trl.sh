#!/usr/bin/env bash
# Install TRL in its own virtual environment for the tether-vs-TRL benchmark (benchmarks/trl_grpo.py).
#
#     bash benchmarks/setup_trl.sh            # creates benchmarks/.venv-trl (override: TRL_VENV=/path)
#
# Kept apart from the project's .venv so that TRL's dependencies never leak into tether's environment.
# torch is pinned to exactly 2.13.0: on this machine that resolves to the CPU wheel on local disk; any other
# torch spec would download a multi-GB CUDA build. transformers is pinned to the project's version (5.23.0)
# so that both sides run the same model code. TRL 1.16.0 (the newest 1.x release on PyPI when written; it
# requires transformers>=4.56.2) resolves and runs with transformers 5.23.0; `pip check` below verifies the
# set. 1.13.0 (on this machine's local mirror) works too: TRL_VERSION=1.13.0 bash benchmarks/setup_trl.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${TRL_VENV:-$HERE/.venv-trl}"
PY="${PYTHON:-python3}"
TRL_VERSION="${TRL_VERSION:-1.16.0}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade --quiet pip
"$VENV/bin/python" -m pip install \
    "torch==2.13.0" \
    "transformers==5.23.0" \
    "trl==${TRL_VERSION}"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'EOF'
import torch, transformers, trl
print(f"TRL venv ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
EOF
echo "python: $VENV/bin/python"
