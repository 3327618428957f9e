"""How often the coordinator property test's cases contain a step failure and a CLIP yield (issue 12 asks for at
least a quarter of the cases each). Not a test (pytest does not collect it): run it after changing the state
machine's strategies or settings, and put the figures in docs/testing.md.

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.property.measure_coordinator_coverage [examples [seed]]

It runs `GateMachine` with the test's own settings (generation only: shrinking would count one failure many
times) and a fresh random seed, and counts per case: a step that came back StepFailed, a plan that moved CLIP
to the CPU to make room ("CLIP yields" in a plan.note), and a chat yield."""

from __future__ import annotations

import random
import sys
from collections import Counter

from hypothesis import Phase, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from messages.conversation import ChatYield
from tests.property.test_coordinator_invariants import GateMachine

counts: Counter[str] = Counter()


class CountingMachine(GateMachine):
    def teardown(self) -> None:
        world = getattr(self, "world", None)
        if world is not None:
            counts["cases"] += 1
            counts["step failure"] += any(s.ok is False for s in world.steps)
            counts["CLIP yield"] += any("CLIP yields" in f.get("note", "") for f in world.logs_of("plan.note"))
            counts["chat yield"] += any(isinstance(s.message, ChatYield) for s in world.steps)
        super().teardown()


def main() -> None:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else GateMachine.TestCase.settings.max_examples
    drawn = int(sys.argv[2]) if len(sys.argv) > 2 else random.SystemRandom().randrange(2**32)
    print(f"seed {drawn} (again: ... {examples} {drawn})", flush=True)
    chosen = settings(GateMachine.TestCase.settings, max_examples=examples, phases=[Phase.generate])
    run = seed(drawn)(lambda: run_state_machine_as_test(CountingMachine, settings=chosen))
    run()
    cases = counts.pop("cases")
    print(f"seed {drawn}: {cases} cases, "
          f"stateful_step_count {chosen.stateful_step_count}")
    for what, n in counts.most_common():
        print(f"  {what:<13} {n:>4}  {n / cases:6.1%}")


if __name__ == "__main__":
    main()
