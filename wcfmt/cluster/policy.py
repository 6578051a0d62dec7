"""Which tensors of a checkpoint are clustered, and with what K and chunk size.

By default the projection weights of transformer blocks are clustered: attention q/k/v/o
(and their fused forms) and MLP gate/up/down (and theirs), as the common Hugging Face
architectures name them. Everything else stays lossless: embeddings, norms, biases, the LM
head, routers, and any tensor of fewer than 2 dimensions or of a dtype other than
F32/F16/BF16 (spec §5.5).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Final

from ..constants import MAX_K
from ..dtypes import CLUSTERABLE
from ..errors import UsageError

__all__ = ["DEFAULT_K", "DEFAULT_CHUNK_ROWS", "DEFAULT_PATTERNS", "EMBEDDING_PATTERN", "GROUPS", "ClusterPolicy"]

#: Centroids per row chunk. The one place the default lives; tuned from perplexity measurements.
DEFAULT_K: Final[int] = 64

#: Rows per chunk, each chunk with its own centroid table. The one place the default lives.
DEFAULT_CHUNK_ROWS: Final[int | None] = None

# A transformer block: "...layers.3." (Llama, Mistral, Qwen2, Gemma, Phi, NeoX), "h.3." (GPT-2,
# Falcon, BLOOM), "layer.3." (BERT), "blocks.3." (MPT).
_BLOCK: Final[str] = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+\."

#: The default set: one regex per architecture family (each also documents the names it covers).
DEFAULT_PATTERNS: Final[dict[str, str]] = {
    # Llama, Mistral, Mixtral (attention), Qwen2, Gemma, Phi-3, OPT-style out_proj, Phi-2 q/k/v.
    "attention": _BLOCK + r"(?:.*\.)?(?:self_attn|attn|attention)\.(?:q_proj|k_proj|v_proj|o_proj|out_proj|qkv_proj)\.weight$",
    # Llama, Mistral, Qwen2, Gemma, Phi-3 (gate_up_proj), MPT ffn up/down.
    "mlp": _BLOCK + r"(?:.*\.)?(?:mlp|ffn|feed_forward)\.(?:gate_proj|up_proj|down_proj|gate_up_proj)\.weight$",
    # Mixtral / Qwen2-MoE experts (the router, ``gate``, stays lossless).
    "experts": _BLOCK + r"(?:.*\.)?experts\.\d+\.(?:w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$",
    # Phi-2: self_attn.dense, mlp.fc1/fc2 (also OPT's fc1/fc2, directly in the block).
    "phi": _BLOCK + r"(?:.*\.)?(?:self_attn\.dense|(?:mlp\.)?fc1|(?:mlp\.)?fc2)\.weight$",
    # GPT-2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (Conv1D, stored in x out).
    "gpt2": _BLOCK + r"(?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$",
    # GPT-NeoX / Pythia, Falcon, BLOOM: query_key_value, dense, dense_h_to_4h, dense_4h_to_h.
    "neox": _BLOCK
    + r"(?:attention|self_attention)\.(?:query_key_value|dense)\.weight$|"
    + _BLOCK
    + r"mlp\.(?:dense_h_to_4h|dense_4h_to_h)\.weight$",
    # BERT / RoBERTa: attention.self.query/key/value, attention.output.dense, intermediate.dense, output.dense.
    "bert": _BLOCK
    + r"(?:attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight$",
    # MPT / ModernBERT: attn.Wqkv, attn.out_proj / attn.Wo, mlp.Wi / mlp.Wo.
    "wqkv": _BLOCK + r"(?:attn\.(?:Wqkv|Wo)|mlp\.(?:Wi|Wo))\.weight$",
    # Meta's original Llama checkpoints: attention.wq/wk/wv/wo, feed_forward.w1/w2/w3.
    "meta": _BLOCK + r"(?:attention\.(?:wq|wk|wv|wo)|feed_forward\.(?:w1|w2|w3))\.weight$",
}

_DEFAULT_RE: Final[re.Pattern[str]] = re.compile("|".join(f"(?:{p})" for p in DEFAULT_PATTERNS.values()))

#: Token embeddings and LM heads (Llama/Mistral/Qwen2 embed_tokens and lm_head, GPT-2 wte, BERT
#: word_embeddings, NeoX embed_in/embed_out, Meta tok_embeddings/output): clustered by the
#: entropy-constrained encoder (``embeddings=True``), lossless otherwise. Position and token-type
#: embeddings are small and stay lossless.
EMBEDDING_PATTERN: Final[str] = (
    r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$"
    r"|(?:^|\.)(?:lm_head|embed_out)\.weight$|^output\.weight$"
)
_EMBEDDING_RE: Final[re.Pattern[str]] = re.compile(EMBEDDING_PATTERN)
_ATTENTION_RE: Final[re.Pattern[str]] = re.compile(
    r"(?:attn|attention|\.(?:q_proj|k_proj|v_proj|o_proj|wq|wk|wv|wo)\.)"
)

#: Budget groups of the entropy-constrained encoder (`ClusterPolicy.group`).
GROUPS: Final[tuple[str, ...]] = ("embed", "attention", "mlp")


def _compile(patterns: Sequence[str] | None, what: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise UsageError(f"{what}: invalid regex {p!r}: {e}") from e
    return out


def _check_k(k: object, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise UsageError(f"{what} must be an integer in 1..{MAX_K}, got {k!r}")
    return k


def _check_bits(b: object, what: str) -> float:
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 16:
        raise UsageError(f"{what} must be a number of bits per weight in (0, 16], got {b!r}")
    return float(b)


class ClusterPolicy:
    """Decide, per tensor, whether it is clustered and with what ``(k, chunk_rows)``.

    - ``k``: centroids per chunk (1..256); ``chunk_rows``: rows per chunk, or None for one
      table per tensor.
    - ``include`` / ``exclude``: regexes (`re.search` on the tensor name) added to / removed
      from the default set; ``exclude`` wins. Only F32/F16/BF16 tensors with ≥ 2 dimensions
      (and at least one element) are ever clustered, whatever the patterns say.
    - ``k_overrides``: regex → K for tensors that are clustered; the first match, in the
      dict's order, wins.
    - ``bits``: instead of ``k``, the entropy-constrained encoder at this model-wide average of
      stored bits per weight (the allocation lives in `wcfmt.convert.pack`);
      ``bits_overrides``: regex → bits for tensors that get a budget of their own;
      ``embeddings``: also cluster token embeddings and LM heads (`EMBEDDING_PATTERN`).

    >>> p = ClusterPolicy(k_overrides={r"\\.down_proj\\.": 128})
    >>> p.decide("model.layers.0.self_attn.q_proj.weight", (576, 576), "BF16")
    (64, None)
    >>> p.decide("model.layers.0.mlp.down_proj.weight", (576, 1536), "BF16")
    (128, None)
    >>> p.decide("model.embed_tokens.weight", (49152, 576), "BF16") is None
    True
    """

    def __init__(
        self,
        k: int | None = DEFAULT_K,
        chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        k_overrides: dict[str, int] | None = None,
        *,
        bits: float | None = None,
        bits_overrides: dict[str, float] | None = None,
        embeddings: bool = False,
    ) -> None:
        if bits is not None:
            if k is not None and k != DEFAULT_K:
                raise UsageError(f"give k or bits, not both (k={k!r}, bits={bits!r})")
            k = None
            bits = _check_bits(bits, "bits")
        elif k is None:
            raise UsageError("give k or bits")
        self.k = None if k is None else _check_k(k, "k")
        self.bits = bits
        self.embeddings = bool(embeddings)
        self.bits_overrides = dict(bits_overrides or {})
        self._bits_overrides = [
            (rx, _check_bits(b, f"bits_overrides[{pat!r}]"))
            for rx, (pat, b) in zip(_compile(list(self.bits_overrides), "bits_overrides"), self.bits_overrides.items())
        ]
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise UsageError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
        self.chunk_rows = chunk_rows
        for what, pats in (("include", include), ("exclude", exclude)):
            if isinstance(pats, str):
                raise UsageError(f"{what} must be a list of regexes, not one string")
        self.include = list(include or [])
        self.exclude = list(exclude or [])
        self.k_overrides = dict(k_overrides or {})
        self._include = _compile(self.include, "include")
        self._exclude = _compile(self.exclude, "exclude")
        self._overrides = [
            (rx, _check_k(kk, f"k_overrides[{pat!r}]"))
            for rx, (pat, kk) in zip(_compile(list(self.k_overrides), "k_overrides"), self.k_overrides.items())
        ]

    def matches(self, name: str) -> bool:
        """True when ``name`` is in the clustered set (default ∪ include, minus exclude), dtype aside."""
        if any(rx.search(name) for rx in self._exclude):
            return False
        if self.embeddings and _EMBEDDING_RE.search(name):
            return True
        return bool(_DEFAULT_RE.search(name)) or any(rx.search(name) for rx in self._include)

    @staticmethod
    def group(name: str) -> str:
        """The budget group of a tensor: ``"embed"``, ``"attention"`` or ``"mlp"`` (everything else).

        >>> ClusterPolicy.group("model.embed_tokens.weight"), ClusterPolicy.group("model.layers.0.self_attn.q_proj.weight")
        ('embed', 'attention')
        """
        if _EMBEDDING_RE.search(name):
            return "embed"
        return "attention" if _ATTENTION_RE.search(name) else "mlp"

    def bits_for(self, name: str) -> float | None:
        """A per-tensor bits override (first matching regex), or None: the tensor shares its group's λ."""
        return next((b for rx, b in self._bits_overrides if rx.search(name)), None)

    def clusters(self, name: str, shape: Sequence[int], dtype: str) -> bool:
        """True when tensor ``name`` of that shape and dtype is clustered (either mode)."""
        shape = tuple(int(s) for s in shape)
        if dtype not in CLUSTERABLE or len(shape) < 2 or math.prod(shape) == 0:
            return False
        return self.matches(name)

    def decide(self, name: str, shape: Sequence[int], dtype: str) -> tuple[int, int | None] | None:
        """Return ``(k, chunk_rows)`` to cluster tensor ``name``, or None to store it lossless."""
        if not self.clusters(name, shape, dtype):
            return None
        k = next((kk for rx, kk in self._overrides if rx.search(name)), self.k)
        if k is None:
            raise UsageError(f"{name}: a bits policy gives no k (use clusters() and the bit allocation)")
        return k, self.chunk_rows

    def __repr__(self) -> str:
        mode = f"bits={self.bits}, bits_overrides={self.bits_overrides}" if self.bits is not None else f"k={self.k}"
        return (
            f"ClusterPolicy({mode}, chunk_rows={self.chunk_rows}, include={self.include}, "
            f"exclude={self.exclude}, k_overrides={self.k_overrides}, embeddings={self.embeddings})"
        )
