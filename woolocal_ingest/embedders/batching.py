"""Token-budget batching: sort texts by token length and cut batches by padded tokens, not a fixed count."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

DEFAULT_TOKEN_BUDGET = 8192  # padded tokens per batch (batch size x longest sequence in it)
DEFAULT_MAX_BATCH = 128


@dataclass
class BatchPlan:
    """Batches of input indices, and how many padded vs real tokens they cost."""

    batches: list[list[int]] = field(default_factory=list)
    real_tokens: int = 0
    padded_tokens: int = 0

    @property
    def padding_waste(self) -> float:
        """Share of computed tokens that are padding (0 = none)."""
        return 0.0 if not self.padded_tokens else 1.0 - self.real_tokens / self.padded_tokens

    def to_dict(self) -> dict:
        return {"batches": len(self.batches), "real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens,
                "padding_waste": round(self.padding_waste, 4)}


def token_budget_batches(lengths: Sequence[int], budget: int = DEFAULT_TOKEN_BUDGET,
                         max_batch: int = DEFAULT_MAX_BATCH) -> BatchPlan:
    """Indices sorted longest first, cut so that len(batch) x longest(batch) <= budget (a single text always fits)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    plan = BatchPlan(real_tokens=int(sum(lengths)))
    batch: list[int] = []
    longest = 0
    for i in order:
        n = max(1, lengths[i])
        if batch and ((len(batch) + 1) * max(longest, n) > budget or len(batch) >= max_batch):
            plan.batches.append(batch)
            plan.padded_tokens += len(batch) * longest
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        plan.batches.append(batch)
        plan.padded_tokens += len(batch) * longest
    return plan


def fixed_batches(lengths: Sequence[int], batch_size: int) -> BatchPlan:
    """Batches of `batch_size` in input order (the naive baseline the benchmark compares against)."""
    plan = BatchPlan(real_tokens=int(sum(lengths)))
    for start in range(0, len(lengths), batch_size):
        idx = list(range(start, min(start + batch_size, len(lengths))))
        plan.batches.append(idx)
        plan.padded_tokens += len(idx) * max(max(1, lengths[i]) for i in idx)
    return plan


def padded_inputs(encodings: Sequence, batch: Sequence[int]) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """One batch of tokenizer encodings (`tokenizers.Encoding`: ids, attention_mask, type_ids) as the model's
    int64 inputs, padded with zeros to the batch's longest: (input_ids, attention_mask, token_type_ids)."""
    import numpy as np

    seq = max(len(encodings[i].ids) for i in batch)
    ids = np.zeros((len(batch), seq), dtype=np.int64)
    mask = np.zeros((len(batch), seq), dtype=np.int64)
    types = np.zeros((len(batch), seq), dtype=np.int64)
    for row, i in enumerate(batch):
        e = encodings[i]
        n = len(e.ids)
        ids[row, :n], mask[row, :n], types[row, :n] = e.ids, e.attention_mask, e.type_ids
    return ids, mask, types
