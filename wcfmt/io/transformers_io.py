"""A transformers model from a packed folder: `from_pretrained`.

transformers' own loader opens only ``model.safetensors[.index.json]`` and ``pytorch_model.bin``,
so a quantizer plug-in cannot make ``AutoModelForCausalLM.from_pretrained`` read ``.wclust``
shards. Instead the model class's ``from_pretrained(None, config=config, state_dict=...)`` is
given the weights, and (transformers 5) builds the model on the meta device, *assigns* the
given tensors as its parameters, computes non-persistent buffers such as
``rotary_emb.inv_freq`` as in a normal load (a meta-device init followed by
``load_state_dict(assign=True)`` would leave them on meta) and ties tied weights (one tensor
for ``lm_head.weight`` and the embedding).

On the CPU the state dict given is the decoded one (`load_state_dict`): the model owns the
decoded tensors, nothing is copied, so the peak is one copy of the weights. On a device that
would not do: without ``accelerate`` (no ``device_map``) transformers moves every tensor of the
state dict to the CPU. There the state dict given holds *placeholders* (one element expanded to
the weight's shape: no memory), so transformers builds, ties and initialises buffers as usual;
then each parameter is decoded straight onto the device (`rebuild.stream.load_tensors`:
bounded pinned staging, no host copy of the weights) and put in the placeholder's place in
every module that holds it, which keeps tied weights tied. A model whose weights transformers
renames or fuses on load (its loaded keys are not the file's names) takes the CPU path and is
then moved.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from ..errors import FormatError, UsageError, first_few

__all__ = ["from_pretrained", "model_class_for"]

#: Mappings tried, in order, when a config names no architecture transformers exports.
_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING",
    "MODEL_FOR_MASKED_LM_MAPPING",
    "MODEL_MAPPING",
)


def model_class_for(config: Any) -> type:
    """The transformers class that ``config`` describes.

    The first of ``config.architectures`` that transformers exports (``LlamaForCausalLM``,
    ``BertModel``, ...); without one, the class registered for the config's type in the causal
    LM, seq2seq, masked LM and base model mappings, in that order.
    """
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    for mapping_name in _MAPPINGS:
        mapping = getattr(transformers, mapping_name, None)
        if mapping is not None and type(config) in mapping:
            return mapping[type(config)]  # type: ignore[no-any-return]
    archs = getattr(config, "architectures", None)
    raise UsageError(
        f"no transformers class for model type {getattr(config, 'model_type', '?')!r} "
        f"(architectures {archs}); pass model_class=..."
    )


def from_pretrained(
    path_or_repo_id: str | os.PathLike[str],
    *,
    model_class: type | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    **kwargs: Any,
) -> Any:
    """Load a packed model folder (or Hub repository) as a transformers model, in eval mode.

    ``path_or_repo_id``: a packed folder, ``hf://org/name[@rev]`` or a bare ``org/name`` (see
    `wcfmt.io.sources`). ``model_class``: the class to build (default: from the config's
    ``architectures``, see `model_class_for`). ``dtype``: cast floating-point weights (default:
    the dtype they were stored in). ``device``: where the weights are decoded and the model
    placed (default CPU); ``device_map`` is taken as ``device`` when it names one device
    (``"cuda"``, ``0``, ``{"": "cuda:1"}``; ``"auto"``: the first GPU, or the CPU without one).
    ``threads``: decode threads (default: every CPU). Other keyword arguments go to
    ``AutoConfig.from_pretrained`` when they are config attributes, otherwise to the model's
    ``from_pretrained`` (``attn_implementation``, ...). Sentence-transformers folders load as
    their transformer (``BertModel``, ...); their ``1_Pooling/`` and other module folders travel
    with the packed folder unchanged.

    Memory: one copy of the weights, where they end up. The model is built on the meta device
    and its parameters are the decoded tensors themselves; on a GPU they are decoded there,
    through bounded pinned staging buffers, with no host copy (see the module's notes).

    Raises `FormatError` when the model expects weights the packed folder does not hold (they
    would otherwise be left at random initial values).
    """
    from transformers import AutoConfig

    from ..dtypes import torch_dtype_of
    from .sources import resolve_source

    dev = _one_device(device, kwargs.pop("device_map", None))
    folder = resolve_source(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir)
    if not folder.is_dir():
        if folder.exists():
            raise UsageError(f"{folder}: from_pretrained needs a packed model folder (config.json and .wclust shards)")
        raise FileNotFoundError(2, "No such file or folder", str(folder))
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: no config.json (from_pretrained needs a packed model folder)")
    config, model_kwargs = AutoConfig.from_pretrained(folder, return_unused_kwargs=True, **kwargs)
    cls = model_class if model_class is not None else model_class_for(config)
    want = torch_dtype_of(dtype) if dtype is not None else None
    model = None
    if dev is not None and dev.type != "cpu":
        model = _decoded_on_device(cls, config, folder, dev, want, model_kwargs, threads)
    if model is None:
        model = _assigned(cls, config, folder, want, model_kwargs, threads)
    if dev is not None:
        model.to(dev)  # buffers (rotary tables, position ids) are built on the CPU
    model.eval()
    return model


def _one_device(device: str | torch.device | None, device_map: Any) -> torch.device | None:
    """``device``, or the one device ``device_map`` names (transformers' spellings of it)."""
    if device_map is None:
        return torch.device(device) if device is not None else None
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map == "auto":  # one device: the first GPU where there is one
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int) and not isinstance(device_map, bool) and device_map >= 0:
        device_map = torch.device("cuda", device_map)
    if isinstance(device_map, str) and device_map not in ("balanced", "balanced_low_0", "sequential"):
        try:
            device_map = torch.device(device_map)
        except RuntimeError:
            pass  # not a device name: refused below
    if not isinstance(device_map, torch.device):
        raise UsageError(f"device_map={device_map!r}: wcfmt.from_pretrained places the whole model on one device "
                         "(device='cuda', device_map='cuda:0' or {'': 'cuda:0'})")
    if device is not None and torch.device(device) != device_map:
        raise UsageError(f"device={device!r} and device_map={device_map!r} disagree; give one of them")
    return device_map


def _assigned(cls: type, config: Any, folder: Any, want: torch.dtype | None, model_kwargs: dict[str, Any],
              threads: int | None = None) -> Any:
    """The model built by transformers around the decoded CPU state dict (its tensors assigned)."""
    from .folder import load_state_dict

    state = load_state_dict(folder, device="cpu", dtype=want, threads=threads)
    if want is None:
        want = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model, info = _build(cls, config, state, want, model_kwargs)
    del state  # the model holds the decoded tensors themselves; no second copy stays alive
    _check_missing(model, info, folder, cls)
    return model


def _build(cls: type, config: Any, state: dict[str, torch.Tensor], want: torch.dtype,
           model_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    with _quiet_transformers():
        return cls.from_pretrained(  # type: ignore[no-any-return, attr-defined]
            None, config=config, state_dict=state, dtype=want, output_loading_info=True, **model_kwargs
        )


def _check_missing(model: Any, info: dict[str, Any], folder: Any, cls: type) -> None:
    from .folder import untied_missing

    missing = untied_missing(model.state_dict(keep_vars=True), info.get("missing_keys", []))
    if missing:
        raise FormatError(
            f"{folder}: {cls.__name__} expects {len(missing)} weight(s) the packed folder does not hold: "
            f"{first_few(missing)}"
        )


def _decoded_on_device(cls: type, config: Any, folder: Any, dev: torch.device, want: torch.dtype | None,
                       model_kwargs: dict[str, Any], threads: int | None = None) -> Any:
    """The model with every stored weight decoded straight onto ``dev`` (see the module's notes);
    None where transformers renamed or fused the weights (the caller takes the CPU path)."""
    from contextlib import ExitStack

    from ..dtypes import torch_dtype
    from ..reader import WclustReader
    from ..rebuild.stream import load_tensors
    from ..schema import AliasEntry
    from .folder import _record_names, _wclust_files, check_weight_map

    files, shards = _wclust_files(folder)
    with ExitStack() as stack:
        readers = [stack.enter_context(WclustReader(p, use_mmap=False)) for p in files]
        found: dict[str, str] = {}
        reader_of: dict[str, Any] = {}
        stored: dict[str, torch.dtype] = {}
        for p, r in zip(files, readers):
            _record_names(found, p, r.header.tensors)
            for name, e in r.header.tensors.items():
                reader_of[name] = r
                stored[name] = torch_dtype(r.resolve(name)[1].dtype)
        if shards is not None:
            check_weight_map(shards, found)
        if want is None:
            want = next((d for d in stored.values() if d.is_floating_point), torch.float32)
        # One placeholder per stored tensor (an alias shares its target's, as load_state_dict's
        # aliases are one tensor); each has a one-element storage of its own, by which it is
        # recognised in the built model.
        placeholders: dict[str, torch.Tensor] = {}
        for r in readers:
            tensors = r.header.tensors
            for name, e in tensors.items():
                if isinstance(e, AliasEntry):
                    continue
                d = want if stored[name].is_floating_point else stored[name]
                placeholders[name] = torch.zeros((), dtype=d).expand(tuple(e.shape))
            for name, e in tensors.items():
                if isinstance(e, AliasEntry) and e.target in placeholders:
                    placeholders[name] = placeholders[e.target]
        owner: dict[int, str] = {}
        for n, t in placeholders.items():
            owner.setdefault(t.data_ptr(), n)
        # (placeholders stays alive to the end: a freed one's address could be reused and misread)
        try:
            model, info = _build(cls, config, placeholders, want, model_kwargs)
        except RuntimeError:
            # a model whose set-up writes into a loaded weight (an expanded placeholder refuses
            # in-place writes): the CPU path builds it from real tensors, and raises real errors
            return None
        _check_missing(model, info, folder, cls)

        # Every place a persistent tensor sits, grouped by the tensor object (tied weights: one group).
        groups: dict[int, list[tuple[torch.nn.Module, str, str]]] = {}
        first: dict[int, torch.Tensor] = {}
        for prefix, mod in model.named_modules(remove_duplicate=False):
            slots = list(mod._parameters.items()) + [
                (a, b) for a, b in mod._buffers.items() if a not in mod._non_persistent_buffers_set
            ]
            for attr, t in slots:
                if t is not None:
                    groups.setdefault(id(t), []).append((mod, attr, f"{prefix}.{attr}" if prefix else attr))
                    first[id(t)] = t
        # Which stored tensor each group receives: the one whose placeholder it holds (under its
        # own name or one transformers renamed it to), else one of its names (transformers
        # converted the placeholder: a module kept in another dtype). A group with neither is
        # a tensor transformers initialised itself (a key the model may lack) and stays as it is.
        source: dict[int, str] = {}
        for key, places in groups.items():
            name = owner.get(first[key].data_ptr())
            if name is None:
                name = next((k for _m, _a, k in reversed(places) if k in found), None)
            if name is not None:
                source[key] = name
        unexpected = set(info.get("unexpected_keys", []))
        landed = {placeholders[n].data_ptr() for n in source.values()}
        if any(t.data_ptr() not in landed for n, t in placeholders.items() if n not in unexpected):
            return None  # transformers fused or split stored tensors into others: the CPU path does that
        by_reader: dict[int, list[str]] = {}
        for name in dict.fromkeys(source.values()):
            by_reader.setdefault(id(reader_of[name]), []).append(name)
        with torch.no_grad():
            for r in readers:
                names = by_reader.get(id(r), [])
                if not names:
                    continue
                got = load_tensors(r, names, device=dev, dtype=want, threads=threads)
                for key, name in source.items():
                    if name not in got:
                        continue
                    old, value = first[key], got[name]
                    if value.dtype != old.dtype:  # a module transformers keeps in another dtype
                        value = value.to(old.dtype)
                    new = torch.nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(
                        old, torch.nn.Parameter) else value
                    for mod, attr, _k in groups[key]:
                        if attr in mod._parameters:
                            mod._parameters[attr] = new
                        else:
                            mod._buffers[attr] = new
                del got
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" bar from transformers: library calls are silent (wcfmt.progress)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()

