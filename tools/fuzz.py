"""Run the structure-aware fuzzer of tests/test_fuzz.py for a set time and count the cases.

    python tools/fuzz.py --minutes 30            # nice -n 15 python tools/fuzz.py ... on a shared machine
    python tools/fuzz.py --minutes 1 --save DIR  # failing files go to DIR (default tests/fuzz_regressions/new)

Each round is a fresh hypothesis run (random seed, no example database) of ``--batch`` cases:
a valid file (spec/vectors/valid/) mutated where a reader decides things, then read by wcfmt
(load_file, verify, safe_open slices, with and without mmap) and by the reference decoder. A
failure (another exception than a WclustError, wcfmt and the reference decoder disagreeing on
whether the file is valid or on its tensors, a case running longer than ``--hang`` seconds) is
shrunk by hypothesis, reported and its file saved; fuzzing goes on. The last line is a summary
for tools/NOTES-fuzz.md. ``WCFMT_FUZZ=long python -m pytest tests/test_fuzz.py`` is the same
fuzzer under pytest with a very large example count.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long to fuzz (default 30)")
    ap.add_argument("--batch", type=int, default=2000, help="cases per hypothesis run (default 2000)")
    ap.add_argument("--hang", type=float, default=120.0, help="a case longer than this many seconds is a hang: "
                    "dump every thread's stack and exit 3 (default 120)")
    ap.add_argument("--save", type=Path, default=ROOT / "tests" / "fuzz_regressions" / "new",
                    help="where failing files are written (default tests/fuzz_regressions/new)")
    args = ap.parse_args()
    os.environ["WCFMT_FUZZ_SAVE"] = str(args.save)
    sys.path.insert(0, str(ROOT / "tests"))
    import test_fuzz as T  # noqa: E402  (needs the path above)
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []

    @settings(max_examples=args.batch, database=None, deadline=None, suppress_health_check=list(HealthCheck),
              print_blob=True)  # fmt: skip
    @given(case=T.mutated_file(), use_mmap=st.booleans())
    def run(case: T.Case, use_mmap: bool) -> None:
        faulthandler.dump_traceback_later(args.hang, exit=True)
        try:
            kind, what = T.fuzz_one(case, use_mmap)
        finally:
            faulthandler.cancel_dump_traceback_later()
        outcomes["ok" if kind == "ok" else what] += 1

    t0 = time.monotonic()
    rounds = 0
    while time.monotonic() - t0 < args.minutes * 60:
        rounds += 1
        try:
            run()
        except Exception:  # noqa: BLE001 - a finding: report it and go on
            failures.append(traceback.format_exc())
            print(failures[-1], file=sys.stderr, flush=True)
        done = time.monotonic() - t0
        print(f"round {rounds}: {T.CASES['n']} cases in {done:.0f} s, {len(failures)} failure(s), "
              f"outcomes {dict(outcomes)}", flush=True)  # fmt: skip
    elapsed = time.monotonic() - t0
    differs = ", ".join(f"{a} vs {b}: {n}" for (a, b), n in sorted(T.CLASS_DIFFERS.items())) or "none"
    print(f"SUMMARY: {T.CASES['n']} cases in {elapsed / 60:.1f} min ({T.CASES['n'] / elapsed:.0f}/s), "
          f"{len(failures)} failure(s); outcomes {dict(sorted(outcomes.items()))}; "
          f"error class differs from the reference decoder's (multi-fault files, spec §9.4): {differs}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
