"""Search modes and how dense and lexical rankings are fused.

`dense`: the FAISS index (cosine of the query's embedding). `lexical`: BM25 over the same rows
(`woolocal_ingest.lexical`). `hybrid` (the default for text queries): both, fused by reciprocal rank fusion (RRF,
Cormack et al. 2009): a row's score is the sum over the two rankings of 1 / (RRF_K + rank). RRF was chosen over a
normalised score mix by measurement (`bench/README.md`, conda set, nDCG@10): RRF 0.785; the min-max mix 0.749 /
0.769 / 0.794 at dense weight 0.3 / 0.5 / 0.7. The mix's best weight edges RRF by 0.009 (within one question of 70)
but loses Recall@10, and which weight is best depends on the store (BM25 scores are unbounded and shift with the
corpus; cosines cluster by model); RRF has no weight to tune.
Each ranking contributes its best `max(k, FUSION_DEPTH)` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from woolocal_ingest.errors import WoolocalError

__all__ = ["DEFAULT_MODE", "FUSION_DEPTH", "MODES", "RRF_K", "Fused", "SearchModeError", "check_mode", "fuse_mix",
           "fuse_rrf"]

MODES = ("hybrid", "dense", "lexical")
DEFAULT_MODE = "hybrid"
RRF_K = 60  # the constant of the RRF paper; rank 1 scores 1/61
FUSION_DEPTH = 100  # rows each ranking contributes to the fusion
MIX_ALPHA = 0.5  # weight of the dense score in the normalised mix (the measured alternative)


class SearchModeError(WoolocalError, ValueError):
    """A search mode this library does not know, or one the query cannot be searched by."""

    exit_code = 2


def check_mode(mode: str | None, text: bool) -> str:
    """The mode a search runs in: `mode`, or `hybrid` for a text query and `dense` for a query vector.
    SearchModeError naming the modes for an unknown one, or for lexical/hybrid without query text."""
    if mode is None:
        return DEFAULT_MODE if text else "dense"
    if mode not in MODES:
        raise SearchModeError(f"search mode {mode!r} is not one of {', '.join(MODES)}")
    if mode != "dense" and not text:
        raise SearchModeError(f"search mode {mode!r} needs the query text (a query vector alone can only be "
                              "searched by mode 'dense')")
    return mode


@dataclass(frozen=True)
class Fused:
    """One fused row: its fused score and each ranking's own score (None: that ranking did not return it)."""

    row: int
    score: float
    dense: float | None
    lexical: float | None


def fuse_rrf(dense: Sequence[tuple[int, float]], lexical: Sequence[tuple[int, float]], k: int,
             rrf_k: int = RRF_K) -> list[Fused]:
    """Reciprocal rank fusion of two rankings of (row, score), best first; the `k` best rows (ties: dense first)."""
    score: dict[int, float] = {}
    dscore = dict(dense)
    lscore = dict(lexical)
    for ranking in (dense, lexical):
        for rank, (row, _) in enumerate(ranking, 1):
            score[row] = score.get(row, 0.0) + 1.0 / (rrf_k + rank)
    order = sorted(score, key=lambda r: (-score[r], r not in dscore, r))
    return [Fused(r, score[r], dscore.get(r), lscore.get(r)) for r in order[:k]]


def fuse_mix(dense: Sequence[tuple[int, float]], lexical: Sequence[tuple[int, float]], k: int,
             alpha: float = MIX_ALPHA) -> list[Fused]:
    """The measured alternative: min-max normalise each ranking's scores over its returned rows and mix them,
    `alpha` * dense + (1 - alpha) * lexical (a row a ranking did not return counts 0 there)."""

    def norm(rs: Sequence[tuple[int, float]]) -> dict[int, float]:
        if not rs:
            return {}
        lo, hi = min(s for _, s in rs), max(s for _, s in rs)
        return {r: (s - lo) / (hi - lo) if hi > lo else 1.0 for r, s in rs}

    nd, nl = norm(dense), norm(lexical)
    dscore, lscore = dict(dense), dict(lexical)
    score = {r: alpha * nd.get(r, 0.0) + (1 - alpha) * nl.get(r, 0.0) for r in {*nd, *nl}}
    order = sorted(score, key=lambda r: (-score[r], r not in dscore, r))
    return [Fused(r, score[r], dscore.get(r), lscore.get(r)) for r in order[:k]]
