"""A transformers model from a packed folder: `from_pretrained`.

transformers' own loader opens only ``model.safetensors[.index.json]`` and ``pytorch_model.bin``,
so a quantizer plug-in cannot make ``AutoModelForCausalLM.from_pretrained`` read ``.wclust``
shards. Instead the shards are decoded into one state dict and handed to the model class as
``Model.from_pretrained(None, config=config, state_dict=state)``, which (transformers 5) builds
the model on the meta device and *assigns* the given tensors as its parameters: the model owns
the decoded tensors, nothing is copied, and non-persistent buffers such as
``rotary_emb.inv_freq`` are computed as in a normal load (a meta-device init followed by
``load_state_dict(assign=True)`` would leave them on meta). Tied weights are tied by
transformers as usual (one tensor for ``lm_head.weight`` and the embedding).
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
    **kwargs: Any,
) -> Any:
    """Load a packed model folder (or Hub repository) as a transformers model, in eval mode.

    ``path_or_repo_id``: a packed folder, ``hf://org/name[@rev]`` or a bare ``org/name`` (see
    `wcfmt.io.sources`). ``model_class``: the class to build (default: from the config's
    ``architectures``, see `model_class_for`). ``dtype``: cast floating-point weights (default:
    the dtype they were stored in). ``device``: where the weights are decoded and the model
    placed (default CPU). Other keyword arguments go to ``AutoConfig.from_pretrained`` when they
    are config attributes, otherwise to the model's ``from_pretrained`` (``attn_implementation``,
    ...). Sentence-transformers folders load as their transformer (``BertModel``, ...); their
    ``1_Pooling/`` and other module folders travel with the packed folder unchanged.

    Raises `FormatError` when the model expects weights the packed folder does not hold (they
    would otherwise be left at random initial values).
    """
    from transformers import AutoConfig

    from ..convert import torch_dtype_of
    from .folder import load_state_dict, untied_missing
    from .sources import resolve_source

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
    state = load_state_dict(folder, device=device or "cpu", dtype=want)
    if want is None:
        want = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    with _quiet_transformers():
        model, info = cls.from_pretrained(
            None, config=config, state_dict=state, dtype=want, output_loading_info=True, **model_kwargs
        )
    del state  # the model holds the decoded tensors themselves; no second copy stays alive
    missing = untied_missing(model.state_dict(keep_vars=True), info.get("missing_keys", []))
    if missing:
        raise FormatError(
            f"{folder}: {cls.__name__} expects {len(missing)} weight(s) the packed folder does not hold: "
            f"{first_few(missing)}"
        )
    if device is not None:
        model.to(device)  # buffers (rotary tables, position ids) are built on the CPU
    model.eval()
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

