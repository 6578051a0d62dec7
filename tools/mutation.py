"""Mutation testing of named modules with mutmut 3, in a throw-away copy of the project.

Usage (from the repository root, with the project's virtual environment active)::

    pip install 'mutmut>=3.8,<4'
    python tools/mutation.py wcfmt/reader.py wcfmt/cluster/ecsq.py
    python tools/mutation.py wcfmt/codecs/ spec/reference/wclust_ref.py --jobs 1
    python tools/mutation.py wcfmt/cluster/allocate.py --tests tests/test_allocate.py
    python tools/mutation.py wcfmt/cluster/ecsq.py --keep /tmp/mut-ecsq   # keep the copy to inspect
    python tools/mutation.py wcfmt/reader.py --rev HEAD    # the last commit, not the working tree

MODULE is a ``.py`` file or a folder of them (``wcfmt/codecs/``), under ``wcfmt/`` or ``spec/reference/``.
The last line printed is ``N mutants, M survived, K timed out``; above it, one line per surviving or
timed-out mutant (``wcfmt.cluster.ecsq.x_rate_bits__mutmut_7: survived``). To see what a mutant changed,
keep the copy and run ``mutmut show NAME`` inside it (cwd = the copy).

How it works:
- wcfmt/, tools/, tests/, spec/ and pyproject.toml (of the working tree, or of ``--rev``) are copied into a temporary folder (``--keep DIR``
  to choose and keep it); mutmut runs there, in its own ``mutants/`` subfolder, so nothing in the
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
    )
    text = (work / "pyproject.toml").read_text(encoding="utf-8") if rev else (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (work / "pyproject.toml").write_text(text + conf, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="+", help="modules (.py files or folders) to mutate")
    ap.add_argument("--tests", nargs="+", help="test files to run instead of the automatic choice")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (must not exist)")
    ap.add_argument("--timeout-multiplier", type=float, default=5.0)
    ap.add_argument("--rev", help="copy this commit (git archive) instead of the working tree, e.g. HEAD")
    a = ap.parse_args(argv)

    mods = module_files(a.modules)
    tests = a.tests or sorted({t for m in mods for t in tests_for(m)})
    print("modules:", " ".join(map(str, mods)), flush=True)
    print("tests:  ", " ".join(tests), flush=True)
    if a.keep:
        a.keep.mkdir(parents=True)
        work = a.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="wcfmt-mutation-"))
    try:
        prepare(work, mods, tests, a.timeout_multiplier, a.rev)
        # made now: a PYTHONPATH entry that does not exist when Python starts is cached as "no finder",
        # and the editable install's wcfmt (the unmutated one) would be imported instead
        (work / "mutants").mkdir()
        env = dict(os.environ, PYTHONPATH=str(work / "mutants"), PYTHONDONTWRITEBYTECODE="1")
        env.pop("WCFMT_FUZZ", None)
        mutmut = [sys.executable, "-m", "mutmut"]
        subprocess.run([*mutmut, "run", "--max-children", str(a.jobs)], cwd=work, env=env, check=False)
        res = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, env=env,
                             capture_output=True, text=True, check=False)
        counts: dict[str, int] = {}
        for line in res.stdout.splitlines():
            key, _, status = line.strip().rpartition(": ")
            if not key:
                continue
            counts[status] = counts.get(status, 0) + 1
            if status != "killed":
                print(f"{key}: {status}")
        total = sum(counts.values())
        if total == 0:
            print(res.stdout + res.stderr, file=sys.stderr)
        others = {k: v for k, v in counts.items() if k not in ("killed", "survived", "timeout")}
        if others:
            print("other outcomes:", ", ".join(f"{v} {k}" for k, v in sorted(others.items())))
        print(f"{total} mutants, {counts.get('survived', 0)} survived, {counts.get('timeout', 0)} timed out")
        return 0 if total else 1
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
