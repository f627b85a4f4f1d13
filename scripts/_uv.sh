# Sourced by scripts/*: make `uv` available (installing it with pip if missing) and sync.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if command -v uv >/dev/null 2>&1; then
  UV=(uv)
else
  if ! python3 -m uv --version >/dev/null 2>&1; then
    echo "uv not found: installing it with 'python3 -m pip install uv'" >&2
    python3 -m pip install --quiet uv >&2
  fi
  UV=(python3 -m uv)
fi
"${UV[@]}" sync --all-extras --locked --quiet
