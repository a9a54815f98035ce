#!/usr/bin/env bash
# Create .venv (once) and install the project with the pinned stack from constraints.txt.
# torch==2.13.0 resolves to the CPU wheel placed on these machines; elsewhere point pip at
# PyTorch's CPU wheel index (PIP_EXTRA_INDEX_URL) so no CUDA wheels are pulled on a CPU host.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.gckd-installed
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing gckd-ray and its pinned stack into .venv (about 2 minutes the first time)"
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
  .venv/bin/pip check
  echo "$want" > "$stamp"
fi
