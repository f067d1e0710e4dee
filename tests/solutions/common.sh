# Shared by the reference solutions: `lab` as a learner types it, bound to one lab.
# Usage in a solution: . "$(dirname "$0")/common.sh" "$@"   (argument: LAB, the running lab's name)
# Answers go to answers.yaml in the exercise folder the lab was built from, where `lab grade` reads them.
set -euo pipefail
LAB_NAME=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${KUBENET_PYTHON:-$REPO/.venv/bin/python}

status_json() {
    (cd "$REPO" && "$PYTHON" -m lab.cli status "$LAB_NAME" --json)
}

EXERCISE=$(status_json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["exercise"] or "")')
[ -n "$EXERCISE" ] || { echo "lab $LAB_NAME was not built from an exercise folder" >&2; exit 2; }
ANSWERS=$EXERCISE/answers.yaml

lab() {
    local cmd=$1
    shift
    (cd "$REPO" && "$PYTHON" -m lab.cli "$cmd" --lab "$LAB_NAME" "$@")
}

answer() {  # answer KEY VALUE: add a line to the exercise's answers.yaml
    printf '%s: "%s"\n' "$1" "$2" >>"$ANSWERS"
}
