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
# DeepSpeed JIT-compiles its CPU shared-memory collective op whenever a process group starts
# and finds no cached build (54 s of CPU time; 4 min 56 s wall while a training run shared the
# 2 cores); build it here so the first training run and the first test that starts DeepSpeed
# do not pay for it.
ops="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
if ! compgen -G "$ops/*/deepspeed_shm_comm/deepspeed_shm_comm.so" > /dev/null; then
  echo "building DeepSpeed's CPU communication op once (about a minute of CPU time)"
  .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null
fi
