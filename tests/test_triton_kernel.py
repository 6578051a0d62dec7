"""The device rebuilds — Triton kernel and plain-torch fallback — against the numpy reference, bit for bit.

The Triton kernel runs in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set before
Triton is imported; the kernel is defined per interpreter setting, so the order of test modules
does not matter). It is also compiled ahead of time for a CUDA target, which needs no GPU and
checks what the interpreter does not: that the real compiler accepts the kernel. Tests that
need a GPU are marked ``cuda`` and skipped without one.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from wcfmt.codecs.bitpack import pack_labels  # noqa: E402
from wcfmt.constants import label_bits_for_k  # noqa: E402
from wcfmt.dtypes import from_numpy, to_numpy, torch_dtype  # noqa: E402
from wcfmt.rebuild.backend import ChunkSpec, triton_available  # noqa: E402
from wcfmt.rebuild.reference import centroids_as, rebuild_chunk  # noqa: E402
from wcfmt.rebuild.torch_gather import rebuild_chunks_torch  # noqa: E402

DTYPES = ("BF16", "F16", "F32")
KS = (1, 2, 3, 16, 32, 64, 256)
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable here")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def batch(ks: list[int], rows: int, row_size: int, chunk_rows: int, dtype: str, seed: int):  # type: ignore[no-untyped-def]
    """One tensor's chunks as a batch: (packed, tables, specs, expected flat storage values).

    ``ks`` gives K per chunk (cycled). Every label value appears in a chunk that is big enough.
    """
    g = np.random.default_rng(seed)
    planes, tables, specs, want = [], [], [], []
    lab_at = tab_at = 0
    for c, a in enumerate(range(0, rows, chunk_rows)):
        k = ks[c % len(ks)]
        count = (min(a + chunk_rows, rows) - a) * row_size
        labels = g.integers(0, k, count, dtype=np.uint8)
        labels[: min(k, count)] = np.arange(min(k, count), dtype=np.uint8)
        g.shuffle(labels)
        f16 = np.sort(g.choice(np.unique((g.standard_t(3, 4 * k + 8) * 0.05).astype("<f2")), k, replace=False))
        table = centroids_as(f16.astype("<f2"), dtype)
        bits = label_bits_for_k(k)
        packed = pack_labels(labels, bits)
        specs.append(ChunkSpec(lab_at, a * row_size, count, bits, tab_at))
        planes.append(packed)
        tables.append(table)
        want.append(rebuild_chunk(packed, bits, count, table))
        lab_at += packed.size
        tab_at += table.size
    packed = torch.from_numpy(np.concatenate(planes + [np.zeros(0, np.uint8)]))
    tables_t = from_numpy(np.concatenate(tables), dtype)
    return packed, tables_t, specs, np.concatenate(want)


CASES = [
    # (K per chunk, rows, row size, chunk rows): chunk rows that do and do not divide the rows
    *[([k], 6, 37, 3) for k in KS],  # uniform K: label width is a compile-time constant
    *[([k], 7, 19, 3) for k in KS],
    ([1, 2, 3, 16, 32, 64, 256], 7, 11, 1),  # one K per chunk: label width read per chunk
    ([256, 3], 5, 1, 2),
    ([2], 1, 1, 4),
]


def run(fn, packed, tables, specs, dtype, **kw):  # type: ignore[no-untyped-def]
    n = max((s.out_offset + s.count for s in specs), default=0)
    out = torch.full((n,), -1, dtype=torch_dtype(dtype)).view(torch.uint8).fill_(0xA5).view(torch_dtype(dtype))
    fn(packed, tables, specs, out, **kw)
    return to_numpy(out)


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("ks", "rows", "row_size", "chunk_rows"), CASES)
def test_torch_gather_matches_reference(ks: list[int], rows: int, row_size: int, chunk_rows: int, dtype: str) -> None:
    packed, tables, specs, want = batch(ks, rows, row_size, chunk_rows, dtype, seed=sum(ks) + rows)
    assert_same_bits(run(rebuild_chunks_torch, packed, tables, specs, dtype), want)


def test_torch_gather_steps_through_long_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from wcfmt.rebuild import torch_gather

    monkeypatch.setattr(torch_gather, "_STEP", 10)  # several steps per chunk, some not a byte multiple
    for k in (2, 3, 16, 256):
        packed, tables, specs, want = batch([k], 5, 13, 2, "BF16", seed=k)
        assert_same_bits(run(rebuild_chunks_torch, packed, tables, specs, "BF16"), want)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("ks", "rows", "row_size", "chunk_rows"), CASES)
def test_triton_matches_reference(ks: list[int], rows: int, row_size: int, chunk_rows: int, dtype: str) -> None:
    from wcfmt.rebuild.triton_kernel import rebuild_chunks_triton

    packed, tables, specs, want = batch(ks, rows, row_size, chunk_rows, dtype, seed=sum(ks) + rows)
    assert_same_bits(run(rebuild_chunks_triton, packed, tables, specs, dtype, block=64), want)


@needs_triton
def test_triton_with_meta_tensor_and_split_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    from wcfmt.rebuild import triton_kernel

    monkeypatch.setattr(triton_kernel, "_MAX_CHUNKS_PER_LAUNCH", 2)  # 5 chunks -> 3 launches
    packed, tables, specs, want = batch([3, 256, 16], 5, 9, 1, "F32", seed=5)
    meta = torch.tensor([list(s) for s in specs], dtype=torch.int64)
    got = run(triton_kernel.rebuild_chunks_triton, packed, tables, specs, "F32", meta=meta, block=32)
    assert_same_bits(got, want)
    with pytest.raises(ValueError, match="meta"):
        run(triton_kernel.rebuild_chunks_triton, packed, tables, specs, "F32", meta=meta[:2], block=32)
    with pytest.raises(ValueError, match="width"):
        triton_kernel.rebuild_chunks_triton(packed, tables, specs, torch.empty(5 * 9, dtype=torch.bfloat16))


@needs_triton
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("bits", [-1, 8])
def test_triton_compiles_for_cuda_ahead_of_time(bits: int) -> None:
    """The real compiler (not the interpreter) accepts the kernel; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from wcfmt.rebuild.triton_kernel import _kernel

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        kernel = _kernel()
    finally:
        os.environ["TRITON_INTERPRET"] = old if old is not None else ""
    sig = {"packed_ptr": "*u8", "tables_ptr": "*i16", "meta_ptr": "*i64", "out_ptr": "*i16",
           "BITS": "constexpr", "BLOCK": "constexpr"}
    try:
        compiled = triton.compile(ASTSource(kernel, sig, constexprs={"BITS": bits, "BLOCK": 1024}),
                                  target=GPUTarget("cuda", 90, 32))
    except RuntimeError as e:  # pragma: no cover - a Triton build without the NVIDIA toolchain
        if "ptxas" in str(e) or "not found" in str(e):
            pytest.skip(f"no CUDA toolchain in this Triton build: {e}")
        raise
    assert "ld.global" in compiled.asm["ptx"] and "st.global" in compiled.asm["ptx"]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(backend: str, dtype: str) -> None:
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not importable here")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        if backend == "triton":
            from wcfmt.rebuild.triton_kernel import rebuild_chunks_triton as fn
        else:
            fn = rebuild_chunks_torch
        for ks, rows, row_size, chunk_rows in CASES + [([32], 3000, 4096, 512), ([16], 1000, 999, 7)]:
            packed, tables, specs, want = batch(ks, rows, row_size, chunk_rows, dtype, seed=rows)
            n = rows * row_size
            out = torch.empty(n, dtype=torch_dtype(dtype), device="cuda")
            fn(packed.cuda(), tables.cuda(), specs, out)
            assert_same_bits(to_numpy(out.cpu()), want)
    finally:
        os.environ["TRITON_INTERPRET"] = old if old is not None else ""
