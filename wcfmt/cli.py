"""The ``wcfmt`` command: a thin shell over `wcfmt.packing` and `wcfmt.inspect`.

Every option maps to a keyword of the library call of the same name (``--chunk-rows`` →
``chunk_rows=``, ``--max-shard-size`` → ``max_shard_size=``), and ``--quiet`` to
``progress=False``; ``wcfmt pack``'s flags are generated from `wcfmt.PackOptions`' fields. Errors a user can cause (missing or malformed input, existing output, full
disk, unsupported dtype, corrupt file) print one line, ``wcfmt: error: <file>: <tensor>:
<problem>``, and exit with status 1; usage errors exit with 2, as argparse does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import warnings
from typing import Iterator, Sequence

from . import _version
from .constants import VERSION_MAJOR, VERSION_MINOR
from .errors import UsageError, WclustError

__all__ = ["main", "build_parser"]

PROG = "wcfmt"
_QUIET_HELP = "no progress bars (shown only on a terminal anyway) and no summary line"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Pack, unpack, inspect and verify .wclust weight-clustered checkpoints.",
    )
    p.add_argument(
        "--version", action="version",
        version=f"{PROG} {_version.__version__} (.wclust format {VERSION_MAJOR}.{VERSION_MINOR})",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    pk = sub.add_parser(
        "pack", help="safetensors file or Hugging Face folder -> .wclust file or folder",
        description="Cluster the attention and MLP projection weights (the default policy, changed by "
        "--include/--exclude); store every other tensor losslessly.",
    )  # fmt: skip
    pk.add_argument("src", metavar="SRC", help="a .safetensors file or a Hugging Face model folder")
    pk.add_argument("-o", "--output", dest="dst", metavar="DST", required=True,
                    help="output .wclust file (for a file SRC) or folder (for a folder SRC)")
    from .packing.options import add_arguments

    add_arguments(pk)  # one flag per PackOptions field, its help the field's description
    pk.add_argument("--settings-from", metavar="PACKED",
                    help="pack with the options PACKED (a .wclust file or packed folder) records; flags given "
                    "here override them (same source, same machine: the same bytes)")
    pk.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)

    up = sub.add_parser(
        "unpack", help=".wclust file or folder -> safetensors file or Hugging Face folder",
        description="Rebuild every tensor dense and write safetensors, shards named as save_pretrained does.",
    )  # fmt: skip
    up.add_argument("src", metavar="SRC", help="a .wclust file or a packed folder")
    up.add_argument("-o", "--output", dest="dst", metavar="DST", required=True,
                    help="output .safetensors file (for a file SRC) or folder (for a folder SRC)")
    up.add_argument("--dtype", metavar="D", help="cast floating-point tensors (bf16, fp16, fp32, ...)")
    up.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="largest shard of a folder output, e.g. 5GB, 500MB (decimal units; default 5GB)")
    _max_bytes_arg(up)
    _common(up)

    inf = sub.add_parser("info", help="list tensors, codecs, K, bits/weight and sizes")
    inf.add_argument("path", metavar="FILE_OR_DIR")
    inf.add_argument("--json", action="store_true", help="print JSON instead of a table")

    push = sub.add_parser(
        "push", help="verify a packed folder and upload it to the Hugging Face Hub",
        description="Check every .wclust shard, create the repository if needed, and upload the folder "
        "(uses your huggingface_hub login or --token).",
    )  # fmt: skip
    push.add_argument("path", metavar="FOLDER", help="a packed folder (or a single .wclust file)")
    push.add_argument("repo_id", metavar="REPO_ID", help="e.g. your-name/model-wclust")
    push.add_argument("--private", action="store_true", default=None, help="create the repository private")
    push.add_argument("--revision", metavar="REV", help="branch to push to")
    push.add_argument("--commit-message", metavar="MSG")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing")
    push.add_argument("--token", metavar="TOKEN", help="Hub token (default: the stored login)")

    ver = sub.add_parser("verify", help="check structure and every checksum of a file or folder")
    ver.add_argument("path", metavar="FILE_OR_DIR")
    _max_bytes_arg(ver)
    ver.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)

    tf = sub.add_parser(
        "transform", help="rewrite the centroid tables of a .wclust file or folder by a transform mode",
        description="Change the cluster means, keep each weight's cluster (the rank experiments). "
        "Rank-breaking modes permute labels so that tables stay ascending.",
    )  # fmt: skip
    tf.add_argument("src", metavar="SRC",
                    help="a .wclust file, a packed folder, or a packed Hub repository (hf://org/name[@rev])")
    tf.add_argument("-o", "--output", dest="dst", metavar="DST", required=True, help="output file or folder")
    tf.add_argument("--mode", action="append", required=True, metavar="MODE",
                    help="one of: " + ", ".join(_TRANSFORM_MODES) + " (repeat to chain, applied in order)")
    tf.add_argument("--tensors", metavar="RE", help="only clustered tensors whose name matches RE (re.search)")
    tf.add_argument("--seed", type=int, default=0, help="seed of the random modes (default 0)")
    tf.add_argument("--a", type=float, default=1.0, help="affine: scale a > 0 (default 1)")
    tf.add_argument("--b", type=float, default=0.0, help="affine: shift b (default 0)")
    tf.add_argument("--p", type=float, default=0.5, help="power: exponent p > 0 (default 0.5)")
    tf.add_argument("--scale", type=float, default=2.0, help="tanh: s = scale x the weights' std (default 2)")
    _common(tf)

    he = sub.add_parser(
        "heal", help="fine-tune only the centroid tables of a packed causal LM on some text",
        description="Train every clustered matrix's centroid table (labels fixed, all else frozen) with "
        "next-token loss, and write a copy whose labels are byte-identical.",
    )  # fmt: skip
    he.add_argument("src", metavar="SRC", help="a packed model folder (config, tokenizer, .wclust shards) "
                    "or Hub repository (hf://org/name[@rev])")
    he.add_argument("-o", "--output", dest="dst", metavar="DST", required=True, help="output folder")
    he.add_argument("--text", required=True, metavar="FILE", help="UTF-8 training text")
    he.add_argument("--steps", type=int, default=_HEAL_DEFAULTS["steps"], metavar="N",
                    help=f"optimiser steps (default {_HEAL_DEFAULTS['steps']})")
    he.add_argument("--lr", type=float, default=_HEAL_DEFAULTS["lr"], metavar="LR",
                    help=f"Adam learning rate, relative to each codebook's std (default {_HEAL_DEFAULTS['lr']})")
    he.add_argument("--seq-len", type=int, default=_HEAL_DEFAULTS["seq_len"], metavar="L",
                    help=f"tokens per window (default {_HEAL_DEFAULTS['seq_len']})")
    he.add_argument("--batch", type=int, default=_HEAL_DEFAULTS["batch"], metavar="B",
                    help=f"windows per step (default {_HEAL_DEFAULTS['batch']})")
    he.add_argument("--tensors", metavar="RE", help="only clustered tensors whose name matches RE")
    he.add_argument("--seed", type=int, default=0, help="window order seed (default 0)")
    he.add_argument("--threads", type=int, metavar="N", help="torch threads")
    _common(he)

    se = sub.add_parser(
        "sensitivity", help="per-matrix perplexity increase when only that matrix is clustered, at each K",
        description="For every matrix pack would cluster and every K, cluster only that matrix and measure "
        "perplexity on the text (one forward pass each: keep --tokens small). Cached by source hash and settings.",
    )  # fmt: skip
    se.add_argument("src", metavar="SRC",
                    help="a dense Hugging Face causal LM folder or Hub repository (hf://org/name[@rev])")
    se.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    _budget_args(se, "--k")
    se.add_argument("--tensors", metavar="RE", help="only matrices whose name matches RE")
    se.add_argument("--json", action="store_true", help="print JSON instead of a table")
    se.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    p.formatter_class = _Help
    for sp in sub.choices.values():
        sp.formatter_class = _Help
    return p


class _Help(argparse.HelpFormatter):
    """Shows each option's default, unless it has none (None/False) or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or not action.option_strings:  # not `in (None, False)`: 0 == False would hide a default of 0
            return text
        return text + " (default: %(default)s)"


def _budget_args(p: argparse.ArgumentParser, k_flag: str) -> None:
    p.add_argument(k_flag, dest="budget_k", type=int, nargs="+", default=[16, 32, 64], metavar="K",
                   help="candidate K values (default 16 32 64)")
    p.add_argument("--tokens", type=int, default=2048, metavar="N", help="tokens of --text scored (default 2048)")
    p.add_argument("--window", type=int, default=512, metavar="L", help="perplexity window (default 512)")
    p.add_argument("--cache-dir", metavar="DIR", help="sensitivity cache folder (default ~/.cache/wcfmt)")


def _cache(args: argparse.Namespace) -> object:
    if args.cache_dir is None:
        return None
    from pathlib import Path

    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    return Path(args.cache_dir)  # a folder: the cache file inside is named by its key


#: Kept here so that `wcfmt --help` does not import torch (tests pin it to wcfmt.heal.DEFAULTS).
_HEAL_DEFAULTS = {"steps": 60, "lr": 2e-3, "seq_len": 256, "batch": 4}

#: Kept here, not imported, so that `wcfmt --help` does not import numpy (tests pin it to MODES).
_TRANSFORM_MODES = ("affine", "affine-correct", "sorted-gaussian", "monotone-freq", "power", "tanh",
                    "sign-scramble", "rank-break", "gaussian", "permute")


def _max_bytes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-bytes", default="auto", metavar="SIZE",
                   help="refuse a file whose tensors decode to more than SIZE bytes (e.g. 20GB; 0: no cap), "
                   "checked from its header before decoding (spec §9.1); default auto: 64x the file's size, "
                   "at least 256 MiB")


def _max_bytes(text: str) -> int | str | None:
    if text == "auto":
        return "auto"
    if text.strip() in ("0", "0B"):
        return None
    from .io.safetensors_io import parse_size

    try:
        n = parse_size(text)
    except (ValueError, WclustError):
        raise UsageError(f"--max-bytes must be a size such as 20GB, 0 or auto, got {text!r}") from None
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)


def _progress(args: argparse.Namespace) -> bool:
    # tqdm's own rule (disable=None): bars only on a terminal, so logs and pipes get just the result.
    return not args.quiet and sys.stderr.isatty()


def _run(args: argparse.Namespace) -> int:
    # Imported here so that `wcfmt --help` and `--version` stay fast.
    if args.command == "pack":
        from .packing import pack
        from .packing.options import PackOptions

        given = {n: v for n, v in vars(args).items() if n in PackOptions.model_fields and v is not None}
        given["progress"] = _progress(args)
        options = (PackOptions.from_file(args.settings_from, **given) if args.settings_from
                   else PackOptions(**given))  # fmt: skip
        pr = pack(args.src, args.dst, options)
        if not args.quiet:
            for name in pr.skipped:
                print(f"{PROG}: note: {args.src}: {name} is not listed in the index; not packed", file=sys.stderr)
            print(pr.summary())
            if pr.chosen_k:
                ks = list(pr.chosen_k.values())
                print(f"budget +{args.budget_ppl} ppl: K per matrix "
                      + ", ".join(f"{k}: {ks.count(k)}" for k in sorted(set(ks))))
            if pr.pushed:
                print(pr.pushed)
        return 0
    if args.command == "unpack":
        from .packing import unpack

        ur = unpack(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force,
                    progress=_progress(args), max_bytes=_max_bytes(args.max_bytes))
        if not args.quiet:
            print(ur.summary())
        return 0
    if args.command == "info":
        from .inspect import format_table, info

        i = info(args.path)
        print(json.dumps(i.to_dict(), indent=2) if args.json else format_table(i))
        return 0
    if args.command == "verify":
        from .inspect import verify

        vr = verify(args.path, progress=_progress(args), max_bytes=_max_bytes(args.max_bytes))
        if not args.quiet:
            print(vr.summary())
        return 0
    if args.command == "push":
        from .io.hub import push_to_hub

        url = push_to_hub(args.path, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, create_pr=args.create_pr)
        print(url)
        return 0
    if args.command == "transform":
        from .method.transforms import transform

        tr = transform(args.src, args.dst, args.mode, tensors=args.tensors, seed=args.seed, a=args.a, b=args.b,
                       p=args.p, scale=args.scale, force=args.force, progress=_progress(args))
        if not args.quiet:
            print(tr.summary())
        return 0
    if args.command == "heal":
        from .method.heal import heal

        hr = heal(args.src, args.dst, args.text, steps=args.steps, lr=args.lr, seq_len=args.seq_len,
                  batch=args.batch, seed=args.seed, tensors=args.tensors, threads=args.threads, force=args.force,
                  progress=_progress(args))  # fmt: skip
        if not args.quiet:
            print(hr.summary())
        return 0
    if args.command == "sensitivity":
        from .method.sensitivity import sensitivity

        sr = sensitivity(args.src, args.text, ks=args.budget_k, tokens=args.tokens, window=args.window,
                         tensors=args.tensors, cache=_cache(args), progress=_progress(args))  # fmt: skip
        print(json.dumps(sr.to_dict(), indent=1) if args.json else sr.format_table())
        return 0
    raise AssertionError(f"unknown command {args.command!r}")  # argparse rejects it first


#: Library messages name keyword arguments; on the command line they are flags.
def _flag_names() -> str:
    from .packing.options import PackOptions, flag_of

    names = [n for n in PackOptions.model_fields if flag_of(n)] + ["max_shard_size", "dtype", "seed"]
    return "|".join(sorted(names, key=len, reverse=True))  # longest first: calib_tokens before calib


_PY_TO_FLAG = re.compile(r"(?<![\w'.\-])(" + _flag_names() + r")(?= must\b|=| needs\b| does not\b)")


def _cli_message(msg: str) -> str:
    """``force=True / --force`` -> ``--force``; ``chunk_rows must be ... or None`` -> ``--chunk-rows must be ...``."""
    msg = msg.replace("force=True / --force", "--force").replace("force=True", "--force")
    msg, n = _PY_TO_FLAG.subn(lambda m: "--" + m.group(1).replace("_", "-"), msg)
    if n:
        msg = msg.replace(" or None,", ",")  # None is "flag not given", which is always allowed
    return msg


def _os_error(e: OSError) -> str:
    parts = [str(x) for x in (e.filename, e.filename2) if x is not None]
    msg = e.strerror or str(e)
    return ": ".join(parts + [msg])


@contextlib.contextmanager
def _notes(show: bool) -> Iterator[None]:
    """The library's INFO log lines (the ``wcfmt`` logger: removed leftovers of a killed run) as
    ``wcfmt: note: ...`` on stderr, unless ``--quiet``; library calls log them to no one."""
    if not show:
        yield
        return
    log = logging.getLogger("wcfmt")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: note: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error, 2 usage)."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught, _notes(not getattr(args, "quiet", False)):
            warnings.simplefilter("always")
            status = _run(args)
        for w in caught:  # the library's warnings (degenerate quality, ...) as one line each
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
        return status
    except WclustError as e:
        print(f"{PROG}: error: {_cli_message(str(e))}", file=sys.stderr)
    except BrokenPipeError:  # `wcfmt info ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # missing file, permission, disk full (ENOSPC), ...
        print(f"{PROG}: error: {_os_error(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
