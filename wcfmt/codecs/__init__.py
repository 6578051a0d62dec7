"""The codecs (spec §5, §6): each turns one tensor into per-chunk blobs and back.

`clustered` and `lossless` each expose ``CODEC_ID``, ``encode_chunks`` (value -> per-chunk
payloads), ``make_entry`` (payload blob references -> header entry) and ``decode_chunk`` (header
entry + blob reader -> the chunk's values in storage form). There is no registry: the reader and
writer dispatch on the header entry's pydantic type (`schema.ClusteredEntry`, `LosslessEntry`),
which a new codec needs anyway, so a dict of modules would only be a second, unused index of the
same two names. New codec = new module + schema model + spec section + conformance vectors.
"""
