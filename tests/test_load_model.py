"""`wcfmt.load_model`: a packed file or folder into an existing module, in place.

Expectations come from other paths: `wcfmt.load_file` / `load_state_dict` for the values (the
streaming loader without ``into``), and ``safetensors.torch.load_model`` for which keys count as
missing and unexpected on the same module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from common import assert_bit_equal, heavy_tailed

import wcfmt
from wcfmt import UsageError, cluster_tensor


class Tiny(torch.nn.Module):
    """An embedding tied to its output head, a linear layer and a persistent buffer."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, tie: bool = True) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32, dtype=dtype)
        self.proj = torch.nn.Linear(32, 48, bias=True, dtype=dtype)
        self.head = torch.nn.Linear(32, 64, bias=False, dtype=dtype)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(48, dtype=dtype))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def source_tensors() -> dict[str, object]:
    """What a packed Tiny holds: clustered matrices, lossless bias and buffer."""
    return {
        "embed.weight": cluster_tensor(heavy_tailed((64, 32), seed=1), k=16),
        "proj.weight": cluster_tensor(heavy_tailed((48, 32), seed=2), k=32, chunk_rows=16),
        "proj.bias": heavy_tailed((48,), seed=3),
        "scale": heavy_tailed((48,), seed=4),
    }


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.wclust"
    wcfmt.save_file(source_tensors(), p)
    return p


def test_loads_in_place_bit_exactly(packed: Path) -> None:
    m = Tiny()
    before = {k: v.data_ptr() for k, v in m.state_dict().items()}
    assert wcfmt.load_model(m, packed) == ([], [])
    want = wcfmt.load_file(packed)
    state = m.state_dict()
    for k, v in want.items():
        assert_bit_equal(state[k], v)
        assert state[k].data_ptr() == before[k], f"{k} was not filled in place"
    assert m.head.weight is m.embed.weight  # the tie survives
    assert torch.equal(m.scratch, torch.zeros(3))  # non-persistent buffers are not the file's


def test_other_dtype_matches_load_state_dict_cast(packed: Path) -> None:
    m = Tiny(dtype=torch.float32)
    assert wcfmt.load_model(m, packed) == ([], [])
    want = wcfmt.load_state_dict(packed)
    for k, v in m.state_dict().items():
        if k in want:
            assert_bit_equal(v, want[k].to(torch.float32))


def test_non_contiguous_parameter_gets_a_copy(packed: Path) -> None:
    m = Tiny()
    m.proj.weight = torch.nn.Parameter(torch.zeros(32, 48, dtype=torch.bfloat16).t())  # a strided view
    assert not m.proj.weight.is_contiguous()
    wcfmt.load_model(m, packed)
    assert_bit_equal(m.proj.weight.detach(), wcfmt.load_file(packed)["proj.weight"])


def test_missing_and_unexpected_as_safetensors_counts_them(packed: Path, tmp_path: Path) -> None:
    extra = {k: (v.decode() if isinstance(v, wcfmt.ClusteredTensor) else v) for k, v in source_tensors().items()}
    del extra["scale"]
    extra["stray"] = torch.ones(2, dtype=torch.bfloat16)
    p, st = tmp_path / "odd.wclust", tmp_path / "odd.safetensors"
    wcfmt.save_file(extra, p)
    safetensors.torch.save_file({k: v.contiguous() for k, v in extra.items()}, st)

    want = safetensors.torch.load_model(Tiny(), st, strict=False)
    m = Tiny()
    m.scale.fill_(7)
    got = wcfmt.load_model(m, p, strict=False)
    assert (sorted(got[0]), sorted(got[1])) == (sorted(want[0]), sorted(want[1])) == (["scale"], ["stray"])
    assert torch.equal(m.scale, torch.full((48,), 7.0, dtype=torch.bfloat16))  # missing: left as it was
    assert_bit_equal(m.proj.bias.detach(), extra["proj.bias"])


def test_strict_mismatch_raises_before_writing(tmp_path: Path) -> None:
    part = {k: v for k, v in source_tensors().items() if k != "scale"}
    p = tmp_path / "part.wclust"
    wcfmt.save_file(part, p)
    m = Tiny()
    keep = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(UsageError, match=r"part\.wclust.*missing 1: scale"):
        wcfmt.load_model(m, p)
    for k, v in m.state_dict().items():
        assert torch.equal(v, keep[k]), f"{k} changed although loading failed"


def test_shape_mismatch_is_an_error_even_when_not_strict(packed: Path) -> None:
    class Wide(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(32, 50, dtype=torch.bfloat16)

    m = Wide()
    keep = m.proj.weight.detach().clone()
    with pytest.raises(UsageError, match=r"proj\.weight: \[48, 32\] in the file, \[50, 32\] in the model"):
        wcfmt.load_model(m, packed, strict=False)
    assert torch.equal(m.proj.weight.detach(), keep)


def test_untied_model_gets_the_shared_values_in_both(tmp_path: Path) -> None:
    # The file stores the head as an alias of the embedding; an untied model receives it twice.
    t = source_tensors()
    t["head.weight"] = t["embed.weight"]
    p = tmp_path / "tied.wclust"
    wcfmt.save_file(t, p)
    m = Tiny(tie=False)
    assert wcfmt.load_model(m, p) == ([], [])
    assert torch.equal(m.head.weight, m.embed.weight) and m.head.weight is not m.embed.weight
    assert_bit_equal(m.head.weight.detach(), wcfmt.load_file(p)["embed.weight"])


def test_packed_folder_and_bad_arguments(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    dense = {k: (v.decode() if isinstance(v, wcfmt.ClusteredTensor) else v) for k, v in source_tensors().items()}
    safetensors.torch.save_file(dense, src / "model.safetensors")
    dst = tmp_path / "packed"
    report = wcfmt.pack(src, dst, k=16, include=[r"weight$"])
    assert report.clustered >= 2
    m = Tiny()
    assert wcfmt.load_model(m, dst) == ([], [])
    want = wcfmt.load_state_dict(dst)
    for k, v in want.items():
        assert_bit_equal(m.state_dict()[k], v)

    with pytest.raises(UsageError, match="torch.nn.Module"):
        wcfmt.load_model({"a": torch.ones(1)}, dst)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        wcfmt.load_model(Tiny(), tmp_path / "nothing.wclust")
    with torch.device("meta"):
        ghost = Tiny()
    with pytest.raises(UsageError, match="meta device"):
        wcfmt.load_model(ghost, dst)


def test_load_tensors_into_fills_the_fitting_tensors_themselves(packed: Path) -> None:
    from wcfmt.reader import WclustReader
    from wcfmt.rebuild.stream import load_tensors

    dests = {
        "embed.weight": torch.empty(64, 32, dtype=torch.float32),  # clustered: any float dtype fits
        "proj.weight": torch.empty(32, 48, dtype=torch.bfloat16).t(),  # not contiguous: a new tensor
        "proj.bias": torch.empty(48, dtype=torch.bfloat16),  # lossless, stored dtype: fits
        "scale": torch.empty(48, dtype=torch.float16),  # lossless, another float dtype: converted chunk by chunk
    }
    with WclustReader(packed) as r:
        got = load_tensors(r, into=dests)
    want = wcfmt.load_file(packed)
    for name, same in [("embed.weight", True), ("proj.weight", False), ("proj.bias", True), ("scale", True)]:
        assert (got[name].data_ptr() == dests[name].data_ptr()) is same, name
        assert_bit_equal(got[name], want[name].to(got[name].dtype))


def test_tied_model_keeps_the_last_key_as_load_state_dict_does(tmp_path: Path) -> None:
    # The file holds the embedding and the head as two different tensors; the model ties them.
    t = {k: (v.decode() if isinstance(v, wcfmt.ClusteredTensor) else v) for k, v in source_tensors().items()}
    t["head.weight"] = heavy_tailed((64, 32), seed=9)
    p = tmp_path / "untied.wclust"
    wcfmt.save_file(t, p)
    m, ref = Tiny(), Tiny()
    ref.load_state_dict(wcfmt.load_file(p))  # torch's own order of copies
    assert wcfmt.load_model(m, p) == ([], [])
    assert m.head.weight is m.embed.weight
    assert_bit_equal(m.embed.weight.detach(), ref.embed.weight.detach())
    assert_bit_equal(m.embed.weight.detach(), t["head.weight"])


def test_load_tensors_into_respects_a_requested_dtype(packed: Path) -> None:
    from wcfmt.reader import WclustReader
    from wcfmt.rebuild.stream import load_tensors

    dest = torch.empty(64, 32, dtype=torch.bfloat16)
    with WclustReader(packed) as r:
        got = load_tensors(r, ["embed.weight"], dtype=torch.float32, into={"embed.weight": dest})
    assert got["embed.weight"].dtype == torch.float32 and got["embed.weight"].data_ptr() != dest.data_ptr()


def test_empty_tensors_are_not_tied_to_each_other(tmp_path: Path) -> None:
    m = torch.nn.Module()
    m.register_buffer("a", torch.empty(0, 4))
    m.register_buffer("b", torch.empty(0, 4))
    p = tmp_path / "e.wclust"
    wcfmt.save_file({"a": torch.empty(0, 4)}, p)
    want = safetensors.torch.load_model(m, _as_safetensors({"a": torch.empty(0, 4)}, tmp_path), strict=False)
    assert wcfmt.load_model(m, p, strict=False) == (["b"], []) == (sorted(want[0]), sorted(want[1]))


def _as_safetensors(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    p = folder / "same.safetensors"
    safetensors.torch.save_file(tensors, p)
    return p
