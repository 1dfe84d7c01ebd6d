#!/usr/bin/env bash
# Create (or reuse) .venv and install amp4ec with the given extras into it.
# Usage: source hack/venv.sh EXTRAS   (e.g. "agent" or "agent,test")
#
# torch comes from torch's CPU wheel index when it answers within a few seconds: on an
# ordinary x86-64 machine PyPI's default torch is the multi-GB CUDA build, which edge nodes
# never use. Where that index cannot be reached, the configured index (PyPI) is used, and
# this script says so.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${1:-agent}
venv=${AMP4EC_VENV:-$root/.venv}
cpu_index=${AMP4EC_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
torch_pin=$(grep -o '"torch==[^"]*"' "$root/pyproject.toml" | tr -d '"')
say() { echo "amp4ec setup: $*" >&2; }

fresh=0
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv (first run: CPU torch and the stack, about 1.2 GB)"
  python3 -m venv "$venv"
  fresh=1
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
stamp="$venv/.amp4ec-installed-$(echo "$extras" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  if [[ ",$extras," == *",agent,"* ]] && ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    if "$venv/bin/python" - "$cpu_index" <<'EOF'; then
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)
except Exception:
    sys.exit(1)
EOF
      say "installing $torch_pin from torch's CPU wheel index ($cpu_index)"
      "${pip[@]}" install --progress-bar on --index-url "$cpu_index" "$torch_pin"
    else
      say "torch's CPU wheel index ($cpu_index) did not answer in 5 s;"
      say "installing $torch_pin from the configured index instead (on x86-64 PyPI serves the CUDA build)"
      "${pip[@]}" install --progress-bar on "$torch_pin"
    fi
  fi
  say "installing amp4ec[$extras] into $venv"
  "${pip[@]}" install --quiet -e "$root[$extras]"
  touch "$stamp"
fi
if [ "$fresh" = 1 ]; then
  say "done. To call amp4ec directly: source $venv/bin/activate"
fi
export PATH="$venv/bin:$PATH"
