"""`wcfmt.PackOptions` (wcfmt/packing/options.py): one model for every pack option, the
``wcfmt pack`` flags and help made from it, the options recorded in the header, and packs
reproduced from them (``--settings-from``). Expectations come from argparse's own parsing, the
header as read back, and the bytes of a second pack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import wcfmt
from wcfmt.cli import build_parser, main
from wcfmt.errors import UsageError
from wcfmt.packing.options import OPTIONS_KEY, PackOptions, flag_of, help_text
from wcfmt.reader import WclustReader
from wcfmt.schema import PackSettings
from wcfmt.writer import WclustWriter


def _pack_parser():  # type: ignore[no-untyped-def]
    return build_parser()._subparsers._group_actions[0].choices["pack"]  # type: ignore[union-attr]


def _extra(path: Path) -> dict[str, str]:
    first = next(path.glob("*.wclust")) if path.is_dir() else path
    with WclustReader(first) as r:
        assert r.header.settings is not None
        return dict(r.header.settings.extra)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.wclust"))}


# --- the command line is made from the model --------------------------------------------------
def test_every_pack_flag_is_one_field_and_every_flag_field_is_a_flag() -> None:
    not_options = {"-h", "--help", "-o", "--output", "--settings-from", "-q", "--quiet"}
    flags = {s for a in _pack_parser()._actions for s in a.option_strings} - not_options
    flags -= {"--no-embeddings"}  # BooleanOptionalAction's negative form of --embeddings
    by_field = {flag_of(n): n for n in PackOptions.model_fields if flag_of(n)}
    assert flags == set(by_field)
    for a in _pack_parser()._actions:  # and argparse stores each under the field's own name
        if a.option_strings and a.option_strings[0] in by_field:
            assert a.dest == by_field[a.option_strings[0]]


def test_help_texts_come_from_the_fields() -> None:
    text = " ".join(_pack_parser().format_help().split())
    for name in PackOptions.model_fields:
        if flag_of(name):
            assert " ".join(help_text(name).split()) in text, name
    assert "default 5.43 when input columns are weighted" in text and "else 6)" in text


def test_flags_parse_to_the_same_options_as_keywords() -> None:
    args = _pack_parser().parse_args(
        ["SRC", "-o", "DST", "--bits", "5", "--bits-embed", "6", "--no-embeddings", "--calib", "none",
         "--chunk-rows", "128", "--include", "a", "--include", "b", "--level", "5"])
    given = {n: v for n, v in vars(args).items() if n in PackOptions.model_fields and v is not None}
    assert PackOptions(**given).recorded() == {
        "bits": 5.0, "bits_embed": 6.0, "embeddings": False, "calib": "none", "chunk_rows": 128,
        "include": ["a", "b"], "level": 5}


# --- validation, once, with the keyword (library) or flag (CLI) in the message ------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"k": 16, "bits": 5.0}, "give k or bits, not both"),
        ({"bits": 20}, "bits must be a number of bits per weight in (0, 16]"),
        ({"bits": True}, "bits must be a number"),
        ({"k": 300}, "k must be an integer in 1..256"),
        ({"chunk_rows": 0}, "chunk_rows must be a positive integer"),
        ({"level": 23}, "level must be a zstd level"),
        ({"include": "proj"}, "include must be a list of regexes, not one string"),
        ({"exclude": ["("]}, "exclude: invalid regex"),
        ({"k": 16, "bits_embed": 6.0}, "bits_embed needs the bits encoder"),
        ({"bits": 5.0, "k_overrides": {"x": 4}}, "k_overrides needs the k-means encoder"),
        ({"k": 16, "embed_importance": "tokens"}, "embed_importance needs clustered embeddings"),
        ({"embed_importance": "rare"}, "embed_importance must be one of tokens, uniform"),
        ({"calib": "random", "calib_tokens": 100}, "calib_tokens does not apply to calib='random'"),
        ({"calib_tokens": 100}, "calib_tokens needs calib"),
        ({"embed_weight": -1.0}, "embed_weight must be a positive number"),
        ({"budget_ppl": 0.5}, "budget_ppl needs text"),
        ({"bogus": 1}, "unknown pack option 'bogus'"),
    ],
)
def test_invalid_options_raise_usage_errors(fields: dict, message: str) -> None:
    with pytest.raises(UsageError) as e:
        PackOptions(**fields)
    assert message in str(e.value)


def test_cli_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "m.safetensors"
    src.write_bytes(b"")
    assert main(["pack", str(src), "-o", str(tmp_path / "o.wclust"), "--bits", "20"]) == 1
    err = capsys.readouterr().err
    assert "--bits must be a number of bits per weight in (0, 16]" in err
    assert main(["pack", str(src), "-o", str(tmp_path / "o.wclust"), "--k", "16", "--bits-embed", "6"]) == 1
    assert "--bits-embed needs the bits encoder" in capsys.readouterr().err
    assert not (tmp_path / "o.wclust").exists()


def test_updated_lets_an_explicit_encoder_replace_the_recorded_one() -> None:
    o = PackOptions(bits=5.0, bits_embed=6.0, embed_weight=8.0, calib="random")
    assert o.updated(k=32).recorded() == {"k": 32, "calib": "random"}
    assert PackOptions(k=16).updated(bits=4.0).recorded() == {"bits": 4.0}
    assert o.updated(calib="none").recorded()["calib"] == "none"


def test_recorded_json_is_compact_and_sorted() -> None:
    o = PackOptions(level=5, bits=5.0, include=["x"], threads=2, force=True, quality_note="n")
    assert o.recorded_json() == '{"bits":5.0,"include":["x"],"level":5}'  # run and card options are not recorded


# --- packs reproduced from what a file recorded ---------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from common import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("options"), hidden=32, intermediate=64, dtype=torch.bfloat16)


def test_settings_from_reproduces_a_non_default_pack(tmp_path: Path, llama: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["pack", str(llama), "-o", str(a), "--bits", "5.0", "--bits-embed", "6.0", "--calib", "none",
                 "--chunk-rows", "16", "--level", "5", "-q"]) == 0
    recorded = json.loads(_extra(a)[OPTIONS_KEY])
    assert recorded == {"bits": 5.0, "bits_embed": 6.0, "calib": "none", "chunk_rows": 16, "level": 5,
                        "embeddings": True, "embed_weight": 8.0, "embed_importance": "uniform"}
    assert main(["pack", str(llama), "-o", str(b), "--settings-from", str(a), "-q"]) == 0
    assert _files(a) == _files(b) and _files(a)
    # the Python route gives the same options
    assert PackOptions.from_file(a).recorded() == recorded
    # a flag given with --settings-from overrides what was recorded, the rest stays
    c = tmp_path / "c"
    assert main(["pack", str(llama), "-o", str(c), "--settings-from", str(a), "--level", "3", "-q"]) == 0
    assert json.loads(_extra(c)[OPTIONS_KEY]) == {**recorded, "level": 3}


def test_settings_from_reproduces_a_default_calibrated_pack(tmp_path: Path, llama: Path) -> None:
    a = tmp_path / "a"
    wcfmt.pack(llama, a)
    extra = _extra(a)
    assert extra["calib"].startswith("diagonal")  # the automatic calib='random' ran
    assert json.loads(extra[OPTIONS_KEY])["calib"] == "random" and json.loads(extra[OPTIONS_KEY])["bits"] == 5.43
    b = tmp_path / "b"
    wcfmt.pack(llama, b, PackOptions.from_file(a / "model.wclust"))
    assert _files(a) == _files(b)


def test_settings_from_a_k_means_pack_with_overrides(tmp_path: Path, llama: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    wcfmt.pack(llama, a, k=16, k_overrides={r"down_proj": 8}, chunk_rows=32)
    assert PackOptions.from_file(a).recorded() == {"k": 16, "k_overrides": {"down_proj": 8}, "chunk_rows": 32,
                                                  "embeddings": False}
    wcfmt.pack(llama, b, PackOptions.from_file(a))
    assert _files(a) == _files(b)


def test_from_file_reads_the_settings_of_a_file_without_recorded_options(tmp_path: Path) -> None:
    """Files of wcfmt 0.2 recorded settings but not the options: read them back from those."""
    path = tmp_path / "old.wclust"
    settings = PackSettings(method="ecsq", chunk_rows=64, level=7, include=["x"],
                            extra={"bits": "5.5", "bits_embed": "6", "calib": "diagonal+refit",
                                   "calib_text": "random (8x128 tokens, seed 0)", "embeddings": "clustered"})
    with WclustWriter(path, settings=settings) as w:
        w.add("a", torch.ones(2))
    assert PackOptions.from_file(path).recorded() == {
        "bits": 5.5, "bits_embed": 6.0, "calib": "random", "chunk_rows": 64, "level": 7, "include": ["x"],
        "embeddings": True}
    with WclustWriter(tmp_path / "k.wclust", settings=PackSettings(method="exact", k=32,
                                                                  extra={"calib": "none"})) as w:
        w.add("a", torch.ones(2))
    assert PackOptions.from_file(tmp_path / "k.wclust").recorded() == {"k": 32, "calib": "none", "embeddings": False}
    with WclustWriter(tmp_path / "none.wclust") as w:
        w.add("a", torch.ones(2))
    with pytest.raises(UsageError, match="records no settings"):
        PackOptions.from_file(tmp_path / "none.wclust")


# --- the header says what was done, not only what was asked ---------------------------------------
def test_a_budget_above_the_cap_is_recorded_warned_and_shown(tmp_path: Path) -> None:
    import safetensors.torch

    g = torch.Generator().manual_seed(0)
    src = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(512, 512, generator=g).bfloat16()},
                                str(src))
    with pytest.warns(UserWarning, match=r"requested 9 bits/weight, achieved [0-9.]+: K <= 256 per chunk"):
        report = wcfmt.pack(src, tmp_path / "m.wclust", bits=9.0)
    assert "model" in report.capped
    with WclustReader(tmp_path / "m.wclust") as r:
        e = r.header.tensors["model.layers.0.mlp.up_proj.weight"]
        extra = r.header.settings.extra  # type: ignore[union-attr]
        stored = sum(c.labels.length + c.centroids.length for c in e.chunks) * 8 / (512 * 512)
        assert max(c.k for c in e.chunks) == 256
    # at most 8 label bits (plus zstd's framing) and a 256-entry fp16 table: far below 9
    assert stored < 8.1 and extra["bits"] == "9" and extra["bits_cap"] == "K <= 256 per chunk"
    assert abs(float(extra["bits_achieved"]) - stored) < 0.02 * stored  # the allocation's model, within 2%
    from wcfmt.inspect import format_table, info

    assert f"model: requested 9 bits/weight, achieved {stored:.2f}: K <= 256 per chunk" in format_table(
        info(tmp_path / "m.wclust"))
    assert info(tmp_path / "m.wclust").to_dict()["totals"]["achieved_bits"] == {"model": stored}


def test_a_reachable_budget_is_not_capped(tmp_path: Path) -> None:
    import safetensors.torch
    import warnings

    g = torch.Generator().manual_seed(0)
    src = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(512, 512, generator=g).bfloat16()},
                                str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = wcfmt.pack(src, tmp_path / "m.wclust", bits=4.0)
    assert report.capped == {} and "bits_cap" not in _extra(tmp_path / "m.wclust")
    assert set(report.stages) == {"plan", "allocate", "encode+write"}


def test_pack_keeps_every_keyword_of_0_2() -> None:
    """`wcfmt.pack`'s keywords of 0.2 are promised names: each is still a PackOptions field."""
    old = ["k", "bits", "bits_embed", "embed_weight", "chunk_rows", "include", "exclude", "k_overrides",
           "bits_overrides", "embeddings", "embed_importance", "calib", "calib_tokens", "level", "threads", "force",
           "progress", "base_model", "quality_note", "remote_code", "push_to_hub", "token"]
    assert set(old) <= set(PackOptions.model_fields)
    import inspect

    params = inspect.signature(wcfmt.pack).parameters
    assert list(params)[:3] == ["src", "dst", "options"] and params["fields"].kind is inspect.Parameter.VAR_KEYWORD
