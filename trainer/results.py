"""What a step's backward learnt of each tenant: its losses, its records per loss path, and the
logprob gap between the trainer and the server on the tokens the trained weights sampled."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Gap:
    """|trainer logprob - vLLM logprob| over the tokens compared."""

    tokens: int = 0
    total: float = 0.0
    max: float = 0.0
    outside: int = 0  # tokens vLLM sampled that the trainer's top-k/top-p set excludes (not in the mean)
    # Per rated record (its index in `TenantData.rated`): (total, tokens), so that a step over the
    # bound can tell which records pushed it there (they are quarantined, the others kept).
    records: dict[int, tuple[float, int]] = field(default_factory=dict)

    def add(self, trainer_N: torch.Tensor, served_N: torch.Tensor, rows_N: torch.Tensor | None = None) -> None:
        """`rows_N`: each token's rated record, when the tokens are records' (not on-policy groups')."""
        trainer_N, served_N = trainer_N.detach().float().cpu(), served_N.detach().float().cpu()
        finite = torch.isfinite(trainer_N) & torch.isfinite(served_N)
        diff = (trainer_N[finite] - served_N[finite]).abs()
        self.outside += int((~finite).sum())
        if diff.numel():
            self.tokens += diff.numel()
            self.total += float(diff.sum())
            self.max = max(self.max, float(diff.max()))
            if rows_N is not None:
                rows = rows_N.detach().cpu()[finite]
                for row in rows.unique().tolist():
                    total, tokens = self.records.get(row, (0.0, 0))
                    mine = diff[rows == row]
                    self.records[row] = (total + float(mine.sum()), tokens + mine.numel())

    @property
    def mean(self) -> float | None:
        return self.total / self.tokens if self.tokens else None

    def records_over(self, bound: float) -> list[int]:
        """The rated records whose own mean gap is above `bound` (indices into `TenantData.rated`)."""
        return sorted(row for row, (total, tokens) in self.records.items() if total / tokens > bound)


@dataclass
class TenantResult:
    """What a step's backward learnt of one tenant."""

    losses: dict[str, float] = field(default_factory=dict)
    paths: dict[str, int] = field(default_factory=dict)  # records per loss path: importance, ratio_free, correction
    gap: Gap = field(default_factory=Gap)
    lagged_groups: int = 0  # on-policy groups sampled by the previous version (pipelined), corrected as off-policy
    taught_groups: int = 0  # on-policy groups that took a gradient pass (episodes that all scored alike take none)
