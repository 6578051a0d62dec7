"""The JSON header's shape (spec §4). `spec/header.schema.json` is generated from these models.

This module is the only place the header's fields are defined. Validation here is structural
(types, ranges, codec-specific rules); checks that need the file (offsets against its size,
overlaps) live in `reader.py`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from .constants import (
    ALIGNMENT,
    CODEC_CLUSTERED,
    CODEC_LOSSLESS,
    ENCODING_RAW,
    ENCODING_ZSTD,
    MAX_K,
    MAX_NDIM,
    label_bits_for_k,
)
from .dtypes import CLUSTERABLE, DTYPES, FLOAT_PLANES, itemsize

__all__ = [
    "Blob",
    "ClusteredChunk",
    "LosslessChunk",
    "ClusteredEntry",
    "LosslessEntry",
    "AliasEntry",
    "TensorEntry",
    "PackSettings",
    "Header",
    "json_schema",
    "parse_header",
    "serialize_header",
    "rows_and_row_size",
    "chunk_row_ranges",
]

DTypeName = Literal[tuple(DTYPES)]  # type: ignore[valid-type]
_U64 = Annotated[int, Field(ge=0, lt=2**63)]
#: A tensor's shape and a chunk's rows (spec §4.2, §5.1, §6.1).
_Shape = Annotated[list[Annotated[int, Field(ge=0, lt=2**53)]], Field(max_length=MAX_NDIM)]
_ChunkRows = Annotated[int, Field(ge=1, lt=2**53)]
#: A tensor's size in bytes is below this (spec §4.2).
_MAX_TENSOR_BYTES = 2**63


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Blob(_Strict):
    """A byte range of the file (spec §4.4): where it is, how it is encoded, its CRC-32."""

    offset: Annotated[int, Field(ge=0, lt=2**63, multiple_of=ALIGNMENT)]
    length: _U64
    encoding: Literal["raw", "zstd"]
    crc32: Annotated[int, Field(ge=0, lt=2**32)]


class ClusteredChunk(_Strict):
    """One row chunk of a clustered tensor (spec §5.2)."""

    k: Annotated[int, Field(ge=1, le=MAX_K)]
    label_bits: Literal[0, 1, 2, 4, 8]
    centroids: Blob
    labels: Blob

    @field_validator("label_bits", mode="before")
    @classmethod
    def _an_integer(cls, v: Any) -> Any:
        # A Literal matches by equality, so false and -0.0 would pass as 0 (spec §3.4: neither is
        # an integer; found by tests/test_fuzz.py)
        if type(v) is not int:
            raise ValueError(f"label_bits must be an integer, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ClusteredChunk":
        want = label_bits_for_k(self.k)
        if self.label_bits != want:
            raise ValueError(f"label_bits is {self.label_bits}, but k={self.k} requires {want}")
        if self.centroids.encoding != "raw" or self.centroids.length != 2 * self.k:
            raise ValueError(f"centroids must be a raw blob of 2*k = {2 * self.k} bytes")
        return self


class LosslessChunk(_Strict):
    """One row chunk of a lossless tensor: one blob per byte plane (spec §6.2)."""

    planes: list[Blob]


class _EntryBase(_Strict):
    dtype: DTypeName
    shape: _Shape

    @model_validator(mode="after")
    def _size_fits(self) -> "_EntryBase":
        # Dimensions are each < 2^53, their product is not: size arithmetic must not overflow
        # 64-bit integers in any reader (spec §4.2).
        if math.prod(self.shape) * itemsize(self.dtype) >= _MAX_TENSOR_BYTES:
            raise ValueError(f"shape {self.shape} of {self.dtype} is 2^63 bytes or more")
        return self


class ClusteredEntry(_EntryBase):
    """A tensor stored as per-row-chunk labels and fp16 centroid tables (spec §5)."""

    model_config = ConfigDict(json_schema_extra=lambda s: s["properties"]["dtype"].update(enum=sorted(CLUSTERABLE)))

    codec: Literal["clustered"]
    chunk_rows: _ChunkRows
    chunks: list[ClusteredChunk]
    #: Optional quality figures measured at encode time (spec §5.6); informative only.
    quality: dict[str, float] | SkipJsonSchema[None] = None


    @model_validator(mode="after")
    def _consistent(self) -> "ClusteredEntry":
        if self.dtype not in CLUSTERABLE:
            raise ValueError(f"dtype {self.dtype} cannot be clustered (allowed: {sorted(CLUSTERABLE)})")
        _check_chunk_count(self.shape, self.chunk_rows, len(self.chunks))
        return self


class LosslessEntry(_EntryBase):
    """A tensor stored bit-exactly as zstd-coded byte planes (spec §6)."""

    # Prose rule §6.1 stated in the schema too (JSON Schema can say it; pydantic cannot).
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"transform": {"const": "float_planes"}}},
            "then": {"properties": {"dtype": {"enum": sorted(FLOAT_PLANES)}}},
        }
    )

    codec: Literal["lossless"]
    transform: Literal["byte_planes", "float_planes"]
    chunk_rows: _ChunkRows
    chunks: list[LosslessChunk]

    @model_validator(mode="after")
    def _consistent(self) -> "LosslessEntry":
        if self.transform == "float_planes" and self.dtype not in ("F64", "F32", "F16", "BF16"):
            raise ValueError(f"transform float_planes is only for float dtypes, not {self.dtype}")
        _check_chunk_count(self.shape, self.chunk_rows, len(self.chunks))
        n = itemsize(self.dtype)
        for i, c in enumerate(self.chunks):
            if len(c.planes) != n:
                raise ValueError(f"chunk {i} has {len(c.planes)} planes, dtype {self.dtype} needs {n}")
        return self


class AliasEntry(_EntryBase):
    """A tensor that shares another tensor's data (tied weights, spec §4.5)."""

    codec: Literal["alias"]
    target: str


TensorEntry = Annotated[Union[ClusteredEntry, LosslessEntry, AliasEntry], Field(discriminator="codec")]


class PackSettings(_Strict):
    """wcfmt's own record of how a file was packed (spec §4.3); informative, not needed to decode."""

    k: int | SkipJsonSchema[None] = None
    chunk_rows: int | SkipJsonSchema[None] = None
    include: list[str] | SkipJsonSchema[None] = None
    exclude: list[str] | SkipJsonSchema[None] = None
    level: int | SkipJsonSchema[None] = None
    method: str | SkipJsonSchema[None] = None
    extra: dict[str, str] = Field(default_factory=dict)



class Header(_Strict):
    """The whole JSON header (spec §4.1)."""

    producer: Annotated[str, Field(max_length=256)]
    metadata: dict[str, str] = Field(default_factory=dict)
    settings: PackSettings | SkipJsonSchema[None] = None
    tensors: dict[Annotated[str, Field(min_length=1)], TensorEntry]
    #: Tensors of a newer-minor file that need what this version does not implement:
    #: name -> what, e.g. "codec 'vq'" or "encoding 'brotli'".
    _unsupported: dict[str, str] = PrivateAttr(default_factory=dict)
    #: The blobs of those tensors whose codec this version knows (spec §10: they take part in the
    #: range and overlap checks of §3.2): (offset, length, "tensor 'name' chunk i labels").
    _unsupported_blobs: list[tuple[int, int, str]] = PrivateAttr(default_factory=list)

    @property
    def unsupported(self) -> dict[str, str]:
        """Tensors skipped because their codec is unknown to this reader (spec §10)."""
        return self._unsupported

    @property
    def unsupported_blobs(self) -> list[tuple[int, int, str]]:
        """The known blobs of the `unsupported` tensors of a known codec (spec §10, §9.4 step 4)."""
        return self._unsupported_blobs

    @model_validator(mode="after")
    def _aliases(self) -> "Header":
        for name, e in self.tensors.items():
            if not name:
                raise ValueError("tensor names must not be empty")
            if isinstance(e, AliasEntry):
                t = self.tensors.get(e.target)
                if t is None:
                    raise ValueError(f"tensor {name!r}: alias target {e.target!r} is not in the file")
                if isinstance(t, AliasEntry):
                    raise ValueError(f"tensor {name!r}: alias target {e.target!r} is itself an alias")
                if t.dtype != e.dtype or t.shape != e.shape:
                    raise ValueError(f"tensor {name!r}: alias dtype/shape differ from target {e.target!r}")
        return self


def rows_and_row_size(shape: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """Return (rows, elements per row): rows are the first dimension (spec §4.6).

    >>> rows_and_row_size([4096, 11008]), rows_and_row_size([7]), rows_and_row_size([])
    ((4096, 11008), (7, 1), (1, 1))
    """
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def chunk_row_ranges(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Return the [start, stop) row range of every chunk (spec §4.6)."""
    return [(a, min(a + chunk_rows, rows)) for a in range(0, rows, chunk_rows)]


def _check_chunk_count(shape: list[int], chunk_rows: int, n_chunks: int) -> None:
    rows, row_size = rows_and_row_size(shape)
    want = 0 if rows * row_size == 0 else -(-rows // chunk_rows)
    if n_chunks != want:
        raise ValueError(f"{n_chunks} chunks, but shape {shape} with chunk_rows {chunk_rows} needs {want}")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(raw: bytes, *, lenient: bool = False) -> Header:
    """Parse and validate header bytes; raise ValueError naming the field on any problem.

    ``lenient`` drops fields this version does not know (a file of a newer minor version,
    spec §10); otherwise unknown fields are errors.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"header is not UTF-8 ({e})") from None
    try:
        data = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_no_constant,
            parse_float=_finite_float, parse_int=_finite_int,
        )
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"header is not valid JSON ({e})") from None
    except ValueError as e:
        raise ValueError(f"header JSON: {e}") from None
    unsupported: dict[str, str] = {}
    blobs: list[tuple[int, int, str]] = []
    if lenient:
        data = _drop_unknown(data, Header)
        original = dict(data["tensors"]) if isinstance(data, dict) and isinstance(data.get("tensors"), dict) else {}
        unsupported = _split_unknown_codecs(data)
        try:
            for name in unsupported:
                blobs += _check_unsupported(name, original[name], original)
        except RecursionError:
            raise ValueError("header is nested too deeply") from None
    try:
        header = Header.model_validate(data)
    except ValidationError as e:
        raise ValueError(_describe(e)) from None
    try:
        _check_scalars(data)  # after unknown fields are dropped: those are ignored whatever they hold
    except RecursionError:
        raise ValueError("header is nested too deeply") from None
    header._unsupported = unsupported
    header._unsupported_blobs = blobs
    return header


def _split_unknown_codecs(data: Any) -> dict[str, str]:
    """Remove tensors that need something this version does not know (a codec, dtype, transform
    or encoding value, spec §10), and aliases of them; return name -> what, e.g. "codec 'vq'"."""
    tensors = data.get("tensors") if isinstance(data, dict) else None
    if not isinstance(tensors, dict):
        return {}
    first = {n: w for n, e in tensors.items() if isinstance(e, dict) and (w := _unknown_value(e)) is not None}
    out = dict(first)
    for n, e in tensors.items():  # aliases of those (an alias of an alias stays an error)
        # a non-string target is not looked up: validation then rejects it (HeaderError), not TypeError
        if isinstance(e, dict) and e.get("codec") == "alias" and isinstance(e.get("target"), str) \
                and e["target"] in first:
            out[n] = first[e["target"]]
    data["tensors"] = {n: e for n, e in tensors.items() if n not in out}
    return out


_STRICT = ConfigDict(strict=True)
_SHAPE = TypeAdapter(_Shape, config=_STRICT)
_CHUNK_ROWS = TypeAdapter(_ChunkRows, config=_STRICT)
_QUALITY = TypeAdapter(dict[str, float], config=_STRICT)


def _validated(validator: Any, value: Any, what: str) -> Any:
    """``validator`` (a model or a TypeAdapter) applied to ``value``; ValueError naming ``what``."""
    try:
        return validator.validate_python(value) if isinstance(validator, TypeAdapter) else validator.model_validate(value)
    except ValidationError as e:
        raise ValueError(f"{what}: {_describe(e)}") from None


def _check_unsupported(name: str, e: dict[str, Any], tensors: dict[str, Any]) -> list[tuple[int, int, str]]:
    """Validate the known fields of an entry that needs an unknown value (spec §10): every rule
    that does not depend on that value applies, with the models' own field rules. An unknown
    codec's entry is `dtype`, `shape` and `codec` (its other fields are unknown, so ignored); an
    unknown dtype skips the rules that need its element size; a blob of unknown encoding is
    checked as if raw, and a centroid table of unknown encoding skips "raw, 2*k bytes". Return
    the entry's blobs (none for an unknown codec: which of its fields are blobs is unknown).
    Raise ValueError on a fault."""
    w = f"tensor {name!r}"
    if not name:
        raise ValueError("tensor names must not be empty")
    _check_scalars(name)  # a key of the known `tensors` map (spec §3.4), though the entry is set aside
    codec = e.get("codec")
    known_codec = codec in (CODEC_CLUSTERED, CODEC_LOSSLESS, "alias")
    fields = {CODEC_CLUSTERED: ("chunk_rows", "chunks"), CODEC_LOSSLESS: ("transform", "chunk_rows", "chunks"),
              "alias": ("target",)}.get(codec, ())  # fmt: skip
    missing = [f for f in ("dtype", "shape", "codec", *fields) if f not in e]
    if missing:
        raise ValueError(f"{w}: missing field(s) {missing}")
    dtype, shape = e["dtype"], _validated(_SHAPE, e["shape"], f"{w} shape")
    if not isinstance(dtype, str):
        raise ValueError(f"{w}: dtype must be a string")
    size = itemsize(dtype) if dtype in DTYPES else None
    if size is not None and math.prod(shape) * size >= _MAX_TENSOR_BYTES:
        raise ValueError(f"{w}: shape {shape} of {dtype} is 2^63 bytes or more")
    # spec §3.4 on its known fields (a lone surrogate in a dtype or codec string; the unknown
    # fields of an unknown codec are ignored whatever they hold)
    _check_scalars(e if known_codec else {k: e[k] for k in ("dtype", "shape", "codec")})
    if codec == "alias":
        t = tensors.get(e["target"]) if isinstance(e["target"], str) else None
        if not isinstance(t, dict) or t.get("codec") == "alias":
            raise ValueError(f"{w}: alias target {e['target']!r} is not a non-alias tensor of the file")
        if t.get("dtype") != dtype or t.get("shape") != shape:
            raise ValueError(f"{w}: alias dtype/shape differ from target {e['target']!r}")
        return []
    if not known_codec:
        return []
    _validated(_CHUNK_ROWS, e["chunk_rows"], f"{w} chunk_rows")
    if not isinstance(e["chunks"], list):
        raise ValueError(f"{w}: chunks must be an array")
    blobs: list[tuple[int, int, str]] = []

    def as_raw(b: Any) -> Any:  # a blob of an unknown (string) encoding, as the Blob model sees it
        unknown = isinstance(b, dict) and isinstance(b.get("encoding"), str) and b["encoding"] not in (ENCODING_RAW, ENCODING_ZSTD)
        return dict(b, encoding=ENCODING_RAW) if unknown else b

    def blob(b: Any, what: str) -> Blob:  # spec §4.4
        ref = _validated(Blob, as_raw(b), f"{w} {what}")
        blobs.append((ref.offset, ref.length, f"tensor {name!r} {what}"))
        return ref

    for i, c in enumerate(e["chunks"]):
        if not isinstance(c, dict):
            raise ValueError(f"{w} chunk {i}: a chunk is an object")
        if codec == CODEC_CLUSTERED:
            for key in ("centroids", "labels"):
                blob(c.get(key), f"chunk {i} {key}")
            stand_in = dict(c, labels=as_raw(c.get("labels")))
            cent = c.get("centroids")
            if as_raw(cent) is not cent:  # unknown encoding: no "raw, 2*k bytes" for it
                k = c.get("k")
                stand_in["centroids"] = dict(cent, encoding=ENCODING_RAW, length=2 * k if type(k) is int else 0)
            _validated(ClusteredChunk, stand_in, f"{w} chunk {i}")
        else:
            planes = c.get("planes")
            if not isinstance(planes, list):
                raise ValueError(f"{w} chunk {i}: planes must be an array")
            _validated(LosslessChunk, dict(c, planes=[]), f"{w} chunk {i}")  # its keys
            if size is not None and len(planes) != size:
                raise ValueError(f"{w} chunk {i} has {len(planes)} planes, dtype {dtype} needs {size}")
            for j, p in enumerate(planes):
                blob(p, f"chunk {i} plane {j}")
    if codec == CODEC_CLUSTERED:
        if size is not None and dtype not in CLUSTERABLE:
            raise ValueError(f"{w}: dtype {dtype} cannot be clustered (allowed: {sorted(CLUSTERABLE)})")
        if "quality" in e:
            _validated(_QUALITY, e["quality"], f"{w} quality")
    else:
        if not isinstance(e["transform"], str):
            raise ValueError(f"{w}: transform must be a string")
        if size is not None and e["transform"] == "float_planes" and dtype not in FLOAT_PLANES:
            raise ValueError(f"{w}: transform float_planes is only for float dtypes, not {dtype}")
    _check_chunk_count(shape, e["chunk_rows"], len(e["chunks"]))
    return blobs


def _unknown_value(e: dict[str, Any]) -> str | None:
    """The first enumerated value of an entry that this version does not know, or None.
    Only strings count: a value of the wrong type stays a schema error."""
    codec = e.get("codec")
    if isinstance(codec, str) and codec not in (CODEC_CLUSTERED, CODEC_LOSSLESS, "alias"):
        return f"codec {codec!r}"
    if isinstance(e.get("dtype"), str) and e["dtype"] not in DTYPES:
        return f"dtype {e['dtype']!r}"
    transform = e.get("transform") if codec == CODEC_LOSSLESS else None
    if isinstance(transform, str) and transform not in ("byte_planes", "float_planes"):
        return f"transform {transform!r}"
    chunks = e.get("chunks") if isinstance(e.get("chunks"), list) else []
    for c in chunks:
        if not isinstance(c, dict):
            continue
        planes = c.get("planes") if isinstance(c.get("planes"), list) else []
        for b in [*planes, c.get("centroids"), c.get("labels")]:
            enc = b.get("encoding") if isinstance(b, dict) else None
            if isinstance(enc, str) and enc not in (ENCODING_RAW, ENCODING_ZSTD):
                return f"encoding {enc!r}"
    return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a header")


def _finite_float(text: str) -> float:
    """``1e400`` parses as infinity here; `_check_scalars` rejects it in a known field (spec §3.4:
    numbers are finite in binary64) and an ignored field of a newer minor may hold it (§10)."""
    return float(text)


def _finite_int(text: str) -> int | float:
    """An integer literal beyond binary64 parses as infinity, for `_check_scalars` to judge as
    ``1e400``. A JSON integer of more than 309 digits (no leading zeros) is at least 10^309,
    beyond binary64; checking the length first also keeps CPython's int() from raising its own
    ValueError on literals over 4300 digits."""
    if len(text.lstrip("-")) > 309:
        return math.inf
    value = int(text)
    try:
        float(value)
    except OverflowError:
        return math.inf
    return value


def _check_scalars(node: Any) -> None:
    """Spec §3.4's value rules, applied to known fields: no null, every number finite in
    binary64, every string (keys too) Unicode scalar values (no lone surrogates from
    ``\\ud800`` escapes)."""
    if node is None:
        raise ValueError("null is not a valid header value (leave an optional field out instead)")
    if isinstance(node, float) and not math.isfinite(node):
        raise ValueError("a number overflows binary64 (a finite value is required)")
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"string {node[:40]!r} holds a lone surrogate") from None
    elif isinstance(node, dict):
        for k, v in node.items():
            _check_scalars(k)
            _check_scalars(v)
    elif isinstance(node, list):
        for v in node:
            _check_scalars(v)


def _describe(e: ValidationError) -> str:
    msgs = []
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        msgs.append(f"field {loc or '<root>'}: {err['msg']}")
    more = e.error_count() - len(msgs)
    return "; ".join(msgs) + (f"; and {more} more" if more > 0 else "")


def _drop_unknown(data: Any, model: type[BaseModel]) -> Any:
    """Remove keys a model does not declare, recursively through the header's known nesting."""
    if not isinstance(data, dict):
        return data
    out = {k: v for k, v in data.items() if k in model.model_fields}
    if model is Header and isinstance(out.get("tensors"), dict):
        entries = {}
        for name, e in out["tensors"].items():
            codec = e.get("codec") if isinstance(e, dict) else None  # any JSON value, a list or an object too
            cls = {CODEC_CLUSTERED: ClusteredEntry, CODEC_LOSSLESS: LosslessEntry, "alias": AliasEntry}.get(
                codec if isinstance(codec, str) else None
            )
            entries[name] = _drop_unknown(e, cls) if cls else e
        out["tensors"] = entries
    if model is Header and isinstance(out.get("settings"), dict):
        out["settings"] = _drop_unknown(out["settings"], PackSettings)
    if model is ClusteredChunk:
        for key in ("centroids", "labels"):
            if key in out:
                out[key] = _drop_unknown(out[key], Blob)
    if model in (ClusteredEntry, LosslessEntry) and isinstance(out.get("chunks"), list):
        chunk_cls = ClusteredChunk if model is ClusteredEntry else LosslessChunk
        out["chunks"] = [_drop_unknown(c, chunk_cls) for c in out["chunks"]]
    if model is LosslessChunk and isinstance(out.get("planes"), list):
        out["planes"] = [_drop_unknown(p, Blob) for p in out["planes"]]
    return out


def serialize_header(header: Header) -> bytes:
    """Return the header's bytes as written on disk: compact UTF-8 JSON, fields in model order."""
    return json.dumps(
        header.model_dump(mode="json", exclude_none=True), separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def _plain_json_schema(node: Any) -> Any:
    """Drop what is not JSON Schema 2020-12 validation: OpenAPI's ``discriminator`` and the
    ``default: null`` of optional fields (a header never holds null, spec §3.4)."""
    if isinstance(node, dict):
        return {
            k: _plain_json_schema(v)
            for k, v in node.items()
            if k != "discriminator" and not (k == "default" and v is None)
        }
    if isinstance(node, list):
        return [_plain_json_schema(v) for v in node]
    return node


def json_schema() -> dict[str, Any]:
    """Return the JSON Schema of the header, as written to `spec/header.schema.json`."""
    schema = _plain_json_schema(Header.model_json_schema())
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$comment"] = (
        "Header of a .wclust file of version 1.0 exactly (spec section 4.7): unknown fields "
        "are rejected, so a newer-minor header may fail it; a reader then drops unknown fields "
        "first (section 10). The prose wins where they differ; cross-field rules are prose only."
    )
    schema["$id"] = "https://github.com/wcfmt/wcfmt/spec/header.schema.json"
    return schema

