"""mkdocs hooks: pages made from the repository itself, so the site cannot drift from it.

- The table of pack options (``<!-- wcfmt-pack-options -->`` in docs/api/packing.md) is generated
  from ``wcfmt.PackOptions.model_fields``.
- The CLI reference (``<!-- wcfmt-cli -->`` in docs/cli.md) is generated from
  ``wcfmt.cli.build_parser()`` at build time: every command, every flag, its help as ``--help``
  prints it (`cli_markdown`; tests/test_docs.py checks it names every option).
- Files that live elsewhere in the repository are added to the site under the paths below, so
  that ``mkdocs build --strict`` checks links to them: the spec, its errata and vectors README,
  the JSON schema, CHANGELOG.md, the tools' result and note files, and the experiments' plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI_MARKER = "<!-- wcfmt-cli -->"
OPTIONS_MARKER = "<!-- wcfmt-pack-options -->"

#: site path -> repository path of every file the site takes from outside docs/.
EXTERNAL = {
    "spec/wclust-v1.md": "spec/wclust-v1.md",
    "spec/errata.md": "spec/errata.md",
    "spec/vectors.md": "spec/vectors/README.md",
    "spec/header.schema.json": "spec/header.schema.json",
    "changelog.md": "CHANGELOG.md",
    "results/smollm2.md": "tools/RESULTS-smollm2.md",
    "results/minilm.md": "tools/RESULTS-minilm.md",
    "results/notes-bench.md": "tools/NOTES-bench.md",
    "results/notes-gpu.md": "tools/NOTES-gpu.md",
    "results/notes-fuzz.md": "tools/NOTES-fuzz.md",
    "results/notes-scale.md": "tools/NOTES-scale.md",
    "results/notes-mutation.md": "tools/NOTES-mutation.md",
}
PLOTS = "tools/experiments/results"  # *.png -> img/experiments/*.png, *.md -> experiments/*.md


def _external() -> dict[str, Path]:
    out = {site: ROOT / repo for site, repo in EXTERNAL.items()}
    for p in sorted((ROOT / PLOTS).glob("*.png")):
        out[f"img/experiments/{p.name}"] = p
    for p in sorted((ROOT / PLOTS).glob("*.md")):
        out[f"experiments/{p.name}"] = p
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    arg = ""
    if action.nargs != 0:
        if action.choices is not None and action.metavar is None:
            arg = " {" + ",".join(map(str, action.choices)) + "}"
        else:
            metavar = action.metavar or action.dest.upper()
            arg = f" {metavar}" + (f" [{metavar} ...]" if action.nargs in ("+", "*") else "")
    return ", ".join(f"`{s}{arg}`" for s in action.option_strings)


def cli_markdown() -> str:
    """Markdown for every ``wcfmt`` command: usage, description and a table of its arguments."""
    from wcfmt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    lines = ["```text", parser.format_usage().strip(), "```", ""]
    lines += ["| command | what it does |", "|:---|:---|"]
    lines += [f"| [`{name}`](#wcfmt-{name}) | {_cell(helps.get(name) or '')} |" for name in sub.choices]
    for name, cmd in sub.choices.items():
        fmt = cmd._get_formatter()
        lines += ["", f"### `wcfmt {name}` {{#wcfmt-{name}}}", ""]
        if cmd.description:
            lines += [_cell(cmd.description), ""]
        lines += ["```text", cmd.format_usage().strip(), "```", ""]
        lines += ["| argument | meaning |", "|:---|:---|"]
        for action in cmd._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = fmt._expand_help(action) if action.help else ""
            if action.required and action.option_strings:
                text = "required. " + text
            lines.append(f"| {_flags(action)} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def options_markdown() -> str:
    """Markdown table of every `wcfmt.PackOptions` field: keyword, flag, type, default, meaning."""
    from wcfmt.packing.options import PackOptions, flag_of, help_text

    lines = ["| keyword | `wcfmt pack` flag | type | default | meaning |", "|:---|:---|:---|:---|:---|"]
    for name, field in PackOptions.model_fields.items():
        kind = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        default = "None" if field.default is None else repr(field.default)
        flag = flag_of(name)
        recorded = " (recorded in the header)" if name in PackOptions.recorded_fields() else ""
        code = " ".join  # a pipe inside a code span does not split a table cell
        lines.append(f"| `{name}` | {f'`{flag}`' if flag else '(Python only)'} | `{code(kind.split())}` | "
                     f"`{code(default.split())}` | {_cell(help_text(name))}{recorded} |")
    return "\n".join(lines) + "\n"


def on_files(files, config):  # type: ignore[no-untyped-def]
    from mkdocs.structure.files import File

    for site, path in _external().items():
        if files.get_file_from_path(site) is None:
            files.append(File.generated(config, site, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):  # type: ignore[no-untyped-def]
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_markdown())
    if OPTIONS_MARKER in markdown:
        markdown = markdown.replace(OPTIONS_MARKER, options_markdown())
    return markdown
