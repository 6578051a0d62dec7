"""`save_file`, `load_file`, `safe_open` (spec §4.5, §4.6, §5.5, §6): round trips, ties,
lazy slices, metadata, and one exact-bytes file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common import (
    CLUSTER_DTYPES,
    assert_bit_equal,
    bits,
    heavy_tailed,
    hypothesis_settings,
    random_clustered,
    special_values,
    split,
    write_small,
)
from wcfmt import (
    ClusteredTensor,
    TensorNotFoundError,
    UsageError,
    load_file,
    safe_open,
    save_file,
)
from wcfmt.codecs import lossless
from wcfmt.dtypes import DTYPES
from wcfmt.reader import WclustReader
from wcfmt.schema import PackSettings

HYPOTHESIS = hypothesis_settings(40)


def _shapes_of(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every shape case for one dtype: 0-d, 1-D, 2-D, 3-D, empty in each dim, non-contiguous."""
    v = special_values(dtype, n=240, seed=11)
    base = v[:60].reshape(6, 10)
    return {
        "scalar": v[4].clone(),  # -0.0 for floats
        "nan_scalar": v[1].clone(),
        "vec": v.clone(),
        "mat": base.clone(),
        "cube": v[:120].reshape(2, 6, 10).clone(),
        "empty0": v[:0].reshape(0, 7),
        "empty1": v[:0].reshape(3, 0),
        "empty2": v[:0].reshape(2, 3, 0),
        "transposed": base.t(),
        "strided": v.reshape(12, 20)[::3, 1::2],
        "expanded": v[:4].reshape(4, 1).expand(4, 5),
        "offset_view": v[7:47].reshape(4, 10),
    }


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_lossless_round_trip_every_dtype_bit_exact(tmp_path: Path, name: str) -> None:
    tensors = _shapes_of(DTYPES[name][2])
    path = tmp_path / f"{name}.wclust"
    save_file(tensors, path)
    got = load_file(path)
    assert list(got) == list(tensors)
    for key, want in tensors.items():
        assert_bit_equal(got[key], want)
        assert got[key].is_contiguous()
    if name in ("F32", "F16", "BF16", "F64"):  # the edge cases really are in there
        assert torch.isnan(got["nan_scalar"]).item() and torch.signbit(got["scalar"]).item()


def test_many_lossless_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lossless, "DEFAULT_LOSSLESS_CHUNK_BYTES", 100)
    t = special_values(torch.bfloat16, n=7 * 30, seed=3).reshape(7, 30)  # 60 B a row: 1 row a chunk
    path = tmp_path / "m.wclust"
    save_file({"t": t}, path)
    assert len(split(path).header["tensors"]["t"]["chunks"]) == 7
    assert_bit_equal(load_file(path)["t"], t)


@pytest.mark.parametrize("dtype", CLUSTER_DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 16, 17, 64, 256])
def test_clustered_round_trip(tmp_path: Path, k: int, dtype: torch.dtype) -> None:
    tensors: dict[str, Any] = {
        "divides": random_clustered((12, 24), k, 4, dtype=dtype, seed=k),  # 3 full chunks
        "ragged": random_clustered((13, 24), k, 5, dtype=dtype, seed=k + 1),  # 5, 5, 3 rows
        "vector": random_clustered((40,), k, 7, dtype=dtype, seed=k + 2),
    }
    path = tmp_path / "c.wclust"
    save_file(tensors, path)
    got = load_file(path)
    with safe_open(path) as f:
        for name, ct in tensors.items():
            assert_bit_equal(got[name], ct.decode())
            back = f.get_clustered(name)
            assert torch.equal(back.labels, ct.labels)
            assert [bits(c).tolist() for c in back.centroids] == [bits(c).tolist() for c in ct.centroids]
            assert (back.chunk_rows, back.dtype, back.shape) == (ct.chunk_rows, ct.dtype, ct.shape)
            entry = f.header.tensors[name]
            assert [c.k for c in entry.chunks] == ct.ks


def test_clustered_mixed_k_and_quality(tmp_path: Path) -> None:
    ct = random_clustered((9, 5), [1, 256, 17], 3, seed=9)
    ct = ClusteredTensor(ct.labels, ct.centroids, 3, dtype=torch.bfloat16, quality={"sqnr_db": 21.5})
    path = tmp_path / "q.wclust"
    save_file({"w": ct}, path)
    with safe_open(path) as f:
        back = f.get_clustered("w")
    assert back.ks == [1, 256, 17] and back.quality == {"sqnr_db": 21.5}
    assert_bit_equal(back.decode(), ct.decode())


@pytest.mark.parametrize("shape", [(), (0, 4), (4, 0), (0,)])
def test_clustered_scalar_and_empty(tmp_path: Path, shape: tuple[int, ...]) -> None:
    n = int(np.prod(shape))
    ct = random_clustered(shape, 3, 2, seed=1) if n else ClusteredTensor(
        labels=torch.zeros(shape, dtype=torch.uint8), centroids=[], chunk_rows=2
    )
    path = tmp_path / "e.wclust"
    save_file({"w": ct}, path)
    assert_bit_equal(load_file(path)["w"], ct.decode())
    with safe_open(path) as f:
        back = f.get_clustered("w")
    assert back.shape == ct.shape and torch.equal(back.labels, ct.labels) and back.ks == ct.ks


@st.composite
def _clustered_cases(draw: st.DrawFn) -> ClusteredTensor:
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    rows = shape[0] if shape else 1
    chunk_rows = draw(st.integers(1, 8))
    n_chunks = 0 if int(np.prod(shape)) == 0 else -(-rows // chunk_rows)
    ks = draw(st.lists(st.sampled_from([1, 2, 3, 4, 5, 16, 17, 64, 200, 256]), min_size=n_chunks, max_size=n_chunks))
    dtype = draw(st.sampled_from(CLUSTER_DTYPES))
    return random_clustered(shape, ks, chunk_rows, dtype=dtype, seed=draw(st.integers(0, 2**16)))


@HYPOTHESIS
@given(ct=_clustered_cases())
def test_clustered_round_trip_property(tmp_path: Path, ct: ClusteredTensor) -> None:
    path = tmp_path / "h.wclust"
    save_file({"w": ct}, path)
    assert_bit_equal(load_file(path)["w"], ct.decode())
    with safe_open(path) as f:
        back = f.get_clustered("w")
        assert torch.equal(back.labels, ct.labels) and back.ks == ct.ks
        if ct.shape:
            rows = ct.shape[0]
            assert_bit_equal(f.get_slice("w")[rows // 3 : rows - 1], ct.decode()[rows // 3 : rows - 1])


@HYPOTHESIS
@given(
    name=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    seed=st.integers(0, 2**16),
    transpose=st.booleans(),
)
def test_lossless_round_trip_property(tmp_path: Path, name: str, shape: list[int], seed: int, transpose: bool) -> None:
    n = int(np.prod(shape))
    t = special_values(DTYPES[name][2], n=max(n, 24), seed=seed)[:n].reshape(shape)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, -1)
    path = tmp_path / "h.wclust"
    save_file({"t": t}, path)
    assert_bit_equal(load_file(path)["t"], t)


# -- ties (spec §4.5) -------------------------------------------------------------------------
def test_tied_tensors_stored_once(tmp_path: Path) -> None:
    emb = heavy_tailed((64, 32), seed=2)
    ct = random_clustered((16, 8), 4, 4)
    path = tmp_path / "t.wclust"
    save_file({"emb": emb, "ct": ct, "head": emb, "ct2": ct, "view": emb.view(64, 32)}, path)
    header = split(path).header["tensors"]
    assert header["head"] == {"dtype": "BF16", "shape": [64, 32], "codec": "alias", "target": "emb"}
    assert header["ct2"]["target"] == "ct" and header["view"]["target"] == "emb"
    # one set of blobs: the file is no bigger than with one copy (within header size)
    single = tmp_path / "s.wclust"
    save_file({"emb": emb, "ct": ct}, single)
    assert split(path).header_offset == split(single).header_offset
    out = load_file(path)
    assert out["head"] is out["emb"] and out["view"] is out["emb"] and out["ct2"] is out["ct"]
    assert_bit_equal(out["head"], emb)
    with safe_open(path) as f:
        assert_bit_equal(f.get_tensor("ct2"), ct.decode())
        assert torch.equal(f.get_clustered("ct2").labels, ct.labels)
        assert_bit_equal(f.get_slice("head")[3:9], emb[3:9])


def test_untied_lookalikes_stored_twice(tmp_path: Path) -> None:
    emb = heavy_tailed((8, 4), seed=2)
    ct = random_clustered((4, 4), 4, 2)
    same_ct = ClusteredTensor(ct.labels, ct.centroids, ct.chunk_rows, dtype=ct.dtype)
    path = tmp_path / "u.wclust"
    save_file(
        {"emb": emb, "copy": emb.clone(), "rows": emb[1:], "t": emb.t(), "as_f32": emb.float(), "ct": ct, "ct_b": same_ct},
        path,
    )
    header = split(path).header["tensors"]
    assert all(e["codec"] != "alias" for e in header.values())
    out = load_file(path)
    assert out["copy"] is not out["emb"]
    assert_bit_equal(out["rows"], emb[1:])
    assert_bit_equal(out["t"], emb.t())


def test_empty_tensors_are_never_tied(tmp_path: Path) -> None:
    e = torch.empty(0, 3)
    path = tmp_path / "e.wclust"
    save_file({"a": e, "b": e}, path)
    assert split(path).header["tensors"]["b"]["codec"] == "lossless"


# -- safe_open ----------------------------------------------------------------------------------
def test_safe_open_views(tmp_path: Path) -> None:
    path = write_small(tmp_path, metadata={"format": "pt", "ключ": "значение"})
    with safe_open(path, framework="pt") as f:
        assert f.keys() == ["clu", "odd", "skew", "emb", "head", "ids", "scale"]
        assert f.metadata() == {"format": "pt", "ключ": "значение"}
        assert f.get_tensor("scale").item() == 0.5 and f.get_tensor("scale").shape == ()
        with pytest.raises(TensorNotFoundError, match="'nope'") as info:
            f.get_tensor("nope")
        assert str(path) in str(info.value)
        with pytest.raises(KeyError):
            f.get_slice("nope")
        with pytest.raises(UsageError, match="'ids'.*not clustered"):
            f.get_clustered("ids")
        with pytest.raises(UsageError, match="not clustered"):
            f.get_clustered("head")  # alias of a lossless tensor


def test_safe_open_numpy(tmp_path: Path) -> None:
    path = write_small(tmp_path)
    with safe_open(path, framework="numpy") as f:
        ids = f.get_tensor("ids")
        assert isinstance(ids, np.ndarray) and ids.dtype == np.int32
        assert np.array_equal(ids, np.arange(-40, 40, dtype=np.int32).reshape(8, 10))
        odd = f.get_tensor("odd")
        assert isinstance(odd, np.ndarray) and odd.dtype == np.float32
        with pytest.raises(UsageError, match="bfloat16"):
            f.get_tensor("emb")


def test_safe_open_bad_framework(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="framework"):
        safe_open(write_small(tmp_path), framework="tf")


def test_safe_open_closes(tmp_path: Path) -> None:
    path = write_small(tmp_path)
    with safe_open(path) as f:
        pass
    with pytest.raises(ValueError):
        f.get_tensor("ids")


def test_returned_tensors_are_writable_and_independent(tmp_path: Path) -> None:
    path = write_small(tmp_path)
    with safe_open(path) as f:
        a = f.get_tensor("ids")
        a += 1  # must not fail on a read-only mmap view nor change the file
        b = f.get_tensor("ids")
    assert torch.equal(b, torch.arange(-40, 40, dtype=torch.int32).reshape(8, 10))


# -- get_slice ------------------------------------------------------------------------------------
INDEXES: list[Any] = [
    0,
    4,
    -1,
    -10,
    slice(None),
    slice(2, 7),
    slice(2, 3),
    slice(3, 6),
    slice(5, 5),
    slice(7, 2),
    slice(-3, None),
    slice(None, None, 3),
    slice(1, 9, 4),
    slice(None, None, -1),
    slice(8, 1, -2),
    slice(-2, -9, -3),
    slice(100, 200),
    slice(-100, 2),
    (slice(1, 4), 2),
    (slice(2, 9), slice(None, None, 2)),
    (7, slice(1, 3)),
    (slice(None, None, -2), 0),
    (Ellipsis, 1),
    (slice(4, 8), Ellipsis),
]


def _np_index(t: torch.Tensor, index: Any) -> torch.Tensor:
    """Reference: index the bit pattern with numpy (torch has no negative steps)."""
    b = bits(t).reshape(t.shape).numpy()
    got = np.array(b[index], order="C")  # 0-d stays 0-d
    return torch.from_numpy(got).view(t.dtype) if t.dtype != torch.bool else torch.from_numpy(got).bool()


def _rows_of(index: Any, rows: int) -> set[int]:
    first = index[0] if isinstance(index, tuple) else index
    if first is Ellipsis:
        return set(range(rows))
    if isinstance(first, int):
        return {first % rows}
    return set(range(rows)[first])


@pytest.fixture
def sliced_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Any], dict[str, int]]:
    monkeypatch.setattr(lossless, "DEFAULT_LOSSLESS_CHUNK_BYTES", 2 * 6 * 5 * 4)  # "ll": 2 rows a chunk
    tensors = {
        "ct": random_clustered((10, 6), [2, 17, 3, 256], 3, seed=4),  # chunks of 3 rows
        "ll": special_values(torch.float32, n=10 * 6 * 5, seed=5).reshape(10, 6, 5),
        "vec": special_values(torch.int16, n=10, seed=6),  # 1-D lossless, one chunk
    }
    path = tmp_path / "s.wclust"
    save_file(tensors, path)
    chunk_rows = {n: split(path).header["tensors"][n]["chunk_rows"] for n in tensors}
    assert chunk_rows == {"ct": 3, "ll": 2, "vec": 120}
    return path, tensors, chunk_rows


@pytest.mark.parametrize("index", INDEXES, ids=[repr(i) for i in INDEXES])
@pytest.mark.parametrize("name", ["ct", "ll"])
def test_get_slice_matches_and_decodes_only_needed_chunks(
    sliced_file: tuple[Path, dict[str, Any], dict[str, int]],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    index: Any,
) -> None:
    path, tensors, chunk_rows = sliced_file
    calls: list[tuple[str, int]] = []
    real = WclustReader.decode_chunk

    def spy(self: WclustReader, tensor: str, chunk: int) -> np.ndarray:
        calls.append((tensor, chunk))
        return real(self, tensor, chunk)

    monkeypatch.setattr(WclustReader, "decode_chunk", spy)
    with safe_open(path) as f:
        full = f.get_tensor(name)
        want = _np_index(full, index)
        calls.clear()
        sl = f.get_slice(name)
        assert sl.get_shape() == list(full.shape)
        assert sl.get_dtype() == ("BF16" if name == "ct" else "F32")
        got = sl[index]
    assert_bit_equal(got, want)
    needed = {r // chunk_rows[name] for r in _rows_of(index, full.shape[0])}
    assert sorted(c for _, c in calls) == sorted(needed), (calls, needed)
    ref = tensors[name].decode() if name == "ct" else tensors[name]
    assert_bit_equal(want, _np_index(ref, index))


def test_get_slice_one_dim_and_scalar(sliced_file: tuple[Path, dict[str, Any], dict[str, int]]) -> None:
    path, tensors, _ = sliced_file
    with safe_open(path) as f:
        v = tensors["vec"]
        for index in (3, -1, slice(2, 8), slice(None, None, -3), slice(4, 4)):
            assert_bit_equal(f.get_slice("vec")[index], _np_index(v, index))
    scalar_path = path.with_name("scalar.wclust")
    save_file({"s": torch.tensor(-0.0)}, scalar_path)
    with safe_open(scalar_path) as f:
        assert_bit_equal(f.get_slice("s")[()], torch.tensor(-0.0))
        assert f.get_slice("s").get_shape() == []


@pytest.mark.parametrize("index", [10, -11, 2**40])
def test_get_slice_out_of_range(sliced_file: tuple[Path, dict[str, Any], dict[str, int]], index: int) -> None:
    path, _, _ = sliced_file
    with safe_open(path) as f, pytest.raises(IndexError):
        f.get_slice("ct")[index]


def test_get_slice_unsupported_index(sliced_file: tuple[Path, dict[str, Any], dict[str, int]]) -> None:
    path, _, _ = sliced_file
    with safe_open(path) as f, pytest.raises(UsageError, match="'ct'"):
        f.get_slice("ct")[[0, 2]]


def test_get_tensor_decodes_each_chunk_once(
    sliced_file: tuple[Path, dict[str, Any], dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, _ = sliced_file
    # load_file streams clustered chunks through read_labels and lossless ones through decode_chunk
    calls: list[tuple[str, int]] = []
    for method in ("decode_chunk", "read_labels"):
        real = getattr(WclustReader, method)
        monkeypatch.setattr(
            WclustReader,
            method,
            lambda self, n, c, *a, _real=real, **kw: calls.append((n, c)) or _real(self, n, c, *a, **kw),
        )
    load_file(path)
    assert sorted(calls) == sorted([("ct", i) for i in range(4)] + [("ll", i) for i in range(5)] + [("vec", 0)])


# -- metadata and settings -------------------------------------------------------------------------
def test_metadata_round_trip(tmp_path: Path) -> None:
    md = {"format": "pt", "": "empty key", "quote": '"\\\n', "emoji": "🙂"}
    path = write_small(tmp_path, metadata=md)
    with safe_open(path) as f:
        assert f.metadata() == md
    path2 = write_small(tmp_path, name="n.wclust")
    with safe_open(path2) as f:
        assert f.metadata() == {}


@pytest.mark.parametrize("md", [{"a": 1}, {"a": None}, {2: "b"}, {"a": ["b"]}, "a=b"])
def test_metadata_non_str_rejected(tmp_path: Path, md: Any) -> None:
    with pytest.raises(UsageError, match="metadata"):
        save_file({"a": torch.ones(1)}, tmp_path / "m.wclust", metadata=md)
    assert list(tmp_path.iterdir()) == []


def test_settings_round_trip(tmp_path: Path) -> None:
    s = PackSettings(k=16, chunk_rows=256, include=["*.weight"], exclude=["lm_head*"], level=3, method="ckmeans",
                     extra={"seed": "0"})
    path = write_small(tmp_path, settings=s)
    with safe_open(path) as f:
        assert f.header.settings == s
    with safe_open(write_small(tmp_path, name="n.wclust")) as f:
        assert f.header.settings is None


# -- exact bytes --------------------------------------------------------------------------------
#: sha256 of the file `_tiny_file` writes. A change here means the bytes on disk changed: that
#: is a format change, so update spec/wclust-v1.md (and its change list), apply the version rule
#: (spec §10), regenerate spec/vectors/ and say so in CHANGELOG.md - then update this value.
TINY_SHA256 = "fa39fff42a23e997be3f37ff139e5119f485a841438e28faa2418e7f92373724"


def _tiny_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import wcfmt.writer

    monkeypatch.setattr(wcfmt.writer, "__version__", "0.0.0")  # a release is not a format change
    labels = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1], [1, 0, 0, 0]], dtype=torch.uint8)
    tables = [torch.tensor([-0.5, 0.0, 0.25], dtype=torch.float16), torch.tensor([0.0, 1.0], dtype=torch.float16)]
    tensors = {
        "w": ClusteredTensor(labels=labels, centroids=tables, chunk_rows=2, dtype=torch.bfloat16),
        "b": torch.tensor([1.0, -0.0, float("inf"), 3.5], dtype=torch.bfloat16),
        "n": torch.arange(6, dtype=torch.int16).reshape(2, 3),
    }
    tensors["tied"] = tensors["b"]
    path = folder / "tiny.wclust"
    save_file(tensors, path, metadata={"k": "v"}, threads=1)
    return path


def test_exact_bytes_of_a_tiny_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tiny_file(tmp_path, monkeypatch)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == TINY_SHA256


def test_get_slice_numpy_framework(sliced_file: tuple[Path, dict[str, Any], dict[str, int]]) -> None:
    path, tensors, _ = sliced_file
    want = tensors["ll"].numpy()
    with safe_open(path, framework="numpy") as f:
        for index in (slice(1, 8, 3), slice(None, None, -2), 4, (slice(2, 5), 1)):
            got = f.get_slice("ll")[index]
            assert isinstance(got, np.ndarray)
            assert got.tobytes() == np.ascontiguousarray(want[index]).tobytes() and got.shape == want[index].shape
