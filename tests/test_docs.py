"""The documentation site (docs/, mkdocs.yml): its generated pages are complete, its figures name
their commands, and `mkdocs build --strict` passes where mkdocs is installed (.ci/run builds it
after the tests, from `pip install -e ".[docs]"`)."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
sys.path.insert(0, str(DOCS / "scripts"))

import hooks  # noqa: E402


def test_cli_page_names_every_command_and_flag() -> None:
    from wcfmt.cli import build_parser

    page = hooks.cli_markdown()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices
    for name, cmd in sub.choices.items():
        assert f"`wcfmt {name}`" in page, name
        for action in cmd._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert f"`{flag}" in page, (name, flag)


def test_options_table_names_every_pack_option() -> None:
    from wcfmt import PackOptions

    table = hooks.options_markdown()
    for name in PackOptions.model_fields:
        assert f"| `{name}` |" in table, name


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return []


def test_every_nav_page_exists() -> None:
    text = (ROOT / "mkdocs.yml").read_text()
    pages = re.findall(r":\s+([\w./-]+\.md)\s*$", text, flags=re.M)
    assert len(pages) > 15
    external = hooks._external()
    for page in pages:
        assert (DOCS / page).is_file() or (page in external and external[page].is_file()), page


def test_pages_the_issue_asks_for() -> None:
    api = (DOCS / "api" / "files.md").read_text() + (DOCS / "api" / "packing.md").read_text()
    for name in ("wcfmt.load_state_dict", "wcfmt.PackOptions", "wcfmt.pack", "wcfmt.from_pretrained", "wcfmt.safe_open"):
        assert f"::: {name}\n" in api, name
    assert "::: wcfmt.distributed" in (DOCS / "api" / "distributed.md").read_text()
    bench = (DOCS / "benchmarks.md").read_text()
    for needle in ("Q4_K_M", "IQ4_XS", "Q4_1 GGUF", "lossless", "576", "genuine fp32", "## Scale"):
        assert needle in bench, needle


def test_every_figure_names_its_command() -> None:
    """Each image of a page is followed, in its caption paragraph, by the command that drew it."""
    figures = 0
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        for m in re.finditer(r"!\[[^\]]*\]\(([^)]+)\)", text):
            after = text[m.end() : m.end() + 600].split("\n\n")[:2]
            assert re.search(r"python (tools|docs)/\S+\.py", " ".join(after)), (page.name, m.group(1))
            assert (page.parent / m.group(1)).is_file() or m.group(1).startswith("img/experiments/"), m.group(1)
            figures += 1
    assert figures >= 6


def test_rate_quality_plot_reads_the_results_file() -> None:
    import plot_rate_quality

    rows, anchors = plot_rate_quality.read_results(ROOT / "tools" / "RESULTS-smollm2.md")
    assert rows[0]["method"] == "bf16" and any(r["method"] == "wcfmt" for r in rows)
    assert {a["type"] for a in anchors} >= {"Q4_1", "Q4_K_M", "IQ4_XS"}
    assert plot_rate_quality.short("--bits 4.0 --no-embeddings --calib calib.txt") == "4.0 bits, text"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason='mkdocs not installed (pip install -e ".[docs]")')  # fmt: skip
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "packing" / "index.html").is_file()
    assert "load_state_dict" in (tmp_path / "site" / "api" / "files" / "index.html").read_text()
