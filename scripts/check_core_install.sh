#!/usr/bin/env bash
# distiq's core install (pip install distiq, no extras) runs the main job. Builds a second venv
# with distiq alone (build/core-venv, kept for the next run; DISTIQ_CORE_VENV moves it), checks
# that it holds no optional backend, then runs `import distiq, distiq.demo`, `distiq --help` and
# scripts/core_install_smoke.py (the whole demo at a few steps per run: data-parallel teacher,
# forked runs, PyTorch-only benchmark, packed export, report). Prints the seconds of each part.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DISTIQ_CORE_VENV:-build/core-venv}
python=${PYTHON:-python3}
# the optional packages (pyproject.toml extras) that a core install must not have
optional="onnx onnxruntime onnxscript onnxruntime_genai bitsandbytes peft tensorboard
  compressed_tensors gguf datasets playwright pytest"

started=$SECONDS
install() {
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  # --no-compile: no bytecode for every file installed (Python compiles what it imports)
  local pip=("$venv/bin/python" -m pip --disable-pip-version-check -q install --no-compile)
  # torch first, pinned: otherwise the resolver may take a CUDA build (scripts/setup.sh)
  "${pip[@]}" -c constraints.txt "torch==2.13.0"
  "${pip[@]}" -c constraints.txt -e .
}
found_optional() {
  "$venv/bin/python" -c 'import importlib.util, sys
print(" ".join(n for n in sys.argv[1:] if importlib.util.find_spec(n)))' $optional
}
install
extra=$(found_optional)
if [[ -n "$extra" ]]; then  # something was installed into it by hand: start again
  echo "note: $venv holds optional packages ($extra); rebuilding it" >&2
  rm -rf "$venv"
  install
  extra=$(found_optional)
  [[ -z "$extra" ]] || { echo "error: a core install pulled in $extra" >&2; exit 1; }
fi
echo "core install: venv ready in $((SECONDS - started)) s"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the bytecode of what the demo imports, kept in the venv for the next run (pip wrote none)
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="$venv/pycache"
started=$SECONDS
"$venv/bin/python" -c "import distiq, distiq.demo"
"$venv/bin/distiq" --help >/dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
log="$out/smoke.log"
if ! "$venv/bin/python" scripts/core_install_smoke.py "$out/smoke" >"$log" 2>&1; then
  cat "$log" >&2
  echo "error: the core install's demo failed (log above)" >&2
  exit 1
fi
tail -n 1 "$log"
echo "core install: import, --help and the demo in $((SECONDS - started)) s"
