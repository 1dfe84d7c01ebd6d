#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs into .venv, lints, tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source hack/venv.sh agent,operator,test,bench,deploy
ruff check amp4ec tests hack
ruff format --check amp4ec tests hack
lint-imports --no-cache
# Two workers, one test file each at a time (a file's module fixtures, e.g. an emulated cluster,
# stay in one process); AMP4EC_TEST_WORKERS=0 runs everything in this process.
python -m pytest -n "${AMP4EC_TEST_WORKERS:-2}" --dist loadfile "$@"
