"""tools/mutation.py's own logic, without running mutmut: which modules and tests it picks, the
configuration it writes into a run's copy, and what `--resume` resets (tools/NOTES-mutation.md)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common import load_script

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the tool itself runs on 3.10 too

ROOT = Path(__file__).resolve().parent.parent


def _tool():  # type: ignore[no-untyped-def]
    return load_script("tools/mutation.py", "mutation_tool")


def test_folders_expand_to_modules_with_code() -> None:
    """A folder gives its modules; an `__init__.py` holding only a docstring is not one."""
    got = [str(p) for p in _tool().module_files(["wcfmt/codecs/"])]
    assert got == ["wcfmt/codecs/bitpack.py", "wcfmt/codecs/clustered.py", "wcfmt/codecs/entropy.py",
                   "wcfmt/codecs/lossless.py"]
    with pytest.raises(SystemExit):
        _tool().module_files(["README.md"])


def test_tests_of_a_module() -> None:
    """test_<name>.py, test_<name>_*.py and the files named in RELATED."""
    tool = _tool()
    assert tool.tests_for(Path("wcfmt/codecs/clustered.py")) == [
        "tests/test_clustered_codec.py", "tests/test_clustered_tensor.py", "tests/test_vectors.py"]
    assert tool.tests_for(Path("spec/reference/wclust_ref.py")) == [
        "tests/test_reference_decoder.py", "tests/test_reference_limits.py"]


def _prepared(tmp_path: Path, module: str) -> tuple[Any, Path, dict[str, Any]]:
    tool = _tool()
    mod = Path(module)
    tool.prepare(tmp_path, [mod], tool.tests_for(mod), 5.0, None)
    conf = tomllib.loads((tmp_path / "pyproject.toml").read_text())["tool"]["mutmut"]
    return tool, tmp_path, conf


def test_the_run_configuration(tmp_path: Path) -> None:
    tool, work, conf = _prepared(tmp_path, "spec/reference/wclust_ref.py")
    assert conf["only_mutate"] == ["spec/reference/wclust_ref.py"]
    assert conf["source_paths"] == ["spec", "wcfmt"] and "tests" in conf["also_copy"]
    # the reference decoder's import check cannot pass on a copy that imports mutmut
    assert "tests/test_reference_decoder.py::test_reference_decoder_imports_no_wcfmt" in conf["pytest_add_cli_args"]
    assert conf["pytest_add_cli_args_test_selection"] == tool.tests_for(Path("spec/reference/wclust_ref.py"))
    conftest = (work / "tests" / "conftest.py").read_text()
    assert "monitor_interval = 0" in conftest and 'sys.modules["wclust_ref"]' in conftest
    # a wcfmt module: its doctests run too, nothing deselected
    (tmp_path / "b").mkdir()
    _, _, conf = _prepared(tmp_path / "b", "wcfmt/codecs/bitpack.py")
    assert conf["pytest_add_cli_args_test_selection"][-1] == "wcfmt/codecs/bitpack.py"
    assert not any("--deselect" in a for a in conf["pytest_add_cli_args"])


def test_resume_resets_survivors_and_widens_the_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume: "survived" and "no tests" become "not checked" (None), kills and timeouts stay,
    mutmut's stats are deleted so that it maps the tests again, the module's new test files and
    --tests join the selection, and mutmut runs."""
    tool, work, _ = _prepared(tmp_path, "wcfmt/codecs/bitpack.py")
    meta = work / "mutants" / "wcfmt" / "codecs" / "bitpack.py.meta"
    meta.parent.mkdir(parents=True)
    (work / "mutants" / "tests").mkdir()  # mutmut's copy of tests/, made by its first run
    codes = {"a__mutmut_1": 0, "a__mutmut_2": 1, "a__mutmut_3": 33, "a__mutmut_4": 36, "a__mutmut_5": 5,
             "a__mutmut_6": 0, "a__mutmut_7": None}
    meta.write_text(json.dumps({"exit_code_by_key": codes, "other": 1}))
    (work / "mutants" / "mutmut-stats.json").write_text("{}")
    old = json.loads(json.dumps(tomllib.loads((work / "pyproject.toml").read_text())["tool"]["mutmut"]))
    ran: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: ran.append(list(args)))
    tool.resume(work, ["tests/test_lossless.py"])
    after = json.loads(meta.read_text())
    assert after["exit_code_by_key"] == {"a__mutmut_1": None, "a__mutmut_2": 1, "a__mutmut_3": None,
                                         "a__mutmut_4": 36, "a__mutmut_5": None, "a__mutmut_6": None, "a__mutmut_7": None}
    assert after["other"] == 1
    assert not (work / "mutants" / "mutmut-stats.json").exists()
    sel = tomllib.loads((work / "pyproject.toml").read_text())["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
    assert sel[: len(old["pytest_add_cli_args_test_selection"])] == old["pytest_add_cli_args_test_selection"]
    assert sel[-1] == "tests/test_lossless.py"
    assert (work / "tests" / "test_mutation_tool.py").exists()  # the current tests are copied in
    assert ran and ran[-1][-4:] == ["mutmut", "run", "--max-children", "1"]
