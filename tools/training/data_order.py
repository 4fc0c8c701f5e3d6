"""Which samples make each global batch: exact passes over every source at its ratio, a pure function of
(seed, epoch, step), in constant memory whatever the number of samples.

An epoch has `steps × global_batch` draws; each source gets its share of them by ratio (largest remainders). A
source's draws continue from epoch to epoch through passes over its samples: pass k visits every sample of the
source once, in an order seeded by (seed, source, k). The draws of an epoch are interleaved by a seeded bijection of
its positions. Orders are keyed pseudo-random permutations (a Feistel network with cycle walking) evaluated per
position, so nothing the size of the data set is ever held and no step recomputes a permutation.

By default an epoch is the fewest whole global batches in which every source completes a pass at its ratio: the
source with the most samples per unit of ratio is read once, a source smaller than its share repeats in whole
passes (its samples are each seen ⌊share/size⌋ or one more times), and the last batch may begin the next pass of
a source.
"""

import math

import numpy as np

from align.errors import AlignError

_MASK64 = np.uint64(2**64 - 1)


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a strong 64-bit mixing of each value (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def key_of(*parts: int) -> np.uint64:
    """One 64-bit key from integers (seed, epoch, source, pass, …)."""
    key = np.uint64(0x243F6A8885A308D3)
    for part in parts:
        key = _mix(np.array([key ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF)]))[0]
    return key


def permute(positions: np.ndarray, size: int, key: np.uint64) -> np.ndarray:
    """A keyed bijection of range(size), evaluated at `positions` (a 4-round Feistel network with cycle walking)."""
    positions = np.asarray(positions, dtype=np.uint64)
    if size <= 1:
        return positions.astype(np.int64)
    half = max(1, math.ceil(math.ceil(math.log2(size)) / 2))
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for r in range(4):
            with np.errstate(over="ignore"):
                f = _mix(right ^ (key + np.uint64(r) * np.uint64(0x9E3779B97F4A7C15))) & mask
            left, right = right, left ^ f
        return (left << shift) | right

    out = rounds(positions)
    outside = out >= np.uint64(size)
    while outside.any():  # the domain is at most 4× the size, so few walks are needed
        out[outside] = rounds(out[outside])
        outside = out >= np.uint64(size)
    return out.astype(np.int64)


def shares(total: int, ratios: list[float]) -> list[int]:
    """`total` split by `ratios` (largest remainders, ties to the earlier source); sums to `total`."""
    weight = sum(ratios)
    exact = [total * r / weight for r in ratios]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(ratios)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


class DataOrder:
    """Global batches over sources of `sizes` samples mixed by `ratios` (sample ids are source offset + index)."""

    def __init__(self, sizes: list[int], ratios: list[float], global_batch: int, seed: int,
                 steps_per_epoch: int | None = None):
        live = [i for i, n in enumerate(sizes) if n > 0]
        if not live:
            raise AlignError("no usable training samples (see the stage's rejects.jsonl)")
        self.sizes, self.global_batch, self.seed = list(sizes), global_batch, seed
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.sources = live
        weights = [ratios[i] for i in live]
        if steps_per_epoch is None:
            # Draws needed for the source with the most samples per unit of ratio to complete one pass.
            needed = max(sizes[i] * sum(weights) / ratios[i] for i in live)
            steps_per_epoch = max(1, math.ceil(round(needed, 6) / global_batch))
        self.steps_per_epoch = steps_per_epoch
        self.draws = steps_per_epoch * global_batch
        self.per_epoch = shares(self.draws, weights)  # draws of each live source in one epoch
        self.block_starts = np.concatenate([[0], np.cumsum(self.per_epoch)]).astype(np.int64)

    @property
    def size(self) -> int:
        """Samples over all sources."""
        return int(self.offsets[-1])

    def sample_ids(self, epoch: int, step: int) -> np.ndarray:
        """Sample ids of global batch `step` of `epoch`, in draw order."""
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch) % self.draws
        slots = permute(positions, self.draws, key_of(self.seed, epoch))
        block = np.searchsorted(self.block_starts, slots, side="right") - 1
        ids = np.empty(len(slots), dtype=np.int64)
        for b in np.unique(block):
            source = self.sources[b]
            here = block == b
            draws = epoch * self.per_epoch[b] + (slots[here] - self.block_starts[b])
            size = self.sizes[source]
            passes, within = np.divmod(draws, size)
            index = np.empty_like(within)
            for k in np.unique(passes):
                at = passes == k
                index[at] = permute(within[at], size, key_of(self.seed, 1_000_003 + source, int(k)))
            ids[here] = self.offsets[source] + index
        return ids

    @property
    def draws_per_source(self) -> dict[int, int]:
        """How many draws each source gets in every epoch."""
        return {self.sources[b]: n for b, n in enumerate(self.per_epoch)}
