"""Mutation testing of named modules with mutmut 3, in a throw-away copy of the project.

Usage (from the repository root, with the project's virtual environment active)::

    pip install 'mutmut>=3.8,<4'
    python tools/mutation.py wcfmt/reader.py wcfmt/cluster/ecsq.py
    python tools/mutation.py wcfmt/codecs/ spec/reference/wclust_ref.py --jobs 1
    python tools/mutation.py wcfmt/cluster/allocate.py --tests tests/test_allocate.py
    python tools/mutation.py wcfmt/cluster/ecsq.py --keep /tmp/mut-ecsq   # keep the copy to inspect
    python tools/mutation.py wcfmt/reader.py --rev HEAD    # the last commit, not the working tree
    python tools/mutation.py --resume /tmp/mut-ecsq    # after adding tests: its survivors against them
    python tools/mutation.py --summary /tmp/mut-ecsq   # the totals of a kept run again

MODULE is a ``.py`` file or a folder of them (``wcfmt/codecs/``), under ``wcfmt/`` or ``spec/reference/``.
The last line printed is ``N mutants, M survived, K timed out`` (survived includes mutmut's "no
tests": mutants no selected test reaches); above it, one line per surviving or timed-out mutant (``wcfmt.cluster.ecsq.x_rate_bits__mutmut_7: survived``). To see what a mutant changed,
keep the copy and run ``mutmut show NAME`` inside it (cwd = the copy).

How it works:
- Each module gets its own run: wcfmt/, tools/, tests/, spec/ and pyproject.toml (of the working
  tree, or of ``--rev``) are copied into a subfolder (named after the module) of a temporary folder
  (``--keep DIR`` to choose and keep it); ``--jobs N`` runs N modules at once, one mutant each; mutmut runs there, in its own ``mutants/`` subfolder, so nothing in the
  working tree is written, and other people's edits in a shared tree are not touched. The copy's
  ``PYTHONPATH`` points at the mutated package, so tests that start a subprocess (the CLI) import the
  mutated code and not the editable install.
- The tests: for each module, ``tests/test_<name>.py`` and ``tests/test_<name>_*.py``, plus the files
  listed for it in `RELATED` (golden vectors for the format modules, the reference decoder's
  comparison for wclust_ref, pack's bits mode for ecsq), plus the module's own doctests (pyproject runs
  ``--doctest-modules``); a module with no such file gets the test files whose imports name it.
  ``--tests`` replaces that choice. mutmut then runs, per mutant, only the tests that called the mutated function
  (it records that in one run of the tests first). Tests marked ``real_model`` or ``cuda`` are left out.
- Each mutant has a time limit: mutmut's, ``timeout_multiplier`` x the covering tests' baseline time plus
  a constant (``--timeout-multiplier``, default 5); a mutant over it counts as timed out (caught).
- The reference decoder is loaded by the tests under the name ``wclust_ref``, while mutmut names its
  mutants after the path (``spec.reference.wclust_ref``): a tests/conftest.py in the copy imports the mutated
  file under its path name and registers it as ``wclust_ref`` too, so the two names agree.

Not mutated: statements that raise an error with a message or log or warn (`NOT_MUTATED`): a
changed message is not a silent error, and mutmut would make three mutants of every message
string. The conditions that lead to them are mutated.

``--resume DIR`` (a ``--keep`` folder, or one module's folder in it) copies the current tests/ into
it and runs its surviving mutants again (and any an earlier ``--resume`` marked killed), only
against the test files that changed or were added since the run (or ``--tests``, which may name
single tests), each in its own pytest process with ``MUTANT_UNDER_TEST`` set and a time limit
(``--time-limit``); the verdicts go to DIR/resume.json and the totals are printed again. (A first
version ran all mutants in one pytest process: state left by one mutant hid the next one's
failures, so each now gets a fresh process.) It is how
a new test is credited with the mutants it kills without running the whole campaign again.

Limits: mutmut 3 mutates code inside functions and methods only, not module-level constants (a
constant such as ``ZSTD_OVERHEAD = 1.012`` is not mutated; hand mutations cover those, see
tools/NOTES-mutation.md). It is slow (minutes per module on 2 cores); run it under ``nice``. Not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("wcfmt", "tools", "tests", "spec")
IGNORED = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache", "*.pyc", "mutants")

CONFTEST = '''\
"""Written by tools/mutation.py: the reference decoder under mutmut's name and the tests' name."""
import importlib
import sys

if {wants_ref!r}:
    sys.modules["wclust_ref"] = importlib.import_module("spec.reference.wclust_ref")
'''


#: Lines not mutated: raising an error (its message text: a changed message is not a silent error;
#: the condition above it is mutated) and logging or warning calls.
NOT_MUTATED = [r"^\s*raise \w+\(", r"^\s*log\.\w+\(", r"^\s*warnings\.warn\("]


def module_files(args: list[str]) -> list[Path]:
    """The .py files named (folders expanded), relative to the repository root."""
    out: list[Path] = []
    for a in args:
        p = (ROOT / a).resolve()
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.py") if q.name != "__init__.py" or q.stat().st_size > 200)
        elif p.suffix == ".py" and p.exists():
            out.append(p)
        else:
            sys.exit(f"mutation.py: {a}: not a .py file or a folder of them")
    rel = [p.relative_to(ROOT) for p in out]
    for r in rel:
        if r.parts[0] not in ("wcfmt", "spec"):
            sys.exit(f"mutation.py: {r}: only modules under wcfmt/ and spec/reference/ can be mutated")
    return rel


def dotted(rel: Path) -> str:
    return ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


#: Test files that check a module besides its own tests/test_<name>*.py: the ones that exercise it
#: on purpose (golden vectors, a second decoder). Files that only pass through it (every pack test
#: reads a file back) are left out: they multiply the run time and rarely kill anything more.
RELATED: dict[str, tuple[str, ...]] = {
    "wcfmt/reader.py": ("tests/test_vectors.py",),
    "wcfmt/schema.py": ("tests/test_vectors.py", "tests/test_reader.py"),
    "wcfmt/codecs/clustered.py": ("tests/test_vectors.py", "tests/test_clustered_tensor.py"),
    "wcfmt/codecs/lossless.py": ("tests/test_vectors.py",),
    "wcfmt/codecs/entropy.py": ("tests/test_vectors.py", "tests/test_lossless.py"),
    "wcfmt/codecs/bitpack.py": ("tests/test_vectors.py",),
    "spec/reference/wclust_ref.py": ("tests/test_reference_decoder.py", "tests/test_reference_limits.py"),
    "wcfmt/cluster/ecsq.py": ("tests/test_allocate.py",),
    "wcfmt/cluster/calibrate.py": ("tests/test_random_calib.py",),
}


def tests_for(rel: Path) -> list[str]:
    """tests/test_<name>.py and tests/test_<name>_*.py, plus `RELATED`; for a module with none of
    these, the test files whose import lines name it."""
    name = rel.stem
    chosen = {ROOT / t for t in RELATED.get(rel.as_posix(), ())}
    chosen |= set((ROOT / "tests").glob(f"test_{name}.py")) | set((ROOT / "tests").glob(f"test_{name}_*.py"))
    if not chosen:
        mod = dotted(rel)
        parent, _, leaf = mod.rpartition(".")
        pats = [rf"^\s*(from|import)\s+{re.escape(mod)}\b", rf"^\s*from\s+{re.escape(parent)}\s+import\s+[^\n]*\b{leaf}\b"]
        for f in (ROOT / "tests").glob("test_*.py"):
            text = f.read_text(encoding="utf-8")
            if any(re.search(p, text, re.M) for p in pats):
                chosen.add(f)
    return sorted(str(f.relative_to(ROOT)) for f in chosen if f.exists())


def toml_list(xs: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in xs) + "]"


def prepare(work: Path, mods: list[Path], tests: list[str], multiplier: float, rev: str | None) -> None:
    if rev:
        # a commit, not the working tree: others' half-done edits in a shared tree do not break the run
        archive = subprocess.run(["git", "archive", "--format=tar", rev, *COPIED, "pyproject.toml"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    else:
        for d in COPIED:
            shutil.copytree(ROOT / d, work / d, ignore=IGNORED, symlinks=True)
    wants_ref = any(m.parts[0] == "spec" for m in mods)
    # in tests/, not the root: mutmut fills mutants/ after Python has listed it, so a root conftest.py
    # would not be found there ("No module named 'conftest'")
    (work / "tests" / "conftest.py").write_text(CONFTEST.format(wants_ref=wants_ref))
    doctests = [str(m) for m in mods if m.parts[0] == "wcfmt"]
    sources = sorted({m.parts[0] for m in mods} | {"wcfmt"})
    also = [d for d in COPIED if d not in sources]
    conf = (
        "\n[tool.mutmut]\n"
        f"source_paths = {toml_list(sources)}\n"
        f"only_mutate = {toml_list([str(m) for m in mods])}\n"
        f"also_copy = {toml_list(also)}\n"
        f"pytest_add_cli_args = {toml_list(['-q', '-p', 'no:cacheprovider', '-m', 'not real_model and not cuda'])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests + doctests)}\n"
        f"timeout_multiplier = {multiplier}\n"
        "timeout_constant = 5.0\n"
        "use_git_change_detection = false\n"
        f"do_not_mutate_patterns = {toml_list(NOT_MUTATED)}\n"
    )
    (work / "mutation.json").write_text(json.dumps({"modules": [str(m) for m in mods], "tests": tests}))
    text = (work / "pyproject.toml").read_text(encoding="utf-8") if rev else (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (work / "pyproject.toml").write_text(text + conf, encoding="utf-8")


SURVIVING = ("survived", "no tests")


def results(work: Path, env: dict[str, str]) -> dict[str, str]:
    """mutmut's verdict of every mutant in ``work``, overridden by ``resume.json`` (``--resume``)."""
    res = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=env,
                         capture_output=True, text=True, check=False)
    out = {}
    for line in res.stdout.splitlines():
        key, _, status = line.strip().rpartition(": ")
        if key:
            out[key] = status
    if not out:
        print(res.stdout + res.stderr, file=sys.stderr)
    again = work / "resume.json"
    if again.exists():
        out.update(json.loads(again.read_text()))
    return out


def runs_in(work: Path) -> list[Path]:
    """The per-module run folders of a kept folder (those holding a mutants/ folder), or the
    folder itself when it is one."""
    if (work / "mutants").is_dir():
        return [work]
    return sorted(p.parent for p in work.glob("*/mutants"))


#: One thread per process: mutmut forks each mutant from a process that has imported numpy and
#: torch, and a child forked while a BLAS/OpenMP thread pool exists can hang; mutmut would count
#: the hang as a timeout, i.e. as caught (seen: ecsq mutants "timed out" that pass their tests in
#: 2 s when run alone). It is also fairer to a shared machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def env_for(sub: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(sub / "mutants"), PYTHONDONTWRITEBYTECODE="1", **ONE_THREAD)
    env.pop("WCFMT_FUZZ", None)
    return env


def summarise_all(subs: list[Path]) -> int:
    """Print the mutants not killed, then ``N mutants, M survived, K timed out`` (survived counts
    mutmut's "no tests" too: no test reaches them), per module and, last, for all."""
    verdicts: dict[str, str] = {}
    for sub in subs:
        v = results(sub, env_for(sub))
        s = sum(1 for x in v.values() if x in SURVIVING)
        print(f"{sub.name}: {len(v)} mutants, {s} survived, {sum(1 for x in v.values() if x == 'timeout')} timed out")
        verdicts.update(v)
    counts: dict[str, int] = {}
    for key, status in verdicts.items():
        counts[status] = counts.get(status, 0) + 1
        if status != "killed":
            print(f"{key}: {status}")
    others = {k: v for k, v in counts.items() if k not in ("killed", "timeout")}
    if others:
        print("not killed:", ", ".join(f"{v} {k}" for k, v in sorted(others.items())))
    survived = sum(counts.get(s, 0) for s in SURVIVING)
    print(f"{len(verdicts)} mutants, {survived} survived, {counts.get('timeout', 0)} timed out")
    return 0 if verdicts else 1


def resume_all(work: Path, tests: list[str] | None, limit: int) -> int:
    subs = runs_in(work)
    for sub in subs:
        resume(sub, tests, limit)
    return summarise_all(subs)


def resume(work: Path, tests: list[str] | None, limit: int) -> None:
    """Run the surviving mutants of a kept run again (and those an earlier --resume marked killed),
    each in its own pytest process with ``MUTANT_UNDER_TEST`` set and a time limit, against the
    test files changed or added since (or ``tests``); record the verdicts in ``work/resume.json``."""
    env = env_for(work)
    again = work / "resume.json"
    earlier = json.loads(again.read_text()) if again.exists() else {}
    if again.exists():
        again.unlink()
    verdicts = results(work, env)
    names = sorted(set(k for k, v in verdicts.items() if v in SURVIVING) | set(earlier))
    if tests is None:
        tests = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "tests").glob("*.py"))
                 if not (work / "tests" / f.name).exists() or (work / "tests" / f.name).read_bytes() != f.read_bytes()]
        run = json.loads((work / "mutation.json").read_text())
        wanted = set(run["tests"]) | {t for m in run["modules"] for t in tests_for(Path(m))}
        tests = [t for t in tests if t in wanted]
    for f in sorted((ROOT / "tests").glob("*.py")):  # the new test files and helpers
        for d in (work / "tests", work / "mutants" / "tests"):
            shutil.copy2(f, d / f.name)
    print(f"resume: {len(names)} mutants against", " ".join(tests) or "(no changed tests)", flush=True)
    new: dict[str, str] = {}
    for name in names if tests else []:
        try:
            rc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                cwd=work / "mutants", env=dict(env, MUTANT_UNDER_TEST=name), timeout=limit,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            new[name] = {0: "survived", 1: "killed"}.get(rc, f"error {rc}")
        except subprocess.TimeoutExpired:
            new[name] = "timeout"
        if new[name].startswith("error"):
            print(f"{name}: {new[name]} on --resume (counted as survived)")
    again.write_text(json.dumps({k: v for k, v in new.items() if v in ("killed", "timeout")}, indent=0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="modules (.py files or folders) to mutate")
    ap.add_argument("--resume", type=Path, help="a --keep folder: run its surviving mutants against the test files "
                    "changed or added since (or --tests) and print the totals again")
    ap.add_argument("--summary", type=Path, help="a --keep folder: print its totals again")
    ap.add_argument("--time-limit", type=int, default=120, help="seconds per mutant with --resume (default 120)")
    ap.add_argument("--tests", nargs="+", help="test files to run instead of the automatic choice")
    ap.add_argument("--jobs", type=int, default=1, help="modules run at once, one mutant each (default 1)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (must not exist)")
    ap.add_argument("--timeout-multiplier", type=float, default=5.0)
    ap.add_argument("--rev", help="copy this commit (git archive) instead of the working tree, e.g. HEAD")
    a = ap.parse_args(argv)

    if a.summary:
        return summarise_all(runs_in(a.summary.resolve()))
    if a.resume:
        return resume_all(a.resume.resolve(), a.tests, a.time_limit)
    if not a.modules:
        ap.error("name at least one module")
    mods = module_files(a.modules)
    if a.keep:
        a.keep.mkdir(parents=True)
        work = a.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="wcfmt-mutation-"))
    try:
        # one mutmut run per module, in its own copy, against that module's tests only: a test that
        # reaches the module only in passing (every pack test reads a file back) is not run for it
        runs: list[tuple[Path, dict[str, str]]] = []
        for m in mods:
            tests = a.tests or tests_for(m)
            print(f"{m}: tests {' '.join(tests) or '(none found)'}", flush=True)
            sub = work / dotted(m)
            sub.mkdir()
            prepare(sub, [m], tests, a.timeout_multiplier, a.rev)
            # made now: a PYTHONPATH entry that does not exist when Python starts is cached as "no finder",
            # and the editable install's wcfmt (the unmutated one) would be imported instead
            (sub / "mutants").mkdir()
            runs.append((sub, env_for(sub)))
        pending, active = list(runs), []
        while pending or active:
            while pending and len(active) < a.jobs:  # --jobs modules at once, one mutant each
                sub, env = pending.pop(0)
                log = open(sub / "mutmut.log", "w")
                active.append(subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", "1"], cwd=sub,
                                               env=env, stdout=log, stderr=subprocess.STDOUT))
            active[0].wait()
            active = [p for p in active if p.poll() is None]
        return summarise_all([sub for sub, _ in runs])
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
