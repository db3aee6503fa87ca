"""Store search and chat RAG routes (placeholder until written)."""

from fastapi import APIRouter

router = APIRouter()
