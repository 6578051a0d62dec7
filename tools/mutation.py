"""Mutation testing of named modules with mutmut 3, in a throw-away copy of the project.

Usage (from the repository root, with the project's virtual environment active)::

    pip install 'mutmut>=3.8,<4'
    python tools/mutation.py wcfmt/reader.py wcfmt/cluster/ecsq.py
    python tools/mutation.py wcfmt/codecs/ spec/reference/wclust_ref.py --jobs 1
    python tools/mutation.py wcfmt/cluster/allocate.py --tests tests/test_allocate.py
    python tools/mutation.py wcfmt/cluster/ecsq.py --keep /tmp/mut-ecsq   # keep the copy to inspect
    python tools/mutation.py wcfmt/reader.py --rev HEAD    # the last commit, not the working tree
    python tools/mutation.py --resume /tmp/mut-ecsq    # after adding tests: its survivors against them
    python tools/mutation.py --resume /tmp/mut-ecsq --tests tests/test_pack.py   # and a wider selection
    python tools/mutation.py --summary /tmp/mut-ecsq   # the totals of a kept run again
    python tools/mutation.py --summary /tmp/mut-a /tmp/mut-b/wcfmt.reader   # several, and all together

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

``--resume DIR`` (a ``--keep`` folder, or one module's folder in it) is how a new test is credited
with the mutants it kills without running the whole campaign again: it copies the current tests/
into the run (and the current wcfmt/, spec/ and tools/: mutmut mutates a changed module again and
re-runs the mutants of its changed functions), adds to its test selection the module's test files
made since (``tests/test_<name>_*.py``) and those named by ``--tests``, resets the surviving
mutants ("survived", "no tests") to "not checked" in mutmut's records, deletes mutmut's
test-to-function stats so that they are recorded again with the new tests, and runs ``mutmut run``
there: only the reset mutants run, each forked from a process that has imported everything once,
against the tests that reach its function. (An earlier version ran one pytest process per mutant,
about 35 s each here; before that, all mutants in one pytest process, where state left by one
mutant hid the next one's failures.)

Limits: mutmut 3 mutates code inside functions and methods only, not module-level constants (a
constant such as ``ZSTD_OVERHEAD = 1.012`` is not mutated; hand mutations cover those, see
tools/NOTES-mutation.md). It is slow (minutes per module on 2 cores); run it under ``nice``. Not in CI.

Traps for whoever writes tests against its results (each met here; tools/NOTES-mutation.md):
every mutant is forked from the process that ran the tests once to map them to functions, so a
cache that process filled (entropy.py's per-thread compressors) hides the mutants of the code
that fills it — clear it in the tests; a thread that process started (tqdm's monitor) is missing
in the child and can hang it into a false "timeout" (the conftest written here turns tqdm's off);
and mutmut hands test node ids back to pytest, so a parametrize id it cannot find again (regex
text, raw bytes) fails the run and counts as "killed" — give such tests plain ids.
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
"""Written by tools/mutation.py: the reference decoder under mutmut's name and the tests' name;
tqdm without its monitor thread (mutmut forks each mutant from the process that ran the tests
first: a child closing a bar would wait for a monitor thread that exists only in the parent, and
the hang would count as a timeout, i.e. as caught)."""
import importlib
import sys

import tqdm

tqdm.tqdm.monitor_interval = 0
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
            out += sorted(q for q in p.rglob("*.py") if q.name != "__init__.py" or "def " in q.read_text(encoding="utf-8"))
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
            if any(re.search(p, text, re.MULTILINE) for p in pats):
                chosen.add(f)
    return sorted(str(f.relative_to(ROOT)) for f in chosen if f.exists())


def toml_list(xs: list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in xs) + "]"


PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "-m", "not real_model and not cuda"]
#: mutmut's mutated copy of a module imports mutmut: the check that the reference decoder imports
#: only the standard library and numpy fails there for every mutant alike
DESELECT_REF = ["--deselect", "tests/test_reference_decoder.py::test_reference_decoder_imports_no_wcfmt"]


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
        f"pytest_add_cli_args = {toml_list(PYTEST_ARGS + (DESELECT_REF if wants_ref else []))}\n"
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
SURVIVING_CODES = (0, 5, 33)  # mutmut 3's exit codes of those (mutmut.stats.status_by_exit_code)
#: one mutant at a time per module (--jobs runs modules side by side)
MUTMUT_RUN = [sys.executable, "-m", "mutmut", "run", "--max-children", "1"]



def results(work: Path, env: dict[str, str]) -> dict[str, str]:
    """mutmut's verdict of every mutant in ``work``."""
    res = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=env,
                         capture_output=True, text=True, check=False)
    out = {}
    for line in res.stdout.splitlines():
        key, _, status = line.strip().rpartition(": ")
        if key:
            out[key] = status
    if not out:
        print(res.stdout + res.stderr, file=sys.stderr)
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


def resume_all(work: Path, tests: list[str] | None) -> int:
    subs = runs_in(work)
    for sub in subs:
        resume(sub, tests)
    return summarise_all(subs)


def _selection(work: Path) -> list[str]:
    m = re.search(r"^pytest_add_cli_args_test_selection = (\[.*\])$", (work / "pyproject.toml").read_text(), re.MULTILINE)
    return json.loads(m.group(1)) if m else []


def resume(work: Path, tests: list[str] | None) -> None:
    """Run the surviving mutants of a kept run again with mutmut itself, against the current tests/.

    The current tests/ (and code) is copied in; the module's test files made since and ``tests``
    (files) are added to the run's test selection; the
    verdicts "survived" and "no tests" are reset to "not checked" in mutmut's .meta files; mutmut's
    stats (which test reaches which function) are deleted so that it records them again with the
    new tests; then ``mutmut run`` runs only the reset mutants, each in a forked process against the
    tests that reach its function, as in the first run. Kills and timeouts of the first run stand."""
    env = env_for(work)
    for f in sorted((ROOT / "tests").glob("*.py")):  # the new test files and helpers
        for d in (work / "tests", work / "mutants" / "tests"):
            if f.name != "conftest.py":  # the run's own (see prepare)
                shutil.copy2(f, d / f.name)
    for d in ("wcfmt", "spec", "tools"):  # the code as it is now: mutmut re-mutates a changed module
        # (its mtime is newer than the mutated copy) and re-runs the mutants of the functions that changed
        shutil.copytree(ROOT / d, work / d, ignore=IGNORED, symlinks=True, dirs_exist_ok=True)
    run = json.loads((work / "mutation.json").read_text())
    # test files made since the run for its module (tests/test_<name>_*.py), and those asked for
    wanted = [t for m in run["modules"] for t in tests_for(Path(m))] + list(tests or [])
    old = _selection(work)
    sel = old + [t for t in dict.fromkeys(wanted) if t not in old]
    if sel != old:
        for pp in (work / "pyproject.toml", work / "mutants" / "pyproject.toml"):
            if pp.exists():
                pp.write_text(re.sub(r"^pytest_add_cli_args_test_selection = .*$",
                                     lambda _: f"pytest_add_cli_args_test_selection = {toml_list(sel)}",
                                     pp.read_text(), flags=re.MULTILINE))
    reset = 0
    for meta in (work / "mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        by_key = data["exit_code_by_key"]
        for key, ec in by_key.items():
            if ec in SURVIVING_CODES:  # mutmut's exit codes for "survived" and "no tests"
                by_key[key] = None  # "not checked": mutmut runs it again
                reset += 1
        meta.write_text(json.dumps(data, indent=4))
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    print(f"resume {work.name}: {reset} mutants again against {' '.join(_selection(work))}", flush=True)
    with open(work / "mutmut-resume.log", "a") as log:
        subprocess.run(MUTMUT_RUN, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help="modules (.py files or folders) to mutate")
    ap.add_argument("--resume", type=Path, help="a --keep folder: run its surviving mutants again against the current "
                    "tests (--tests: test files to add to its selection) and print the totals again")
    ap.add_argument("--summary", type=Path, nargs="+", help="--keep folders (or module folders in them): print "
                    "their totals again, per module and for all of them together")
    ap.add_argument("--tests", nargs="+", help="test files to run instead of the automatic choice")
    ap.add_argument("--jobs", type=int, default=1, help="modules run at once, one mutant each (default 1)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (must not exist)")
    ap.add_argument("--timeout-multiplier", type=float, default=5.0)
    ap.add_argument("--rev", help="copy this commit (git archive) instead of the working tree, e.g. HEAD")
    a = ap.parse_args(argv)

    if a.summary:
        return summarise_all([sub for folder in a.summary for sub in runs_in(folder.resolve())])
    if a.resume:
        return resume_all(a.resume.resolve(), a.tests)
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
                with open(sub / "mutmut.log", "w") as log:  # the child keeps its own descriptor
                    active.append(subprocess.Popen(MUTMUT_RUN, cwd=sub, env=env, stdout=log, stderr=subprocess.STDOUT))
            os.wait()  # whichever ends first frees its slot (not the oldest: a run can fail in seconds)
            active = [p for p in active if p.poll() is None]
        return summarise_all([sub for sub, _ in runs])
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
