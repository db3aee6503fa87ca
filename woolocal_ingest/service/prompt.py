"""The RAG prompt, shared by /v1/chat/completions and /v1/rag/context: numbered sources, instructions to cite
them as [n], the question in the last user turn, and which sources an answer cited."""

from __future__ import annotations

import re
from typing import Any, Sequence

from woolocal_ingest.service.errors import APIError
from woolocal_ingest.stores import SearchHit

RAG_INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. Cite each source you use by its number in square "
    "brackets, like [1] or [2][3]. If the sources do not contain the answer, say that you do not know."
)


def _hit_source(h: SearchHit) -> str:
    src = h.metadata.get("source") or h.id
    lines = (h.metadata.get("loc") or {}).get("lines") if isinstance(h.metadata.get("loc"), dict) else None
    if isinstance(lines, dict) and lines.get("from") is not None:
        src = f"{src}:{lines.get('from')}-{lines.get('to')}"
    return str(src)


def format_sources(hits: Sequence[SearchHit]) -> str:
    """`[1] notes/a.md:3-9: text` blocks, one per hit, in rank order."""
    if not hits:
        return "(no sources were found)"
    return "\n\n".join(f"[{n}] {_hit_source(h)}: {h.text.strip()}" for n, h in enumerate(hits, 1))


def build_prompt(question: str, hits: Sequence[SearchHit]) -> str:
    """The user turn the chat model gets: instructions to cite [n], the numbered sources, then the question."""
    return f"{RAG_INSTRUCTIONS}\n\nSources:\n{format_sources(hits)}\n\nQuestion: {question}"


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def last_user_index(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user" and text_of(m.get("content")).strip():
            return i
    raise APIError(400, "messages hold no user message with text to search the store for", param="messages")


def build_messages(messages: list, hits: Sequence[SearchHit]) -> list:
    """The conversation with its last user message replaced by `build_prompt` (a user turn works with every chat
    template, including those that refuse a system role); other turns are kept as they are."""
    i = last_user_index(messages)
    msg = dict(messages[i])
    prompt = build_prompt(text_of(msg.get("content")), hits)
    content = msg.get("content")
    if isinstance(content, list):  # keep non-text parts (images), one text part with the prompt
        msg["content"] = [{"type": "text", "text": prompt}] + [
            p for p in content if not (isinstance(p, dict) and p.get("type") == "text")]
    else:
        msg["content"] = prompt
    return [*messages[:i], msg, *messages[i + 1:]]


def sources_of(hits: Sequence[SearchHit], answer: str | None = None) -> list[dict]:
    """[{n, id, source, score}] for the hits the prompt numbered; with the answer, `cited` says if [n] is in it."""
    cited = {int(x) for x in re.findall(r"\[(\d{1,4})\]", answer)} if answer is not None else None
    out = []
    for n, h in enumerate(hits, 1):
        d = {"n": n, "id": h.id, "source": h.metadata.get("source"), "score": h.score}
        if cited is not None:
            d["cited"] = n in cited
        out.append(d)
    return out
