"""Re-chunking: a text longer than the model takes is cut into consecutive pieces that fit and concatenate to it
exactly (paragraph, line, sentence or word boundaries first), each piece's metadata saying where it came from."""

from __future__ import annotations

import bisect
import copy
from typing import TYPE_CHECKING, Any

from woolocal_ingest.migrate.errors import MigrationError

if TYPE_CHECKING:
    from woolocal_ingest.embedders.base import Embedder

SPLIT_KEY = "woolocalSplit"
_SEPARATORS = ("\n\n", "\n", ". ", " ")


def token_limit(emb: "Embedder") -> int:
    counter = emb.tokens
    prefix = getattr(emb.info, "doc_prefix", "") or ""
    limit = emb.max_tokens - counter.special_tokens - (counter.count(prefix) if prefix else 0)
    if limit < 8:
        raise MigrationError(f"model {emb.model_name}: max {emb.max_tokens} tokens leaves {limit} for text")
    return limit


def split_text(counter: Any, text: str, limit: int) -> list[str]:
    """Consecutive pieces of `text` of at most `limit` tokens each that concatenate to `text` exactly; cuts prefer a
    paragraph, line, sentence or word boundary in the second half of each window, else fall on a token boundary."""
    token_starts = getattr(counter, "token_starts", None)  # a remote model's counter may not know offsets
    if token_starts is None:  # a counter without offsets: token boundaries only
        pieces = counter.split(text, limit)
    else:
        starts = token_starts(text)
        if len(starts) <= limit:
            return [text]
        pieces, pos, t = [], 0, 0
        while len(starts) - t > limit:
            hard = starts[t + limit]
            if hard <= pos:  # zero-width tokens: move on to the next real boundary
                nxt = bisect.bisect_right(starts, pos)
                hard = starts[nxt] if nxt < len(starts) else len(text)
            window = text[pos:hard]
            cut = hard
            for sep in _SEPARATORS:
                i = window.rfind(sep)
                if i >= len(window) // 2 and i + len(sep) < len(window):
                    cut = pos + i + len(sep)
                    break
            pieces.append(text[pos:cut])
            pos = cut
            t = bisect.bisect_left(starts, pos)
        if pos < len(text) or not pieces:
            pieces.append(text[pos:])
    # A cut inside a word can tokenise differently on its own: split any piece that now exceeds the limit again.
    out: list[str] = []
    for p in pieces:
        n, m = counter.count(p), limit
        parts = [p]
        while n > limit and m > 1:
            m = max(1, m - max(1, limit // 16))
            parts = counter.split(p, m)
            n = max(counter.count(x) for x in parts)
        if n > limit:
            raise MigrationError(f"cannot cut a text into pieces of at most {limit} tokens")
        out.extend(parts)
    assert "".join(out) == text
    return out


def piece_metadata(meta: dict, orig_id: str, part: int, parts: int, start: int, end: int, text: str) -> dict:
    m = copy.deepcopy(meta)
    m[SPLIT_KEY] = {"id": orig_id, "part": part, "parts": parts, "start": start, "end": end}
    lines = m.get("loc", {}).get("lines") if isinstance(m.get("loc"), dict) else None
    if isinstance(lines, dict):
        lo, hi = lines.get("from"), lines.get("to")
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi))
        if ints and hi - lo == text.rstrip("\n").count("\n"):  # the chunk's own range: give the piece its part
            lines["from"] = lo + text[:start].count("\n")
            lines["to"] = lo + text[:max(start, end - 1)].count("\n")
    return m
