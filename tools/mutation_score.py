"""Per-module score of the last mutation pass (tools/mutation.sh), from mutmut's results in mutants/mai/core/*.meta.

Why a script of our own: `mutmut results` lists survivors but gives no per-module score, and it cannot tell an
equivalent mutant (one that cannot change behaviour) from a gap in the tests. Equivalent mutants are listed, each
with its one-line reason, in tools/mutation_equivalent.txt; they are counted apart ("excluded"), never as killed.

Score = killed / (checked - excluded): "no tests" (no test reaches the function), "timeout" and "suspicious" count
against the score like survivors. Mutants not checked yet are shown and left out of the score.

    .venv/bin/python tools/mutation_score.py              # the table (markdown)
    .venv/bin/python tools/mutation_score.py --survivors  # the survivors' names, not excluded
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIND = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
        24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "killed", None: "not checked"}
COLUMNS = ("killed", "survived", "no tests", "timeout", "suspicious", "excluded", "not checked")


def equivalent() -> dict[str, str]:
    """Mutant name -> why it cannot change behaviour (tools/mutation_equivalent.txt: `name  # reason`)."""
    listed: dict[str, str] = {}
    path = ROOT / "tools" / "mutation_equivalent.txt"
    for line in path.read_text().splitlines() if path.exists() else ():
        name, _, reason = line.partition("#")
        if name.strip():
            if not reason.strip():
                raise SystemExit(f"{path}: {name.strip()} has no reason; write `name  # why it is equivalent`")
            listed[name.strip()] = reason.strip()
    return listed


def read_meta(meta: Path) -> dict[str, int | None]:
    """A running pass rewrites its .meta files: read again when one is caught half-written."""
    for _ in range(20):
        try:
            return json.loads(meta.read_text())["exit_code_by_key"]
        except json.JSONDecodeError:
            time.sleep(0.1)
    raise SystemExit(f"{meta}: not JSON after 2 s")


def results() -> dict[str, dict[str, str]]:
    """Module -> mutant name -> kind."""
    found: dict[str, dict[str, str]] = {}
    excluded = equivalent()
    for meta in sorted((ROOT / "mutants" / "mai" / "core").glob("*.py.meta")):
        codes = read_meta(meta)
        module = meta.name.removesuffix(".py.meta")
        found[module] = {name: "excluded" if name in excluded else KIND.get(code, "suspicious")
                         for name, code in codes.items()}
    return found


def main() -> None:
    by_module = results()
    if "--survivors" in sys.argv:
        for kinds in by_module.values():
            for name, kind in kinds.items():
                if kind in ("survived", "no tests", "timeout", "suspicious"):
                    print(f"{kind:10} {name}")
        return
    print("| module | mutants | " + " | ".join(COLUMNS) + " | score |")
    print("|---|" + "---|" * (len(COLUMNS) + 2))
    total: Counter[str] = Counter()
    for module, kinds in by_module.items():
        if not kinds:
            continue
        counts = Counter(kinds.values())
        total.update(counts)
        print(f"| {module} | {len(kinds)} | " + " | ".join(str(counts[c]) for c in COLUMNS) + f" | {score(counts)} |")
    print(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[c]) for c in COLUMNS)
          + f" | **{score(total)}** |")


def score(counts: Counter[str]) -> str:
    judged = sum(counts.values()) - counts["excluded"] - counts["not checked"]
    return f"{100 * counts['killed'] / judged:.1f} %" if judged else "—"


if __name__ == "__main__":
    main()
