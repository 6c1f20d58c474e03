#!/usr/bin/env bash
# Creates .venv (if missing) and installs distiq into it, offline-friendly and CPU-only.
#   bash scripts/setup.sh          # the library, the CLI and every optional backend
#   bash scripts/setup.sh --dev    # ... plus the test and lint tools
# torch is installed first and pinned (constraints.txt): otherwise packages that depend on it
# pull a multi-GB CUDA build instead of the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="all"
[[ "${1:-}" == "--dev" ]] && extras="all,dev"
python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c constraints.txt "torch==2.13.0"
"${pip[@]}" install -c constraints.txt -e ".[${extras}]"
echo "distiq installed in .venv (extras: ${extras})"
