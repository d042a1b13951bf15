#!/usr/bin/env bash
# The project's checks, as the README shows them: make sure the dev environment is there (quick when it is),
# lint, then pytest. Arguments go to pytest:  bash scripts/test.sh -k memory_bank -x
# The environment is $NTT_VENV (default .venv in the repository), made by scripts/setup.sh --dev.
set -euo pipefail
{ # read whole before running, so editing this file (or a git pull) mid-run cannot derail it

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${NTT_VENV:-$REPO/.venv}

bash "$REPO/scripts/setup.sh" --dev --venv "$VENV"
cd "$REPO"
setup_s=$SECONDS

sources=()
for path in ntt_core ntt_plugin tests benchmarks scripts; do
    [ -e "$path" ] && sources+=("$path")
done
lint=0
echo "[test] ruff check ${sources[*]}"
"$VENV/bin/ruff" check --output-format concise "${sources[@]}" || lint=1
echo "[test] ruff format --check ${sources[*]}"
"$VENV/bin/ruff" format --check "${sources[@]}" || lint=1

lint_s=$((SECONDS - setup_s))

echo "[test] python -m pytest $*"
status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
echo "[test] timings: setup ${setup_s} s, lint ${lint_s} s, pytest $((SECONDS - setup_s - lint_s)) s"
if [ "$status" -eq 5 ]; then
    echo "[test] pytest collected no tests: that is a failure" >&2
    exit 1
fi
if [ "$status" -eq 0 ] && [ "$lint" -ne 0 ]; then
    echo "[test] the tests passed but ruff found problems (above): failing" >&2
    exit 1
fi
exit "$status"
exit
}
