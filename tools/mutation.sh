#!/usr/bin/env bash
# Mutation pass over the pure cores (mai/core) with mutmut 3; outside CI (mutmut is not a test extra).
#
# Why: a test suite that passes says nothing until it is shown to fail when the code is wrong. mutmut changes one
# thing at a time in mai/core (an operator, a constant, a condition) and runs the tests that reach the changed
# function; a mutant that no test notices ("survived") marks behaviour nothing checks. Score and survivors are
# recorded in docs/testing.md, "Mutation testing".
#
# Configuration is setup.cfg's [mutmut] section: mutate mai/core/* only, run tests/unit and tests/property (the
# fast pure-core tests; never system, contract or bench tests). One worker, lowest priority: the machine is shared.
#
# Usage (from the repository root):
#   .venv/bin/pip install 'mutmut>=3.8,<4'
#   tools/mutation.sh                         # every mutant of mai/core
#   tools/mutation.sh 'mai.core.plan*'        # one module (mutant names are globs: mai.core.<module>.<function>...)
#   tools/mutation.sh --results               # survivors of the last run;  .venv/bin/mutmut show <name>  shows one
# Output: mutants/ (the mutated copy, results in mutants/**/*.meta); delete it to start afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
MUTMUT=.venv/bin/mutmut
if [[ ! -x $MUTMUT ]]; then
    echo "mutmut is not installed in .venv: .venv/bin/pip install 'mutmut>=3.8,<4'" >&2
    exit 2
fi
if [[ ${1:-} == --results ]]; then
    exec "$MUTMUT" results
fi
exec nice -n 19 "$MUTMUT" run --max-children 1 "$@"
