#!/usr/bin/env bash
# The whole test suite: lint, format check, types, then every test (slow real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bin=.venv/bin
echo "==> ruff"
"$bin/ruff" check agent tui nanogpt tests bench
"$bin/ruff" format --check agent tui nanogpt tests bench
echo "==> mypy"
"$bin/mypy" agent tui nanogpt bench
echo "==> import contracts"
"$bin/lint-imports" --no-logo
echo "==> pytest"
"$bin/pytest" "$@"
