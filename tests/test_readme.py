"""The README's first Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_file_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if "tests/test_readme.py" in b]
    assert len(runnable) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(runnable[0], "README.md", "exec"), {})
    assert (tmp_path / "m.wclust").is_file()
