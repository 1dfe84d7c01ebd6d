#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs into .venv, lints, tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source hack/venv.sh agent,operator,test,bench,deploy
ruff check amp4ec tests hack
ruff format --check amp4ec tests hack
lint-imports --no-cache
python -m pytest "$@"
