"""The query-time HTTP service (`woolocal serve`): OpenAI-compatible embeddings, store search, chat RAG, health."""
