"""Suite-wide setup."""

from __future__ import annotations

import signal

# A runner that starts the suite as a background job of a non-interactive shell (`cmd &`) hands it SIGINT ignored,
# and every process it spawns would inherit that: `mai chat` and `mai demo` would then never see the Ctrl-C the
# tests press, as a user's terminal delivers it. Restore the terminal's SIGINT (children get the default action).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --- hypothesis: fresh random draws on every run, and the failure says how to replay it -----------------------------
# Property tests explore: no derandomize, no example database (a run never replays an earlier one by itself). The
# session draws one seed, unless `--hypothesis-seed=N` names one; it is printed in the header and again under
# every failing test, so `pytest <test id> --hypothesis-seed=N` replays exactly that run.
import random  # noqa: E402

import pytest  # noqa: E402
from hypothesis import core as _hypothesis_core  # noqa: E402
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("mai", database=None, derandomize=False, print_blob=True)
_hypothesis_settings.load_profile("mai")


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("hypothesis_seed", default=None)
    if chosen is None:
        # The hypothesis plugin leaves the seed random per test when none is given and then cannot tell it;
        # one drawn here is the same thing, told. (global_force_seed is what --hypothesis-seed itself sets.)
        chosen = random.SystemRandom().randrange(2**32)
        _hypothesis_core.global_force_seed = chosen
    config.stash[_SEED] = int(chosen)


_SEED = pytest.StashKey[int]()


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis seed: {config.stash[_SEED]} (replay a failure with --hypothesis-seed={config.stash[_SEED]})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.failed and getattr(getattr(item, "obj", None), "is_hypothesis_test", False) or (
            report.failed and "hypothesis" in report.longreprtext):
        seed = item.config.stash[_SEED]
        report.sections.append(("hypothesis", f"replay: pytest '{item.nodeid}' --hypothesis-seed={seed}"))
