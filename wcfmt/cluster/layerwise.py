"""Calibration statistics one decoder block at a time: memory of a block, not of the model.

GPTQ and AWQ tooling (llm-compressor's ``layer_sequential`` pipeline, AutoGPTQ's "catcher")
calibrate big models this way, and so does `second_moments` here:

1. the model's skeleton is built from its config with every parameter on the ``meta`` device
   (buffers such as the rotary frequencies are real: they are computed, not stored);
2. the parameters outside the decoder stack that the start of the forward pass needs (the token
   embedding; the final norm and LM head only when the head's own statistics are wanted) are read
   from the source shards, only those keys, by positioned reads at the headers' offsets (`_Shards`:
   not through a memory map, whose pages would count in the RSS);
3. the model's own ``forward`` runs with each block of the stack swapped for a recorder that keeps
   what that block is called with (hidden states, attention mask, rotary position embeddings,
   position ids: whatever this architecture and this transformers version pass) and the last one
   stops the pass, so nothing past the embedding is computed by hand;
4. block by block: its weights are read from the shards, the recorded inputs run through it while
   forward hooks on its ``nn.Linear`` projections sum their inputs' second moments (the hooks of
   `wcfmt.cluster.calibrate`), its weights go back to ``meta``, its outputs are the next block's
   inputs.

Peak memory is about one block plus the embedding (plus the head when wanted) plus the
activations of the calibration batch. The stack is found by structure (the ``nn.ModuleList`` of
same-class modules holding most of the parameters: ``model.layers`` of Llama, Mistral, Qwen2,
Gemma, Phi-3, ``transformer.h`` of GPT-2 and so on), not by a list of names. A model whose skeleton
cannot be built from its config, or whose parameters are not all found in its shards under their
own names, runs the whole-model pass instead (`WHOLE_MODEL`); the caller records which ran.

`calibration_need` estimates the memory either way from config.json and the safetensors headers
alone (no weights are read), for ``pack``'s automatic choice.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError

__all__ = [
    "AfterBlock",
    "LAYERWISE",
    "WHOLE_MODEL",
    "LayerwiseUnsupported",
    "Need",
    "Statistics",
    "calibration_need",
    "second_moments",
]

#: ``Statistics.path`` (and the header's ``calib_path``) of the block-by-block pass.
LAYERWISE = "layerwise"
#: ... and of the pass over the whole model loaded at once.
WHOLE_MODEL = "whole-model"


class LayerwiseUnsupported(Exception):
    """The model cannot be run block by block here (the reason is the message)."""


@dataclass
class Statistics:
    """What a calibration pass found: ``moments`` ({weight name: mean xxᵀ, or its diagonal}),
    which ``path`` ran (`LAYERWISE` or `WHOLE_MODEL`), why the layer-wise path did not
    (``fallback``, "" when it ran), and the most bytes of parameters held in memory at once
    (``peak_parameter_bytes``; the whole model's for `WHOLE_MODEL`), and the shape of the token
    windows read (``windows``: rows, tokens per row)."""

    moments: dict[str, np.ndarray]
    path: str
    fallback: str = ""
    peak_parameter_bytes: int = 0
    windows: tuple[int, int] = (0, 0)


# -- the skeleton -------------------------------------------------------------------------------
@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside goes to the ``meta`` device as it is registered
    (before a module's ``reset_parameters`` could fill it); buffers stay real, so that those a
    module computes in its constructor (rotary ``inv_freq``) hold their values. What accelerate's
    ``init_empty_weights(include_buffers=False)`` does, without the dependency."""
    old = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        old(module, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = old  # type: ignore[method-assign]


def _skeleton(folder: Path, dtype: torch.dtype) -> Any:
    """The causal LM of ``folder`` built from its config in ``dtype``, parameters on ``meta``."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as e:  # pragma: no cover - transformers is in the test extra
        raise LayerwiseUnsupported(f"transformers is not installed ({e})") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(folder)
        if getattr(config, "auto_map", None):
            raise LayerwiseUnsupported("the model needs its own code (auto_map)")
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except LayerwiseUnsupported:
        raise
    except Exception as e:  # any failure to build it: the whole-model path reports its own
        raise LayerwiseUnsupported(f"cannot build the model from its config ({type(e).__name__}: {e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def _find_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(name, module) of the decoder stack: of the ``nn.ModuleList`` s whose children are all of
    one class (as many as the config's ``num_hidden_layers``, where one is), the one holding the
    most parameters. Not "most of the model": a few blocks under a large vocabulary hold less
    than the embedding and head."""
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found: list[tuple[int, str, torch.nn.ModuleList]] = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            n = sum(p.numel() for p in m.parameters())
            if n > 0:
                found.append((n, name, m))
    if isinstance(layers, int) and any(len(m) == layers for _, _, m in found):
        found = [f for f in found if len(f[2]) == layers]
    if not found:
        raise LayerwiseUnsupported("no stack of decoder blocks (a list of modules of one class)")
    _, name, stack = max(found, key=lambda f: f[0])
    return name, stack


# -- the shards -----------------------------------------------------------------------------------
class _Shards:
    """Tensors read from a folder's safetensors shards, only the keys asked for, by positioned
    reads of the headers' offsets. Not through safe_open's memory map, whose pages stay resident
    (and count in the RSS) until it closes: a pass over an 8B model's shards would count all
    16 GB. A group of tensors (a block) is read into one buffer: a buffer of a block's size
    (glibc: ≥ 32 MiB) is its own mapping and goes back to the system when freed, where tensor-
    sized buffers stay in the heap, fragmented (a 10-block model grew the peak RSS by 26 MB per
    block that way, measured)."""

    def __init__(self, folder: Path) -> None:
        from ..io.folder import find_safetensors_shards
        from ..io.safetensors_io import read_safetensors_header

        self.info: dict[str, Any] = {}
        self.file: dict[str, Path] = {}
        for p in find_safetensors_shards(folder).paths:
            for key, info in read_safetensors_header(p)[1].items():
                self.info[key] = info
                self.file[key] = p
        self.where = self.info  # the keys present
        self.shapes = {k: tuple(i.shape) for k, i in self.info.items()}

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys``, views of one buffer read in file order."""
        from ..dtypes import torch_dtype
        from ..errors import FormatError

        order = sorted(keys, key=lambda k: (str(self.file[k]), self.info[k].start))
        buf = np.empty(sum(self.info[k].nbytes for k in order), np.uint8)
        out: dict[str, torch.Tensor] = {}
        pos = 0
        handles: dict[Path, Any] = {}
        try:
            for k in order:
                info, path = self.info[k], self.file[k]
                fh = handles.get(path)
                if fh is None:
                    fh = handles[path] = open(path, "rb", buffering=0)
                view, done = memoryview(buf)[pos : pos + info.nbytes], 0
                fh.seek(info.start)
                while done < info.nbytes:
                    n = fh.readinto(view[done:])
                    if not n:
                        raise FormatError(f"{path}: tensor {k!r}: file is truncated (changed while open?)")
                    done += n
                t = torch.from_numpy(buf[pos : pos + info.nbytes]) if info.nbytes else torch.empty(0, dtype=torch.uint8)
                out[k] = t.view(torch_dtype(info.dtype)).reshape(info.shape)
                pos += info.nbytes
        finally:
            for fh in handles.values():
                fh.close()
        return out

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def close(self) -> None:
        pass


class _Materialiser:
    """Puts parameters of the skeleton in memory from the shards and back on ``meta``; counts the
    bytes held (``peak``). Tied parameters (one object under several names) are read once."""

    def __init__(self, model: torch.nn.Module, shards: _Shards, dtype: torch.dtype, folder: Path) -> None:
        self.model = model
        self.shards = shards
        self.dtype = dtype
        self.folder = folder
        self.held = 0
        self.peak = 0
        # parameter object -> [(owner module, attribute name, full name)], and its checkpoint key
        self.owners: dict[int, list[tuple[torch.nn.Module, str, str]]] = {}
        self.key: dict[int, str] = {}
        self.meta: dict[int, torch.nn.Parameter] = {}
        modules = dict(model.named_modules())
        for full, p in model.named_parameters(remove_duplicate=False):
            mod_name, _, attr = full.rpartition(".")
            self.owners.setdefault(id(p), []).append((modules[mod_name], attr, full))
            self.meta[id(p)] = p
            if full in shards.where and id(p) not in self.key:
                self.key[id(p)] = full
        missing = [o[0][2] for i, o in self.owners.items() if i not in self.key]
        if missing:
            from ..errors import first_few

            raise LayerwiseUnsupported(f"parameters not found under their names in the shards: {first_few(missing)}")
        unfit = [f"{k} {shards.shapes[k]} vs {tuple(self.meta[i].shape)}" for i, k in self.key.items()
                 if shards.shapes[k] != tuple(self.meta[i].shape)]  # fmt: skip
        if unfit:
            from ..errors import first_few

            raise UsageError(f"{folder}: cannot load the model for calibration (weights that do not fit "
                             f"its config: {first_few(unfit)})")

    def params_of(self, module: torch.nn.Module) -> list[int]:
        return list(dict.fromkeys(id(p) for p in module.parameters()))

    def load(self, ids: list[int]) -> None:
        todo = [i for i in ids if getattr(self.owners[i][0][0], self.owners[i][0][1]).device.type == "meta"]
        read = self.shards.get_many([self.key[i] for i in todo])
        for i in todo:
            t = read[self.key[i]]
            if t.is_floating_point() and t.dtype != self.dtype:
                t = t.to(self.dtype)
            param = torch.nn.Parameter(t, requires_grad=False)
            for owner, attr, _ in self.owners[i]:
                owner._parameters[attr] = param
            self.held += t.numel() * t.element_size()
        self.peak = max(self.peak, self.held)

    def free(self, ids: list[int]) -> None:
        for i in ids:
            current = getattr(self.owners[i][0][0], self.owners[i][0][1])
            if current.device.type == "meta":
                continue
            self.held -= current.numel() * current.element_size()
            for owner, attr, _ in self.owners[i]:
                owner._parameters[attr] = self.meta[i]


# -- the pass -------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for one block: keeps the arguments it is called with, passes the hidden states
    on unchanged; the last one stops the forward pass."""

    def __init__(self, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], last: bool) -> None:
        super().__init__()
        self.calls = calls
        self.last = last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if self.last:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


class _Replayer(torch.nn.Module):
    """Stands in for one block when the head's inputs are wanted: the last returns the stack's
    output computed block by block, the others pass their input on."""

    def __init__(self, out: torch.Tensor | None) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.out is not None:
            return self.out
        return args[0] if args else kwargs["hidden_states"]


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], h: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@contextmanager
def _swapped(stack: torch.nn.ModuleList, stand_ins: list[torch.nn.Module]) -> Iterator[None]:
    real = list(stack)
    for i, m in enumerate(stand_ins):
        stack[i] = m
    try:
        yield
    finally:
        for i, m in enumerate(real):
            stack[i] = m


def _forward_kwargs(model: Any, head_wanted: bool) -> dict[str, Any]:
    import inspect

    params = inspect.signature(model.forward).parameters
    out: dict[str, Any] = {"use_cache": False} if "use_cache" in params else {}
    if not head_wanted and "logits_to_keep" in params:
        out["logits_to_keep"] = 1
    return out


#: ``after_block(index, block, moments)``: called once a block's statistics are complete
#: (``moments``: that block's, by full weight name) and before its outputs are computed, e.g. to
#: replace its weights by their encoded values (GPTQ's "sequential" variant: the next block then
#: reads what the quantised model would feed it).
AfterBlock = Callable[[int, torch.nn.Module, dict[str, np.ndarray]], None]


def _layerwise(
    folder: Path, windows: torch.Tensor, keep: Callable[[str], bool], *, batch: int, progress: bool, diagonal: bool,
    dtype: torch.dtype, after_block: AfterBlock | None = None,
) -> Statistics:
    from ..errors import WclustError
    from ..progress import bar
    from .calibrate import _MomentHooks

    model = _skeleton(folder, dtype)
    stack_name, stack = _find_stack(model)
    try:
        shards = _Shards(folder)
    except (WclustError, OSError) as e:  # e.g. a folder of .bin weights: the whole-model path reads those
        raise LayerwiseUnsupported(f"cannot read the safetensors shards ({e})") from None
    try:
        mat = _Materialiser(model, shards, dtype, folder)
        # persistent buffers stored in the checkpoint (rare in causal LMs) take their stored values
        for bname, buf in model.named_buffers():
            if bname in shards.where and not bname.startswith(stack_name + "."):
                mod_name, _, attr = bname.rpartition(".")
                model.get_submodule(mod_name)._buffers[attr] = shards.get(bname).to(buf.dtype)
        in_stack = {i for block in stack for i in mat.params_of(block)}
        outside = [i for i in mat.params_of(model) if i not in in_stack]
        head = model.get_output_embeddings()
        hooks = _MomentHooks(model, keep, diagonal)
        head_wanted = head is not None and any(m is head for m in hooks.modules)
        head_ids = set(mat.params_of(head)) if head is not None else set()
        embed = model.get_input_embeddings()
        embed_ids = set(mat.params_of(embed)) if embed is not None else set()
        # The start of the pass: everything outside the stack but a head that is not wanted (and
        # is not the embedding itself).
        start = [i for i in outside if head_wanted or i not in head_ids or i in embed_ids]
        extra = _forward_kwargs(model, head_wanted)
        n_windows = windows.shape[0]
        batches = [windows[i : i + batch] for i in range(0, n_windows, batch)]
        calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []
        try:
            with torch.inference_mode(), bar(progress, total=len(stack), desc="calibrate", unit="block") as b:
                mat.load(start)
                for ids in batches:
                    recorded: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
                    recorders = [_Recorder(recorded, i == len(stack) - 1) for i in range(len(stack))]
                    with _swapped(stack, recorders):
                        try:
                            model(input_ids=ids, **extra)
                        except _Stop:
                            pass
                    if len(recorded) != len(stack):
                        raise LayerwiseUnsupported(f"the forward pass called {len(recorded)} of {len(stack)} blocks")
                    calls.append(recorded)
                mat.free(start)
                hidden = [_hidden_of(*c[0]) for c in calls]
                n = windows.numel()
                for layer, block in enumerate(stack):
                    ids_ = mat.params_of(block)
                    mat.load(ids_)
                    outs = []
                    for j, c in enumerate(calls):
                        args, kwargs = _with_hidden(*c[layer], hidden[j])
                        out = block(*args, **kwargs)
                        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
                    if after_block is not None:
                        prefix = f"{stack_name}.{layer}."
                        after_block(layer, block, {k: v for k, v in hooks.means(n).items() if k.startswith(prefix)})
                        hooks.enabled = False  # the block's statistics are complete: run it again for its outputs
                        outs = []
                        for j, c in enumerate(calls):
                            args, kwargs = _with_hidden(*c[layer], hidden[j])
                            out = block(*args, **kwargs)
                            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
                        hooks.enabled = True
                    hidden = outs
                    mat.free(ids_)
                    for c in calls:  # this block's arguments are no longer needed
                        c[layer] = ((), {})
                    b.update(1)
                if head_wanted:  # the model's own tail (final norm, head) on the stack's output
                    rest = list(outside)
                    mat.load(rest)
                    for j, ids in enumerate(batches):
                        stand_ins = [_Replayer(hidden[j] if i == len(stack) - 1 else None) for i in range(len(stack))]
                        with _swapped(stack, stand_ins):
                            model(input_ids=ids, **extra)
                    mat.free(rest)
        finally:
            hooks.remove()
        n = windows.numel()
        return Statistics(hooks.means(n), LAYERWISE, "", mat.peak, (int(windows.shape[0]), int(windows.shape[1])))
    finally:
        shards.close()


def second_moments(
    folder: str | Path,
    windows: torch.Tensor,
    keep: Callable[[str], bool],
    *,
    batch: int,
    progress: bool = False,
    diagonal: bool,
    dtype: torch.dtype,
    what: str = "calibration",
    path: str | None = None,
    after_block: AfterBlock | None = None,
) -> Statistics:
    """Mean xxᵀ (or its diagonal with ``diagonal``) of the inputs of every kept ``nn.Linear``
    weight of the causal LM in ``folder`` run in ``dtype`` over the rows of ``windows`` (token
    ids), ``batch`` rows at a time. ``path``: `LAYERWISE`, `WHOLE_MODEL`, or None: block by
    block where the model allows it (see the module's docstring), else the whole model. The
    statistics are the same either way (the same operations on the same inputs). ``after_block``
    (block by block only, see `AfterBlock`) may change each block once its statistics are in."""
    folder = Path(folder)
    if path not in (None, LAYERWISE, WHOLE_MODEL):
        raise UsageError(f"path must be {LAYERWISE!r}, {WHOLE_MODEL!r} or None, got {path!r}")
    fallback = ""
    if path != WHOLE_MODEL:
        try:
            return _layerwise(folder, windows, keep, batch=batch, progress=progress, diagonal=diagonal, dtype=dtype,
                              after_block=after_block)
        except LayerwiseUnsupported as e:
            if path == LAYERWISE or after_block is not None:
                raise UsageError(f"{folder}: cannot calibrate block by block: {e}") from None
            fallback = str(e)
    from .calibrate import _load_model, _second_moments

    _, model = _load_model(folder, what, tokenizer=False, dtype=dtype)
    found = _second_moments(model, windows, keep, batch=batch, progress=progress, diagonal=diagonal)
    held = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return Statistics(found, WHOLE_MODEL, fallback, held, (int(windows.shape[0]), int(windows.shape[1])))


# -- how much memory it takes -----------------------------------------------------------------------
@dataclass(frozen=True)
class Need:
    """Bytes a calibration pass needs: ``layerwise`` (one block + everything outside the stack +
    activations + statistics; None when no stack is seen in the checkpoint's names) and
    ``whole_model`` (all weights + the same activations and statistics)."""

    layerwise: int | None
    whole_model: int

    @property
    def least(self) -> int:
        return self.whole_model if self.layerwise is None else min(self.layerwise, self.whole_model)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= 100 << 20:
            raise ValueError(f"{path}: implausible header length {n}")
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


_BLOCK_KEY = re.compile(r"^(.*?)\.(\d+)\.")


def calibration_need(
    folder: str | Path, *, sequences: int, tokens: int, diagonal: bool = True, run_itemsize: int | None = None,
) -> Need:
    """Estimate the memory of a calibration pass over ``sequences`` × ``tokens`` from
    ``folder``'s config.json and safetensors headers (no weights are read).

    Weights count at ``run_itemsize`` bytes each (default: 2 for a 16-bit checkpoint, 4 otherwise,
    as `wcfmt.cluster.calibrate` runs them). The stack is the key prefix ``P`` under which
    ``P.0.`` … ``P.{L-1}.`` hold the most bytes (L = ``num_hidden_layers``, or as many as found);
    a block is its largest ``P.i.``. Activations: float32 hidden states and MLP products of the
    whole batch, a few copies each, and one float32 attention-score matrix per head. Statistics:
    float64 sums per kept projection (a vector with ``diagonal``, in × in otherwise), all of them
    kept to the end in either path. Raises `UsageError` when the folder has no readable config
    or shards."""
    from ..io.folder import find_safetensors_shards

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        entries: dict[str, tuple[str, tuple[int, ...]]] = {}
        for p in find_safetensors_shards(folder).paths:
            for k, v in _header(p).items():
                entries[k] = (str(v["dtype"]), tuple(int(s) for s in v["shape"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{folder}: cannot read config.json and the safetensors headers ({e})") from None
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if run_itemsize is None:
        name = config.get("dtype") or config.get("torch_dtype")
        run_itemsize = 2 if name in ("bfloat16", "float16") else 4

    def nbytes(key: str) -> int:
        dtype, shape = entries[key]
        n = math.prod(shape)
        return n * (run_itemsize if dtype in ("F32", "BF16", "F16", "F64") else _DTYPE_BYTES.get(dtype, 4))

    total = sum(nbytes(k) for k in entries)
    blocks: dict[str, dict[int, int]] = {}
    for k in entries:
        m = _BLOCK_KEY.match(k)
        if m:
            blocks.setdefault(m.group(1), {}).setdefault(int(m.group(2)), 0)
            blocks[m.group(1)][int(m.group(2))] += nbytes(k)
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    best: tuple[int, str] | None = None
    for prefix, per in blocks.items():
        n = len(per)
        if set(per) != set(range(n)) or n < 1 or (isinstance(layers, int) and n != layers):
            continue
        s = sum(per.values())
        if best is None or s > best[0]:
            best = (s, prefix)
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 0)
    inter = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    rows = sequences * tokens
    activations = 4 * rows * (6 * hidden + 3 * inter) + 4 * sequences * heads * tokens * tokens
    stats = 0
    for k, (_, shape) in entries.items():
        if len(shape) == 2 and (best is None or k.startswith(best[1] + ".")):
            stats += 8 * (shape[1] if diagonal else shape[1] * shape[1])
    whole = total + activations + stats
    if best is None:
        return Need(None, whole)
    stack_bytes, prefix = best
    largest = max(blocks[prefix].values())
    return Need(total - stack_bytes + largest + activations + stats, whole)
