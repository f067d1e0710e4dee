#!/usr/bin/env bash
# The whole test suite, on a fresh machine or an installed one: installs what is missing, then runs pytest.
# Integration tests build real namespaces, so run as root (sudo ./run-tests.sh); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./install.sh --test
exec .venv/bin/python -m pytest "$@"
