"""What `wcfmt.pack` and `wcfmt.unpack` return: per output file its tensors and bytes, and the totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..io.safetensors_io import format_size

__all__ = ["FileReport", "PackReport", "UnpackReport"]


@dataclass
class FileReport:
    """One output file: its tensors by codec and its size (and, for pack, its source file's size).

    Unpack re-splits tensors into new shards, so its files have no single source (0 there).
    """

    src: Path
    dst: Path
    tensors: int = 0
    clustered: int = 0
    lossless: int = 0
    aliases: int = 0
    source_bytes: int = 0
    output_bytes: int = 0


@dataclass
class _Report:
    src: Path
    dst: Path
    files: list[FileReport] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tensors(self) -> int:
        return sum(f.tensors for f in self.files)

    #: Bytes of the model files read (.safetensors for pack, .wclust for unpack) and written.
    source_bytes: int = 0
    output_bytes: int = 0

    @property
    def ratio(self) -> float:
        """Output bytes / source bytes of the model files (copied files not counted)."""
        return self.output_bytes / self.source_bytes if self.source_bytes else float("nan")


@dataclass
class PackReport(_Report):
    """What `pack` did. ``ratio`` is packed bytes / source bytes (below 1 is smaller)."""

    #: Top-level .safetensors files of the source folder that its index does not list (not packed).
    skipped: list[str] = field(default_factory=list)
    #: Clustered tensors whose recorded SQNR is below DEGENERATE_SQNR_DB: (name, SQNR dB).
    degenerate: list[tuple[str, float]] = field(default_factory=list)
    #: The commit URL when ``push_to_hub`` was given.
    pushed: str | None = None
    #: Wall seconds per stage: ``plan``, ``calibrate`` and ``allocate`` (these two run at once),
    #: ``encode+write`` (clustering and writing overlap), ``push``.
    stages: dict[str, float] = field(default_factory=dict)
    #: Budget groups whose requested bits the encoder could not spend: group -> why (a cap).
    capped: dict[str, str] = field(default_factory=dict)
    #: With ``budget_ppl``: the K chosen per matrix.
    chosen_k: dict[str, int] = field(default_factory=dict)

    @property
    def clustered(self) -> int:
        return sum(f.clustered for f in self.files)

    @property
    def lossless(self) -> int:
        return sum(f.lossless for f in self.files)

    def summary(self) -> str:
        return (
            f"packed {self.src} -> {self.dst}: {self.tensors} tensors ({self.clustered} clustered, "
            f"{self.lossless} lossless) in {len(self.files)} file(s), {format_size(self.source_bytes)} -> "
            f"{format_size(self.output_bytes)}, ratio {self.ratio:.3f}, {self.seconds:.1f} s"
        )


@dataclass
class UnpackReport(_Report):
    """What `unpack` did. Tied tensors (aliases) are written once: ``dropped`` maps alias -> kept name."""

    dropped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        tied = f", {len(self.dropped)} tied alias(es) not written" if self.dropped else ""
        return (
            f"unpacked {self.src} -> {self.dst}: {self.tensors} tensors in {len(self.files)} file(s){tied}, "
            f"{format_size(self.source_bytes)} -> {format_size(self.output_bytes)}, {self.seconds:.1f} s"
        )
