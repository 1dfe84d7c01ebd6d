#!/usr/bin/env bash
# Create (or reuse) .venv and install amp4ec with the given extras into it.
# Usage: source hack/venv.sh EXTRAS   (e.g. "agent" or "agent,test")
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${1:-agent}
venv=${AMP4EC_VENV:-$root/.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv (first run: installs CPU torch and the stack, about 1.2 GB)" >&2
  python3 -m venv "$venv"
fi
stamp="$venv/.amp4ec-installed-$(echo "$extras" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[$extras]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
