#!/usr/bin/env bash
# Sets up .venv with the dev tools, then runs lint, the layer contract and the test suite, and
# (for the whole suite) checks that a core install runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev

# The report's browser test drives Debian's Chromium (tests/report/test_report_browser.py).
# Installed once when missing, as root through apt (about 2 minutes); elsewhere that test skips.
if ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    apt_log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >"$apt_log" 2>&1; then
      cat "$apt_log" >&2
      echo "error: installing chromium with apt failed (log above)" >&2
      exit 1
    fi
    rm -f "$apt_log"
  else
    echo "note: chromium is not installed, so the report's browser test is skipped" \
      "(install it with: apt-get install chromium)" >&2
  fi
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/lint-imports
# two worker processes (pytest-xdist): the tests are mostly single-threaded Python, so two
# processes keep both cores busy; DISTIQ_TEST_WORKERS=0 runs them in this one
.venv/bin/python -m pytest -n "${DISTIQ_TEST_WORKERS:-2}" "$@"

# The main job on a core install (no extras): a second venv and a few-step demo in it
# (scripts/check_core_install.sh), with the whole suite only (no pytest arguments given).
if [[ $# -eq 0 ]]; then
  bash scripts/check_core_install.sh
fi
