"""The method built on the format: tools of the weight-clustering paper, over packed files.

- `wcfmt.method.heal`: centroid-only fine-tuning of a packed causal LM ("healing");
- `wcfmt.method.transforms`: centroid transforms (rank-preserving, rank-breaking, affine correction);
- `wcfmt.method.sensitivity`: per-matrix sensitivity and K chosen against a perplexity budget.

None of them is needed to read or write a ``.wclust`` file; they use the format's public API
(`wcfmt.safe_open`, `wcfmt.rewrite_centroids`, the writer). ``wcfmt.heal``, ``wcfmt.transforms``
and ``wcfmt.sensitivity`` stay importable under their 0.2 names.
"""
