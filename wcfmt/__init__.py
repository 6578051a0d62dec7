"""wcfmt: the .wclust format for weight-clustered neural-network checkpoints, and its codec.

>>> import wcfmt
>>> wcfmt.FORMAT_VERSION
'1.0'
"""

from ._version import __version__
from .api import load_file, safe_open, save_file
from .cluster import ClusterPolicy, cluster_tensor
from .clustered_tensor import ClusteredTensor
from .packing import PackOptions, pack, unpack
from .edit import rewrite_centroids
from .heal import heal  # via the 0.2 module name, so that importing it later cannot rebind wcfmt.heal
from . import transforms
from .io.folder import load_model, load_state_dict
from .io.hub import load_from_hub, push_to_hub
from .io.transformers_io import from_pretrained
from .constants import VERSION_MAJOR, VERSION_MINOR
from .errors import (
    ChecksumError,
    FormatError,
    HeaderError,
    HubError,
    OutputExistsError,
    TensorNotFoundError,
    UsageError,
    VersionError,
    WclustError,
)

FORMAT_VERSION = f"{VERSION_MAJOR}.{VERSION_MINOR}"

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "ClusteredTensor",
    "save_file",
    "load_file",
    "safe_open",
    "load_state_dict",
    "load_model",
    "pack",
    "unpack",
    "PackOptions",
    "cluster_tensor",
    "ClusterPolicy",
    "rewrite_centroids",
    "heal",
    "transforms",
    "push_to_hub",
    "load_from_hub",
    "from_pretrained",
    "WclustError",
    "FormatError",
    "HeaderError",
    "VersionError",
    "ChecksumError",
    "UsageError",
    "TensorNotFoundError",
    "OutputExistsError",
    "HubError",
]
