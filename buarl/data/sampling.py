"""Two-stream batches: every batch holds `labeled_bs` labeled and the rest unlabeled items.

Each stream walks through its own shuffled permutation and reshuffles when it runs out,
like SSL4MIS's TwoStreamBatchSampler, but endless and driven by one torch.Generator so
that a seed fixes every batch and a resumed run can restore the exact stream.
"""
from __future__ import annotations

import torch


class Stream:
    def __init__(self, indices: list[int], gen: torch.Generator):
        if not indices:
            raise ValueError("a sampling stream needs at least one index")
        self.indices = torch.as_tensor(indices)
        self.gen = gen
        self._order = torch.empty(0, dtype=torch.long)

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if len(self._order) == 0:
                self._order = self.indices[torch.randperm(len(self.indices), generator=self.gen)]
            k = min(n - len(out), len(self._order))
            out += self._order[:k].tolist()
            self._order = self._order[k:]
        return out


class TwoStreamSampler:
    def __init__(self, labeled: list[int], unlabeled: list[int], labeled_bs: int,
                 unlabeled_bs: int, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.labeled = Stream(labeled, self.gen)
        self.unlabeled = Stream(unlabeled, self.gen) if unlabeled_bs else None
        self.labeled_bs, self.unlabeled_bs = labeled_bs, unlabeled_bs

    def next(self) -> tuple[list[int], list[int]]:
        lab = self.labeled.take(self.labeled_bs)
        unl = self.unlabeled.take(self.unlabeled_bs) if self.unlabeled else []
        return lab, unl

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "lab": self.labeled._order,
                "unl": self.unlabeled._order if self.unlabeled else torch.empty(0, dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.labeled._order = state["lab"]
        if self.unlabeled:
            self.unlabeled._order = state["unl"]
