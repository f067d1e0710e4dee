#!/usr/bin/env bash
# The whole test suite, on a fresh machine or an installed one: as root it first installs whatever is
# missing (install.sh --test), then runs pytest; extra arguments go to pytest. Integration tests build
# real namespaces and need root: without it they are skipped with the reason (under CI=true, failed).
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" -eq 0 ]; then
  ./install.sh --test
elif [ ! -x .venv/bin/python ]; then
  echo "run-tests.sh: the first run must be as root (it installs packages): sudo ./run-tests.sh" >&2
  exit 3
fi
exec .venv/bin/python -m pytest "$@"
