"""The clustered codec on its own (spec §5), blobs held in a dict instead of a file: what it asks
the reader for, its table checks, and decoding into a caller's buffer. File-level behaviour is in
test_reader.py and test_writer.py; the value rebuild in test_clustered_tensor.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import random_clustered
from wcfmt import ClusteredTensor
from wcfmt.codecs import clustered, entropy
from wcfmt.codecs.bitpack import pack_labels
from wcfmt.schema import Blob


def _stored(ct, level: int | None = None):  # type: ignore[no-untyped-def]
    """(entry, payloads by offset) for a ClusteredTensor, as the writer would store them."""
    store: dict[int, tuple[bytes, str]] = {}
    blobs = []
    for job in clustered.encode_chunks(ct, level):
        refs = []
        for payload, enc in job():
            off = 64 * (len(store) + 1)
            store[off] = (payload, enc)
            refs.append(Blob(offset=off, length=len(payload), encoding=enc, crc32=entropy.crc32(payload)))
        blobs.append(refs)
    return clustered.make_entry(ct, blobs), store


def test_reads_name_the_blob_and_use_scratch_slot_zero() -> None:
    # mostly label 0: the label planes compress, so they are zstd frames that decode into a buffer
    labels = torch.from_numpy((np.random.default_rng(1).random((40, 64)) < 0.1).astype(np.uint8))
    table = torch.tensor([-0.5, 0.5], dtype=torch.float16)
    ct = ClusteredTensor(labels=labels, centroids=[table, table], chunk_rows=20, dtype=torch.bfloat16)
    entry, store = _stored(ct)
    asked: list[tuple[str, bool]] = []

    def read(blob: Blob, expected: int, what: str, out: np.ndarray | None = None):  # type: ignore[no-untyped-def]
        asked.append((what, out is not None))
        payload, enc = store[blob.offset]
        return entropy.decompress(payload, enc, expected, out=out)

    scratch = entropy.Scratch()
    plain = clustered.decode_chunk(entry, 1, read)
    assert asked == [("centroids", False), ("labels", False)]
    packed = clustered.read_labels(entry, 1, read, scratch)
    assert asked[-1] == ("labels", True) and entry.chunks[1].labels.encoding == "zstd"
    assert np.shares_memory(packed, scratch.get(0, packed.size))  # the plane decoded into slot 0
    again = clustered.decode_chunk(entry, 1, read, scratch=entropy.Scratch())
    assert np.array_equal(plain, again)


def test_decode_into_a_buffer() -> None:
    ct = random_clustered((6, 10), 8, 3, dtype=torch.float16, seed=2)
    entry, store = _stored(ct)

    def read(blob: Blob, expected: int, what: str):  # type: ignore[no-untyped-def]
        return entropy.decompress(*store[blob.offset], expected)

    for i in range(2):
        want = ct.decode().reshape(-1)[i * 30 : (i + 1) * 30].numpy()
        out = np.full(30, np.nan, np.float16)
        assert clustered.decode_chunk(entry, i, read, out=out) is out
        assert np.array_equal(out.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("table", [[1.0, 0.5], [0.5, 0.5], [-0.0, 0.0]])
def test_a_two_entry_table_must_ascend(table: list[float]) -> None:
    """Spec §5.4: strictly ascending as numbers, also for K = 2 (signed zeros are equal)."""
    ct = random_clustered((4, 4), 2, 4, seed=3)
    entry, store = _stored(ct)
    bad = np.array(table, "<f2").tobytes()

    def read(blob: Blob, expected: int, what: str):  # type: ignore[no-untyped-def]
        return bad if what == "centroids" else entropy.decompress(*store[blob.offset], expected)

    with pytest.raises(ValueError, match="ascending"):
        clustered.read_centroids(entry, 0, read)


@pytest.mark.parametrize("level", [None, 3])
def test_label_planes_are_compressed_as_labels_at_the_level_asked(level: int | None) -> None:
    """The label plane's frame is `entropy.compress` of the packed plane with the label
    parameters (kind "labels") at the pack's level; with these labels (words of labels repeated
    at random) other parameters give other bytes."""
    rng = np.random.default_rng(4)
    words = rng.integers(0, 16, (32, 24))
    labels = torch.from_numpy(words[rng.integers(0, 32, 2000)].reshape(200, 240).astype(np.uint8))
    table = torch.linspace(-1, 1, 16, dtype=torch.float16)
    ct = ClusteredTensor(labels=labels, centroids=[table], chunk_rows=200, dtype=torch.bfloat16)
    entry, store = _stored(ct, level)
    frame, enc = store[entry.chunks[0].labels.offset]
    plane = pack_labels(labels.numpy().reshape(-1), 4).tobytes()
    assert (frame, enc) == entropy.compress(plane, level, "labels") and enc == "zstd"
    frames = {entropy.compress(plane, lv, kind)[0] for lv, kind in ((None, "labels"), (None, "bytes"), (3, "labels"))}
    assert len(frames) == 3  # the label parameters, the byte parameters and level 3 each give other bytes
