"""Model files on disk around the .wclust format: safetensors files and Hugging Face folders."""

from .folder import (
    INDEX_NAME,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    Shards,
    find_safetensors_shards,
    find_wclust_shards,
    load_state_dict,
    read_index,
    write_index,
)
from .safetensors_io import (
    SafetensorsSource,
    SafetensorsStreamWriter,
    TensorInfo,
    format_size,
    parse_size,
    plan_shards,
    read_safetensors_header,
    shard_file_name,
)

__all__ = [
    "INDEX_NAME",
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "Shards",
    "find_safetensors_shards",
    "find_wclust_shards",
    "load_state_dict",
    "read_index",
    "write_index",
    "SafetensorsSource",
    "SafetensorsStreamWriter",
    "TensorInfo",
    "format_size",
    "parse_size",
    "plan_shards",
    "read_safetensors_header",
    "shard_file_name",
]
