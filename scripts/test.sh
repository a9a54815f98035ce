#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, slow multi-process tests included; extra
# arguments go to pytest. Then run the fast numeric tests again on ATen's portable kernels
# (ATEN_CPU_CAPABILITY=default instead of this CPU's AVX2/AVX512 ones), so every run also
# checks that their tolerances hold on another kernel path. Fails if either pass fails; exit
# code 5 (no tests collected) is a failure, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1

NUMERIC=(tests/model/test_losses.py tests/model/test_cmkd.py tests/model/test_graph.py
         tests/model/test_centring.py tests/model/test_momentum.py tests/model/test_mnf_csc.py
         tests/model/test_precision.py tests/test_evaluate.py)

run_pytest() {  # pytest's exit status, 5 (nothing collected) turned into 1
  .venv/bin/python -m pytest "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    return 1
  fi
  return "$rc"
}

run_pytest --durations=25 "$@"
suite=$?
echo "== numeric tests again with ATEN_CPU_CAPABILITY=default =="
ATEN_CPU_CAPABILITY=default run_pytest -m "not slow" "${NUMERIC[@]}"
numeric=$?
if [ "$suite" -ne 0 ]; then
  exit "$suite"
fi
exit "$numeric"
