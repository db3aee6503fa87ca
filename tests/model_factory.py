"""Small randomly initialised BERT models for 768- and 1024-dim plumbing tests (no download possible here).

Each is a real sentence-transformers folder: config.json + model.safetensors (random weights, fixed seed), the
packaged MiniLM's tokenizer, modules.json, 1_Pooling/config.json (mean or CLS), sentence_bert_config.json.
Quality is meaningless; shapes, pooling, dims and every code path are real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_bert(dest: Path, hidden: int, pooling: str = "mean", layers: int = 2, heads: int | None = None,
              max_seq: int = 128, seed: int = 0, normalize: bool = True) -> Path:
    """Write a random BERT sentence-transformers model with `hidden` dims into `dest`; returns `dest`."""
    import torch
    from transformers import BertConfig, BertModel

    from woolocal_ingest.embedders import resolve_model

    base = resolve_model(None).path
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    heads = heads or max(1, hidden // 64)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=512)
    BertModel(cfg).eval().save_pretrained(dest, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base / name).exists():
            shutil.copy(base / name, dest / name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dest / "modules.json").write_text(json.dumps(modules, indent=2))
    (dest / "1_Pooling").mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq, "do_lower_case": False}))
    return dest
