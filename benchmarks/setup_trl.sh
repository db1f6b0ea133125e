#!/usr/bin/env bash
# Install TRL in its own virtual environment for the tether-vs-TRL benchmark (benchmarks/trl_grpo.py).
#
#     bash benchmarks/setup_trl.sh            # creates benchmarks/.venv-trl (override: TRL_VENV=/path)
#
# Kept apart from the project's .venv so that TRL's dependencies never leak into tether's environment.
# torch is pinned to exactly 2.13.0: on this machine that resolves to the CPU wheel on local disk; any other
# torch spec would download a multi-GB CUDA build. transformers and peft are pinned to the versions in the
# project's .venv (when it exists; else 5.24.0 and 0.21.2) so that both sides run the same model and LoRA
# code. TRL 1.16.0 (it requires transformers>=4.56.2) resolves and runs with transformers 5.23-5.24; `pip
# check` below verifies the set. Another TRL: TRL_VERSION=1.13.0 bash benchmarks/setup_trl.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${TRL_VENV:-$HERE/.venv-trl}"
PY="${PYTHON:-python3}"
TRL_VERSION="${TRL_VERSION:-1.16.0}"
PROJECT_PY="$HERE/../.venv/bin/python"
project_version() {  # the version of package $1 in the project's venv, else $2
    if [ -x "$PROJECT_PY" ]; then
        "$PROJECT_PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"
    else
        echo "$2"
    fi
}
TRANSFORMERS_VERSION="$(project_version transformers 5.24.0)"
PEFT_VERSION="$(project_version peft 0.21.2)"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade --quiet pip
"$VENV/bin/python" -m pip install \
    "torch==2.13.0" \
    "transformers==${TRANSFORMERS_VERSION}" \
    "peft==${PEFT_VERSION}" \
    "trl==${TRL_VERSION}"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'EOF'
import peft, torch, transformers, trl
print(f"TRL venv ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"trl {trl.__version__}")
EOF
echo "python: $VENV/bin/python"
