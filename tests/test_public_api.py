"""The public names of `wcfmt` (python-zstandard's test_module_attributes, in spirit).

Adding a public name means adding it to `PUBLIC` below, on purpose; removing one is a breaking
change that the CHANGELOG must state.
"""

from __future__ import annotations

import types

import pytest

import wcfmt

#: Exactly `wcfmt.__all__`, in any order.
PUBLIC = [
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

#: error class -> the built-in it must also be, so callers may catch either.
ERROR_BUILTINS = {
    "WclustError": Exception,
    "FormatError": ValueError,
    "HeaderError": ValueError,
    "VersionError": ValueError,
    "ChecksumError": ValueError,
    "UsageError": ValueError,
    "TensorNotFoundError": KeyError,
    "OutputExistsError": FileExistsError,
    "HubError": OSError,
}

#: error class -> its wcfmt parent.
ERROR_PARENTS = {
    "FormatError": "WclustError",
    "HeaderError": "FormatError",
    "VersionError": "FormatError",
    "ChecksumError": "FormatError",
    "UsageError": "WclustError",
    "TensorNotFoundError": "WclustError",
    "OutputExistsError": "WclustError",
    "HubError": "WclustError",
}


def test_all_is_pinned() -> None:
    assert sorted(wcfmt.__all__) == sorted(PUBLIC)
    assert len(set(wcfmt.__all__)) == len(wcfmt.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_importable(name: str) -> None:
    ns: dict[str, object] = {}
    exec(f"from wcfmt import {name}", ns)
    assert ns[name] is getattr(wcfmt, name)


#: Public-looking module attributes deliberately left out of __all__ (imported for FORMAT_VERSION).
NOT_EXPORTED = {"VERSION_MAJOR", "VERSION_MINOR"}


def test_no_public_attribute_outside_all() -> None:
    stray = {
        n
        for n, v in vars(wcfmt).items()
        if not n.startswith("_") and n not in wcfmt.__all__ and not isinstance(v, types.ModuleType)
    }
    assert stray == NOT_EXPORTED


def test_versions() -> None:
    from wcfmt.constants import VERSION_MAJOR, VERSION_MINOR

    assert wcfmt.FORMAT_VERSION == f"{VERSION_MAJOR}.{VERSION_MINOR}" == "1.0"
    parts = wcfmt.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2])


def test_error_tables_cover_every_public_error() -> None:
    errors = {n for n in PUBLIC if isinstance(getattr(wcfmt, n), type) and issubclass(getattr(wcfmt, n), BaseException)}
    assert errors == set(ERROR_BUILTINS)
    assert set(ERROR_PARENTS) == errors - {"WclustError"}


@pytest.mark.parametrize("name", sorted(ERROR_BUILTINS))
def test_error_inherits_builtin_and_parent(name: str) -> None:
    cls = getattr(wcfmt, name)
    assert issubclass(cls, wcfmt.WclustError)
    assert issubclass(cls, ERROR_BUILTINS[name])
    if name in ERROR_PARENTS:
        assert issubclass(cls, getattr(wcfmt, ERROR_PARENTS[name]))
    with pytest.raises(ERROR_BUILTINS[name]):
        raise cls("x.wclust: boom")


def test_tensor_not_found_message_is_not_quoted() -> None:
    assert str(wcfmt.TensorNotFoundError("m.wclust: no tensor named 'x'")) == "m.wclust: no tensor named 'x'"
    assert str(wcfmt.TensorNotFoundError()) == ""


def test_old_import_paths_still_work() -> None:
    """0.2's module paths stay importable after the pipeline moved to `wcfmt.packing` and the
    method's tools to `wcfmt.method` (promised names: extend, never rename)."""
    import wcfmt.convert as convert
    from wcfmt.convert import DEFAULT_BITS, PackReport, UnpackReport, cluster_for_storage, pack, unpack

    assert pack is wcfmt.pack and unpack is wcfmt.unpack and convert.torch_dtype_of is not None
    assert PackReport.__name__ == "PackReport" and UnpackReport.__name__ == "UnpackReport"
    assert DEFAULT_BITS == wcfmt.packing.options.DEFAULT_BITS and callable(cluster_for_storage)
    assert callable(wcfmt.pack) and isinstance(wcfmt.packing, types.ModuleType)
    from wcfmt.heal import DEFAULTS, heal
    from wcfmt.method import heal as heal_module, sensitivity as sensitivity_module, transforms as transforms_module
    from wcfmt.sensitivity import choose_k, pack_with_budget
    from wcfmt.transforms import MODES, transform

    assert heal is wcfmt.heal is heal_module.heal and DEFAULTS is heal_module.DEFAULTS
    assert transform is transforms_module.transform and MODES == transforms_module.MODES
    assert pack_with_budget is sensitivity_module.pack_with_budget and callable(choose_k)
