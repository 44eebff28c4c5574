"""How rows are cut into passes: the fewest padded tokens within a pass's token budget. Plain
Python on lengths (no torch): the batching module runs what this cuts."""

from __future__ import annotations

from typing import Protocol


class PrefixGroup(Protocol):
    """A prompt and the rows that continue it (batching.PrefixGroup)."""

    prompt: list[int]
    completions: list[list[int]]

    def rows(self) -> list[list[int]]: ...


class TenantBatch(Protocol):
    """One tenant's prompt and completion rows (batching.TenantBatch)."""

    prompts: list[list[int]]
    completions: list[list[int]]

# A shared-prefix pass's rows go through at most this many forwards, cut by length; each forward
# beyond the first must save more padding than this many tokens' worth of fixed cost.
MAX_BUCKETS = 4
BUCKET_OVERHEAD_TOKENS = 64


def length_buckets(lengths: list[int], max_buckets: int = MAX_BUCKETS,
                   overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices cut into at most `max_buckets` buckets, each padded to its own longest row, so
    that padded tokens plus `overhead` per bucket (a forward of its own) are fewest: the buckets are
    runs of the rows sorted by length (found by dynamic programming). Indices ascend in a bucket."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    if n == 0:
        return []
    inf = float("inf")
    # best[b][j]: least cost of rows order[:j] in b buckets; cut[b][j]: where the last one starts.
    best = [[inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for b in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            for i in range(b - 1, j):
                cost = best[b - 1][i] + (j - i) * sizes[j - 1] + overhead
                if cost < best[b][j]:
                    best[b][j], cut[b][j] = cost, i
    b = min(range(1, max_buckets + 1), key=lambda k: best[k][n])
    buckets, j = [], n
    while b:
        i = cut[b][j]
        buckets.append(sorted(order[i:j]))
        b, j = b - 1, i
    return buckets[::-1]


def padded_tokens(lengths: list[int]) -> int:
    """Tokens a forward over these rows computes once they are cut into `length_buckets`."""
    return sum(len(b) * max(lengths[i] for i in b) for b in length_buckets(lengths))


def pack_groups(groups: list[PrefixGroup], max_tokens: int) -> list[list[int]]:
    """Group indices in order, cut into passes whose padded size (prompts plus completions) stays
    within max_tokens; a group larger than that gets a pass of its own."""
    passes: list[list[int]] = [[]]
    prompt_width = completion_width = 0
    for i, g in enumerate(groups):
        width = max(len(r) for r in g.rows())
        pw, cw = max(prompt_width, len(g.prompt)), max(completion_width, width)
        rows = sum(len(groups[j].completions) for j in passes[-1]) + len(g.completions)
        if passes[-1] and (len(passes[-1]) + 1) * pw + rows * cw > max_tokens:
            passes.append([])
            pw, cw = len(g.prompt), width
        passes[-1].append(i)
        prompt_width, completion_width = pw, cw
    return [p for p in passes if p]


def pack(batches: list[TenantBatch], max_tokens: int) -> list[list[tuple[int, int]]]:
    """(tenant, row) pairs in order, cut into passes whose padded size stays within max_tokens."""
    passes: list[list[tuple[int, int]]] = [[]]
    width = 0
    for t, batch in enumerate(batches):
        for r, (p, c) in enumerate(zip(batch.prompts, batch.completions)):
            new_width = max(width, len(p) + len(c))
            if passes[-1] and (len(passes[-1]) + 1) * new_width > max_tokens:
                passes.append([])
                new_width = len(p) + len(c)
            passes[-1].append((t, r))
            width = new_width
    return [p for p in passes if p]
