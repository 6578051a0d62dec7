"""Structure-aware fuzzing (issue #11 item 5): hypothesis mutates valid files where a reader makes
decisions — header values and keys, blob references (offset, length, encoding, CRC), blob
contents with their CRC fixed up, zstd frame headers and blocks, the preamble — and then wcfmt
and the reference decoder (`spec/reference/wclust_ref.py`) read the result. wcfmt must either
return exactly the reference decoder's tensors or raise a `wcfmt.WclustError` subclass where the
reference decoder rejects the file too; never another exception, never a hang. (The error
classes may differ on a file with several faults: spec §9.4 lets wcfmt check every chunk's
declared sizes before decoding any, so it may report a later fault first. Such cases are counted
in `CLASS_DIFFERS`, and `tools/fuzz.py` reports them; the conformance vectors, one fault each,
pin the classes.)

Budget: the ``ci`` profile (default) runs a few seconds per test. ``WCFMT_FUZZ=long`` runs the
same tests with a large example count; ``tools/fuzz.py --minutes 30`` runs them for a set time
and counts the cases. A file that fails is saved under ``tests/fuzz_regressions/`` (by
``tools/fuzz.py``, or by hand from hypothesis' report) and `test_regressions` replays it forever.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import tempfile
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import reference_decoder
import wcfmt
from wcfmt.inspect import verify

ROOT = Path(__file__).resolve().parent.parent
VALID = ROOT / "spec" / "vectors" / "valid"
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
#: Decoded-bytes cap for both decoders: mutated shapes may describe terabytes (spec §9.1).
CAP = 8 << 20

_COMMON = dict(
    deadline=timedelta(seconds=20),  # a hang, not a slow machine: every case is a few kB
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("wcfmt-fuzz-ci", max_examples=300, **_COMMON)
settings.register_profile("wcfmt-fuzz-long", max_examples=1_000_000_000, **_COMMON)
PROFILE = "wcfmt-fuzz-long" if os.environ.get("WCFMT_FUZZ") == "long" else "wcfmt-fuzz-ci"
FUZZ_SETTINGS = settings.get_profile(PROFILE)


ref = reference_decoder()
SEEDS = {p.name: p.read_bytes() for p in sorted(VALID.glob("*.wclust"))}
PRE = struct.Struct("<8sHHIQQI28s")


# -- the oracle -------------------------------------------------------------------------------------
def ref_outcome(path: Path) -> tuple[str, Any]:
    try:
        d = ref.decode_file(str(path), max_bytes=CAP)
    except ref.FormatError as e:
        return "error", type(e).__name__
    except MemoryError:
        return "error", "limit"
    return "ok", [(n, t.dtype, list(t.shape), hashlib.sha256(t.data).hexdigest()) for n, t in d.tensors.items()]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def wcfmt_outcome(path: Path, use_mmap: bool = True) -> tuple[str, Any]:
    """Whole-file load, verify and random access; any exception but a WclustError propagates."""
    try:
        got = wcfmt.load_file(path, max_bytes=CAP)
    except wcfmt.UsageError:
        return "error", "limit"
    except wcfmt.WclustError as e:
        kind = type(e).__name__
        with pytest.raises(wcfmt.WclustError):  # verify refuses it too (its first fault may be another)
            verify(path, max_bytes=CAP)
        return "error", kind
    verify(path, max_bytes=CAP)
    out = []
    with wcfmt.safe_open(path, use_mmap=use_mmap, max_bytes=CAP) as f:
        assert f.keys() == list(got)
        for n, t in got.items():
            sl = f.get_slice(n)
            out.append((n, sl.get_dtype(), list(t.shape), _digest(t)))
            if t.dim() and t.shape[0] > 1:  # a row range decodes only its chunks; same bits
                a, b = t.shape[0] // 3, t.shape[0] - 1
                assert _digest(sl[a:b]) == _digest(t[a:b]), n
    return "ok", out


CLASS_DIFFERS: dict[tuple[str, str], int] = {}  # (wcfmt's class, the reference's) -> count


def check_file(path: Path, use_mmap: bool = True) -> tuple[str, Any]:
    want = ref_outcome(path)
    have = wcfmt_outcome(path, use_mmap)
    assert have[0] == want[0], f"wcfmt {have if have[0] == 'error' else 'ok'} / reference {want if want[0] == 'error' else 'ok'}"
    if have[0] == "ok":
        assert have == want, "wcfmt and the reference decoder read different tensors"
    elif have != want:
        CLASS_DIFFERS[(have[1], want[1])] = CLASS_DIFFERS.get((have[1], want[1]), 0) + 1
    return have


# -- file surgery -----------------------------------------------------------------------------------
class Parts:
    """A file as preamble fields, data section (bytes [0, header_offset)) and header object."""

    def __init__(self, raw: bytes) -> None:
        _, self.major, self.minor, self.flags, h_off, h_len, _, _ = PRE.unpack_from(raw)
        self.data = bytearray(raw[:h_off])
        self.header: Any = json.loads(raw[h_off : h_off + h_len])
        self.header_bytes: bytes | None = None  # set: written as is (a mutation of the text)
        self.crc_delta = 0  # nonzero: a wrong header CRC
        self.tail = b""  # bytes after the header (trailing garbage)

    def blobs(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if {"offset", "length", "encoding", "crc32"} <= set(node):
                    out.append(node)
                else:
                    for v in node.values():
                        walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(self.header.get("tensors") if isinstance(self.header, dict) else None)
        return out

    def stored(self, b: dict[str, Any]) -> bytes:
        o, n = b.get("offset"), b.get("length")
        if not (isinstance(o, int) and isinstance(n, int)) or o < 0 or n < 0:
            return b""
        return bytes(self.data[o : o + n])

    def put(self, b: dict[str, Any], payload: bytes, fix_crc: bool = True) -> None:
        """Store ``payload`` as the blob's bytes: in place if it fits before the next blob, else appended."""
        o = b.get("offset")
        n = b.get("length")
        room = 0
        if isinstance(o, int) and isinstance(n, int) and 64 <= o <= len(self.data):
            starts = [x["offset"] for x in self.blobs() if isinstance(x.get("offset"), int) and x["offset"] > o
                      and x.get("length")]  # fmt: skip
            room = min(starts, default=len(self.data)) - o
            self.data[o : o + max(0, min(n, len(self.data) - o))] = bytes(max(0, min(n, len(self.data) - o)))
        if room > 0 and len(payload) <= room:  # room > 0: ``o`` is a usable offset (an empty payload too)
            self.data[o : o + len(payload)] = payload
        else:
            self.data += bytes(-len(self.data) % 64)
            b["offset"] = len(self.data)
            self.data += payload
        b["length"] = len(payload)
        if fix_crc:
            b["crc32"] = zlib.crc32(payload)

    def build(self) -> bytes:
        body = bytes(self.data) + bytes(-len(self.data) % 64)
        if len(body) < 64:
            body += bytes(64 - len(body))
        raw = self.header_bytes
        if raw is None:
            raw = json.dumps(self.header, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
        crc = (zlib.crc32(raw) ^ self.crc_delta) & 0xFFFFFFFF
        head = PRE.pack(b"\x89WCLUST\n", self.major, self.minor, self.flags, len(body), len(raw), crc, bytes(28))
        return head + body[64:] + raw + self.tail


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, path + (i,))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        node = node[k]
    return node


INTS = [0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 63, 64, 65, 128, 255, 256, 257, 4096, 2**16, 2**31 - 1, 2**31,
        2**32 - 1, 2**32, 2**53 - 1, 2**53, 2**62, 2**63 - 1, 2**63, 2**64, -1, -64]  # fmt: skip
WORDS = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3",
         "F8_E5M2", "clustered", "lossless", "alias", "raw", "zstd", "float_planes", "byte_planes", "vq", "",
         "é" * 257, "x"]  # fmt: skip
OTHERS: list[Any] = [None, True, False, 1.5, 40.0, -0.0, 1e300, float("nan"), float("inf"), [], {}, [1], {"a": 1},
                     [16, 8], [0], [2**53], [1] * 9]  # fmt: skip


@st.composite
def new_value(draw: st.DrawFn, old: Any, names: list[str]) -> Any:
    kind = draw(st.sampled_from(["near", "int", "word", "other", "name"] if isinstance(old, int) and not isinstance(old, bool)
                                else ["int", "word", "other", "name"]))  # fmt: skip
    if kind == "near":
        return draw(st.sampled_from([old + 1, old - 1, old * 2, old // 2, old + 64, old - 64, old + 2, old ^ 1]))
    if kind == "int":
        return draw(st.sampled_from(INTS))
    if kind == "word":
        return draw(st.sampled_from(WORDS))
    if kind == "name":
        return draw(st.sampled_from(names)) if names else "x"
    return copy.deepcopy(draw(st.sampled_from(OTHERS)))


def _decoded(p: Parts, b: dict[str, Any]) -> bytes:
    data = p.stored(b)
    if b.get("encoding") == "zstd":
        try:  # a mutated frame may declare any size: python-zstandard allocates what it declares
            if not 0 <= zstandard.frame_content_size(data) <= 1 << 20:
                return data
            return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 20)
        except zstandard.ZstdError:
            return data
    return data


@st.composite
def mutation(draw: st.DrawFn, p: Parts) -> str:
    """Apply one structured mutation to ``p``; return its description (for the failure report)."""
    blobs = p.blobs()
    tensors = p.header.get("tensors") if isinstance(p.header, dict) else None
    names = [n for n in tensors if isinstance(n, str)] if isinstance(tensors, dict) else []
    kinds = ["header_value", "header_delete", "header_add", "preamble", "text"]
    if blobs:
        kinds += ["blob_field", "blob_field", "blob_bytes", "blob_bytes", "blob_payload", "zstd_frame", "zstd_frame"]
    kind = draw(st.sampled_from(kinds))
    if kind == "header_value":
        path = draw(st.sampled_from(_paths(p.header)[1:] or [()]))
        if not path:
            return "noop"
        parent = _get(p.header, path[:-1])
        parent[path[-1]] = draw(new_value(parent[path[-1]], names))
        return f"set {path}"
    if kind == "header_delete":
        path = draw(st.sampled_from(_paths(p.header)[1:] or [()]))
        if not path:
            return "noop"
        del _get(p.header, path[:-1])[path[-1]]
        return f"delete {path}"
    if kind == "header_add":
        dicts = [q for q in _paths(p.header) if isinstance(_get(p.header, q), (dict, list))]
        path = draw(st.sampled_from(dicts))
        node = _get(p.header, path)
        if isinstance(node, dict):
            key = draw(st.sampled_from(["surprise", "k", "offset", "dtype", "target", "quality", "planes", "x" * 3]))
            node[key] = draw(new_value(0, names))
            return f"add {path}.{key}"
        if node:
            node.append(copy.deepcopy(node[draw(st.integers(0, len(node) - 1))]))
        else:
            node.append(draw(new_value(0, names)))
        return f"append to {path}"
    if kind == "preamble":
        field = draw(st.sampled_from(["minor", "minor", "crc", "flags", "tail", "major"]))
        if field == "minor":
            p.minor = draw(st.sampled_from([1, 2, 0xFFFF]))
        elif field == "crc":
            p.crc_delta = draw(st.sampled_from([1, 0x80000000]))
        elif field == "flags":
            p.flags = 1
        elif field == "major":
            p.major = draw(st.sampled_from([0, 2]))
        else:
            p.tail = draw(st.sampled_from([b"\x00", bytes(64)]))
        return f"preamble {field}"
    if kind == "text":  # the header's bytes themselves: JSON syntax and §3.4 edges
        raw = json.dumps(p.header, separators=(",", ":"), ensure_ascii=False).encode()
        op = draw(st.sampled_from(["cut", "byte", "bom", "dup", "escape", "space"]))
        if op == "cut":
            raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
        elif op == "byte":
            i = draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + bytes([draw(st.sampled_from([0x00, 0x22, 0x2C, 0x5C, 0x7B, 0x7D, 0x80, 0xFF]))]) + raw[i + 1 :]
        elif op == "bom":
            raw = b"\xef\xbb\xbf" + raw
        elif op == "dup":
            raw = raw.replace(b'{"', b'{"producer":"d","', 1) if draw(st.booleans()) else raw.replace(b',"', b',"k":1,"', 1)
        elif op == "escape":
            raw = raw.replace(b'"F', b'"\\u0046', 1) if draw(st.booleans()) else raw.replace(b'"x', b'"\\ud800', 1)
        else:
            raw = b" \n" + raw + b"\t "
        p.header_bytes = raw
        return f"text {op}"
    b = draw(st.sampled_from(blobs))
    if kind == "blob_field":
        key = draw(st.sampled_from(["offset", "offset", "length", "length", "crc32", "encoding"]))
        others = [x.get("offset") for x in blobs if isinstance(x.get("offset"), int)]
        if key == "offset":
            b["offset"] = draw(st.sampled_from(others + [0, 64, len(p.data), len(p.data) + 64]
                                               + ([b["offset"] + 64, b["offset"] - 64] if isinstance(b.get("offset"), int) else [])))  # fmt: skip
        elif key == "length":
            n = b.get("length") if isinstance(b.get("length"), int) else 0
            b["length"] = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 64, 2 * n, 2**32]))
        elif key == "crc32":
            crc = b.get("crc32") if isinstance(b.get("crc32"), int) else 0
            b["crc32"] = draw(st.sampled_from([0, 2**32 - 1, crc ^ 1]))
        else:
            b["encoding"] = "raw" if b.get("encoding") == "zstd" else "zstd"
        if draw(st.booleans()):  # the CRC follows the bytes the new reference covers
            data = p.stored(b)
            if isinstance(b.get("length"), int) and len(data) == b["length"]:
                b["crc32"] = zlib.crc32(data)
        return f"blob {key}"
    if kind == "blob_bytes":  # a change inside the stored bytes, CRC fixed: the data checks must catch it
        data = bytearray(p.stored(b))
        if not data:
            return "noop"
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.sampled_from([data[i] ^ 0x01, data[i] ^ 0x80, data[i] ^ 0xFF, 0x00, 0xFF, 0x7C, 0xFC, 0x3C]))
        p.put(b, bytes(data))
        return "blob bytes"
    if kind == "blob_payload":  # new contents of the right or wrong size, raw or zstd
        plane = _decoded(p, b)
        op = draw(st.sampled_from(["zstd", "raw", "grow", "shrink", "random", "empty", "zstd_nosize", "zstd_big"]))
        if op == "grow":
            plane = plane + b"\x00"
        elif op == "shrink":
            plane = plane[:-1]
        elif op == "random":
            plane = draw(st.binary(min_size=len(plane), max_size=len(plane)))
        elif op == "empty":
            plane = b""
        if op.startswith("zstd"):
            cctx = zstandard.ZstdCompressor(level=1, write_content_size=op != "zstd_nosize")
            payload = cctx.compress(plane + (bytes(1 << 16) if op == "zstd_big" else b""))
            p.put(b, payload)
            b["encoding"] = "zstd"
        else:
            p.put(b, plane)
            if op != "random":
                b["encoding"] = "raw"
        return f"payload {op}"
    # zstd_frame: a frame (the blob's own, or the blob's plane compressed) with one header or block field changed
    frame = p.stored(b) if b.get("encoding") == "zstd" else zstandard.ZstdCompressor(level=3).compress(_decoded(p, b))
    frame = bytearray(frame)
    if len(frame) < 6:
        return "noop"
    op = draw(st.sampled_from(["fhd", "window", "fcs", "block", "magic", "append", "skippable", "checksum"]))
    if op == "fhd":
        frame[4] ^= draw(st.sampled_from([0x01, 0x02, 0x04, 0x08, 0x20, 0x40, 0x80, 0xC0]))
    elif op == "window":
        frame[5] = draw(st.integers(0, 255))
    elif op == "fcs":
        i = draw(st.integers(5, min(len(frame) - 1, 13)))
        frame[i] ^= draw(st.sampled_from([0x01, 0x80, 0xFF]))
    elif op == "block":
        i = draw(st.integers(5, len(frame) - 1))
        frame[i] ^= draw(st.sampled_from([0x01, 0x02, 0x04, 0x06, 0x08, 0x80]))
    elif op == "magic":
        frame[0] ^= 0x01
    elif op == "append":
        frame += draw(st.sampled_from([b"\x00", bytes(4), bytes(zstandard.ZstdCompressor().compress(b""))]))
    elif op == "skippable":
        frame = bytearray(struct.pack("<II", 0x184D2A50, 2) + b"ab") + frame
    else:
        frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(_decoded(p, b)))
        frame[-1] ^= draw(st.sampled_from([0, 1]))
    p.put(b, bytes(frame))
    b["encoding"] = "zstd"
    return f"zstd {op}"


class Case:
    """A mutated file; its repr (what hypothesis prints for a failure) is short."""

    def __init__(self, seed: str, data: bytes, steps: list[str]) -> None:
        self.seed, self.data, self.steps = seed, data, steps

    def __repr__(self) -> str:
        return f"Case({self.seed!r}, {len(self.data)} bytes sha256 {hashlib.sha256(self.data).hexdigest()[:16]}, {self.steps})"


@st.composite
def mutated_file(draw: st.DrawFn, seeds: dict[str, bytes] = SEEDS) -> Case:
    name = draw(st.sampled_from(sorted(seeds)))
    p = Parts(seeds[name])
    steps = [draw(mutation(p)) for _ in range(draw(st.integers(1, 3)))]
    return Case(name, p.build(), steps)


# -- the tests --------------------------------------------------------------------------------------
_SCRATCH = Path(tempfile.mkdtemp(prefix="wcfmt-fuzz-"))
CASES = {"n": 0}  # counted for tools/fuzz.py


def _write(data: bytes) -> Path:
    path = _SCRATCH / "case.wclust"
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


def fuzz_one(case: Case, use_mmap: bool) -> tuple[str, Any]:
    CASES["n"] += 1
    path = _write(case.data)
    try:
        return check_file(path, use_mmap)
    except BaseException as e:
        _save_failure(case.data, case.seed)
        e.add_note(f"{case!r}; saved under $WCFMT_FUZZ_SAVE when set (tools/fuzz.py sets it)")
        raise


def _save_failure(data: bytes, name: str) -> None:
    folder = os.environ.get("WCFMT_FUZZ_SAVE")
    if folder:  # tools/fuzz.py sets it: every failing file is kept for tests/fuzz_regressions/
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{hashlib.sha256(data).hexdigest()[:16]}-{name}").write_bytes(data)


@FUZZ_SETTINGS
@given(case=mutated_file(), use_mmap=st.booleans())
def test_structured_mutations(case: Case, use_mmap: bool) -> None:
    fuzz_one(case, use_mmap)


def test_seeds_are_valid() -> None:
    for name, data in SEEDS.items():
        assert check_file(_write(data))[0] == "ok", name


def test_mutations_reach_every_outcome() -> None:
    """The mutator is not a no-op: over a fixed sample, files read, and each error class occurs."""
    seen: dict[str, int] = {}

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=mutated_file())
    def sample(case: Case) -> None:
        kind, what = fuzz_one(case, True)
        key = "ok" if kind == "ok" else what
        seen[key] = seen.get(key, 0) + 1

    sample()
    assert {"ok", "FormatError", "HeaderError", "ChecksumError", "VersionError"} <= set(seen), seen


def test_regressions() -> None:
    """Files the fuzzer once broke wcfmt with (``tests/fuzz_regressions/*.wclust``, copied there
    from ``tools/fuzz.py --save``) read as the reference decoder reads them. Findings that break
    a spec rule become conformance vectors instead (tools/make_vectors.py): the first one did,
    `zstd_empty_frame_incomplete` and `zstd_empty_frame_holds_bytes`. ``ref_dtype_is_a_*``: the
    reference decoder raised TypeError on a non-string dtype (found by the first long run)."""
    found = sorted(REGRESSIONS.glob("*.wclust"))
    assert len(found) >= 2
    for path in found:
        check_file(path)
        check_file(path, use_mmap=False)
    assert (VALID.parent / "invalid" / "zstd_empty_frame_incomplete.wclust").exists()
