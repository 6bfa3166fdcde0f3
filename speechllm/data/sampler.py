"""Batch samplers: duration-bucketed, DDP-aware, resumable training batches drawn from a phased task mixture.

Training batch ``i`` is a pure function of ``(seed, i)``, so resuming needs only the number of batches
already consumed, and every rank agrees on the task of every batch without communicating:

1. The task of batch ``i`` is drawn from the mixture of the phase that contains ``i``.
2. Each task has its own endless stream of batches, epoch after epoch: a fresh permutation of the
   task's examples, split into duration buckets, sorted by duration within pools of a few batches'
   worth (so a batch's clips are alike in length even where a small task has few, wide buckets),
   packed greedily under the budgets (seconds, tokens, size) and put in shuffled order so that short
   and long batches alternate.
3. The ``k``-th draw of a task hands that task's stream positions ``k * world_size + rank`` to the
   ranks, so the ranks never share an example within a task epoch, and a task too small to fill one
   batch per rank alternates whole epochs between ranks instead of shrinking its batches.

Each item of a batch is ``(example_index, task_epoch)``: the dataset can vary augmentation or the
instruction template with the epoch and still be reproducible.
"""

from __future__ import annotations

import math
import zlib
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

Batch = list[tuple[int, int]]  # (example index, task epoch)

_CHUNK = 4096  # task draws are generated this many batches at a time, each chunk from its own seed
_DRAWS, _EPOCH = 0, 1  # the purposes random streams are seeded for
_MIN_BATCHES_PER_BUCKET = 4  # fewer buckets for small tasks, so bucketing does not leave mostly part-full batches
_POOL_BATCHES = 4  # within a bucket, examples are sorted by duration in pools of this many batches' worth


@dataclass(frozen=True)
class MixturePhase:
    """Task weights for the training batches before ``until_batch`` (and after the previous phase)."""

    until_batch: int
    weights: dict[str, float]


def temperature_weights(
    weights: Mapping[str, float], sizes: Mapping[str, int], temperature: float | None
) -> dict[str, float]:
    """Task probabilities: the given weights, each times ``size ** (1 / temperature)`` if a temperature is set.

    ``temperature=1`` samples in proportion to task size; large temperatures approach the given weights.
    """
    if temperature is not None and temperature <= 0:
        raise ValueError(f"task temperature must be positive, got {temperature}")
    for task, weight in weights.items():
        if weight < 0:
            raise ValueError(f"task {task!r} has a negative weight {weight}")
    scaled = {
        task: weight * (sizes[task] ** (1 / temperature) if temperature is not None and weight > 0 else 1.0)
        for task, weight in weights.items()
    }
    total = sum(scaled.values())
    if total <= 0:
        raise ValueError(f"every task has weight 0 in {dict(weights)}; give at least one task a positive weight")
    return {task: w / total for task, w in scaled.items()}


@dataclass(frozen=True)
class _Budget:
    """Limits on one batch; an example over budget on its own still forms a batch of one."""

    seconds: float
    tokens: float = math.inf
    size: float = math.inf

    def pack(self, seconds: np.ndarray, tokens: np.ndarray | None, segments) -> list[tuple[int, int]]:
        """Greedy, order-keeping packing of each segment ``[lo, hi)`` into batches ``[a, b)``.

        One binary search per batch on prefix sums, so the Python loop runs per batch, not per example.
        """
        cum_seconds = np.concatenate(([0.0], np.cumsum(seconds))).tolist()
        cum_tokens = np.concatenate(([0], np.cumsum(tokens))).tolist() if tokens is not None else None
        batches = []
        for lo, hi in segments:
            a = lo
            while a < hi:
                b = bisect_right(cum_seconds, cum_seconds[a] + self.seconds, a + 1, hi + 1) - 1
                if cum_tokens is not None:
                    b = min(b, bisect_right(cum_tokens, cum_tokens[a] + self.tokens, a + 1, hi + 1) - 1)
                b = max(min(b, a + self.size), a + 1)
                batches.append((a, b))
                a = b
        return batches

    def full_batches(self, seconds: np.ndarray, tokens: np.ndarray | None) -> float:
        """How many batches these examples fill, by whichever budget binds first."""
        by_tokens = tokens.sum() / self.tokens if tokens is not None else 0.0
        return max(seconds.sum() / self.seconds, by_tokens, len(seconds) / self.size)


def _budget(max_batch_seconds, max_batch_size, token_counts, max_batch_tokens, examples: int) -> _Budget:
    if max_batch_seconds <= 0:
        raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if max_batch_tokens is not None and token_counts is None:
        raise ValueError("max_batch_tokens needs token_counts (one token count per example)")
    if token_counts is not None and len(token_counts) != examples:
        raise ValueError(f"{len(token_counts)} token counts for {examples} examples; give one per example")
    return _Budget(
        seconds=float(max_batch_seconds),
        tokens=math.inf if max_batch_tokens is None else max_batch_tokens,
        size=math.inf if max_batch_size is None else max_batch_size,
    )


def _as_durations(durations) -> np.ndarray:
    durations = np.asarray(durations, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(durations) | (durations < 0))
    if len(bad):
        raise ValueError(f"example {bad[0]} has duration {durations[bad[0]]}; durations must be finite seconds >= 0")
    return durations


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(words))


class _TaskEpochs:
    """One task's examples and how each of its epochs is shuffled, bucketed and packed."""

    def __init__(self, name: str, members: np.ndarray, durations, tokens, budget: _Budget, num_buckets: int, seed: int,
                 bucketing: bool = True):
        self.members = members
        self.seconds = durations[members]
        self.tokens = None if tokens is None or math.isinf(budget.tokens) else tokens[members]
        self.budget = budget
        self.seed_words = (seed, _EPOCH, zlib.crc32(name.encode()))
        # Buckets split the task's audio evenly (so they hold equally many batches) and each holds several
        # full batches, so a small task is not cut into many part-full batches.
        fill = budget.full_batches(self.seconds, self.tokens)
        buckets = int(max(1, min(num_buckets, fill // _MIN_BATCHES_PER_BUCKET))) if bucketing else 1
        ascending = np.sort(self.seconds)
        audio = np.cumsum(ascending)
        edges = ascending[np.searchsorted(audio, audio[-1] * np.arange(1, buckets) / buckets)]
        self.bucket = np.searchsorted(edges, self.seconds, side="right")
        ends = np.cumsum(np.bincount(self.bucket, minlength=buckets)).tolist()
        self.segments = list(zip([0, *ends[:-1]], ends))
        # Positions of a bucket-ordered epoch fall into pools of a few batches' worth within each bucket;
        # pools sort ascending and descending in turn, so the batches either side of a pool boundary are alike.
        pool_size = max(2, round(_POOL_BATCHES * len(members) / max(fill, 1.0)))
        starts = np.repeat([lo for lo, _ in self.segments], [hi - lo for lo, hi in self.segments])
        self.pool = (np.arange(len(members)) - starts) // pool_size if bucketing else None

    def plan(self, epoch: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Example indices in bucket order, and the epoch's batches as ``[a, b)`` ranges in shuffled order."""
        rng = _rng(*self.seed_words, epoch)
        shuffled = rng.permutation(len(self.members))
        order = shuffled[np.argsort(self.bucket[shuffled], kind="stable")]  # shuffled within each bucket
        if self.pool is not None:
            direction = np.where(self.pool % 2 == 0, 1.0, -1.0)
            order = order[np.lexsort((direction * self.seconds[order], self.pool, self.bucket[order]))]
        tokens = None if self.tokens is None else self.tokens[order]
        batches = self.budget.pack(self.seconds[order], tokens, self.segments)
        return self.members[order], [batches[j] for j in rng.permutation(len(batches))]


class _Cursor:
    """Reads one task's endless stream of batches (its epochs end to end) at non-decreasing positions."""

    def __init__(self, epochs: _TaskEpochs):
        self.epochs = epochs
        self.epoch, self.start, self.end = -1, 0, 0
        self.order, self.batches = np.empty(0, dtype=np.int64), []

    def batch(self, position: int) -> tuple[list[int], int]:
        while position >= self.end:  # resuming skips epochs by packing them, never by yielding batches
            self.epoch += 1
            self.order, self.batches = self.epochs.plan(self.epoch)
            self.start, self.end = self.end, self.end + len(self.batches)
        a, b = self.batches[position - self.start]
        return self.order[a:b].tolist(), self.epoch


class TaskMixtureBatchSampler(Sampler[Batch]):
    """Training batches of one task each, drawn from a phased mixture; identical counts on every rank.

    ``len(self)`` is the last phase's ``until_batch`` minus ``start_batch``; batches are generated lazily.
    """

    def __init__(
        self,
        durations: Sequence[float],
        tasks: Sequence[str],
        schedule: Sequence[MixturePhase],
        max_batch_seconds: float,
        max_batch_size: int | None = None,
        token_counts: Sequence[int] | None = None,
        max_batch_tokens: int | None = None,
        num_buckets: int = 10,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        bucketing: bool = True,
    ):
        """``bucketing=False`` gives random batches (shuffled examples packed in order): the baseline that
        ``padding_ratio`` compares bucketing against."""
        durations = _as_durations(durations)
        if len(tasks) != len(durations):
            raise ValueError(f"{len(durations)} durations but {len(tasks)} tasks; give one task per example")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        budget = _budget(max_batch_seconds, max_batch_size, token_counts, max_batch_tokens, len(durations))
        tokens = None if token_counts is None else np.asarray(token_counts)
        self.task_names = sorted(set(tasks))
        self._ends, self._weights = self._mixture(schedule)
        self._cdf = np.cumsum(self._weights, axis=1) / self._weights.sum(axis=1, keepdims=True)
        task_ids = {name: t for t, name in enumerate(self.task_names)}
        codes = np.fromiter((task_ids[name] for name in tasks), dtype=np.int64, count=len(tasks))
        self._tasks = [
            _TaskEpochs(name, np.flatnonzero(codes == t), durations, tokens, budget, num_buckets, seed, bucketing)
            for t, name in enumerate(self.task_names)
        ]
        self.durations = durations
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_batch = self._next_batch = start_batch

    def _mixture(self, schedule: Sequence[MixturePhase]) -> tuple[np.ndarray, np.ndarray]:
        """Phase end indices and a (phase, task) weight matrix, checked against the data."""
        if not schedule:
            raise ValueError("the task mixture schedule has no phases")
        weights = np.zeros((len(schedule), len(self.task_names)))
        previous_end = 0
        for p, phase in enumerate(schedule):
            if phase.until_batch <= previous_end:
                raise ValueError(f"phase {p} ends at batch {phase.until_batch}, not after phase {p - 1} ({previous_end})")
            previous_end = phase.until_batch
            for task, weight in phase.weights.items():
                if weight < 0:
                    raise ValueError(f"phase {p} gives task {task!r} a negative weight {weight}")
                if weight > 0 and task not in self.task_names:
                    raise ValueError(f"phase {p} weights task {task!r}, which has no examples in the training data")
                if weight > 0:
                    weights[p, self.task_names.index(task)] = weight
            if not weights[p].any():
                raise ValueError(f"phase {p} gives every task weight 0; give at least one task a positive weight")
        return np.array([phase.until_batch for phase in schedule]), weights

    def __len__(self) -> int:
        return max(0, int(self._ends[-1]) - self.start_batch)

    def _draws(self, chunk: int) -> np.ndarray:
        """Task ids of batches ``[chunk * _CHUNK, (chunk + 1) * _CHUNK)``: one uniform each, through its phase's CDF."""
        index = np.arange(chunk * _CHUNK, (chunk + 1) * _CHUNK)
        phase = np.minimum(np.searchsorted(self._ends, index, side="right"), len(self._ends) - 1)
        uniform = _rng(self.seed, _DRAWS, chunk).random(_CHUNK)
        return (uniform[:, None] >= self._cdf[phase]).sum(axis=1)

    def _count_draws(self, start: int, stop: int) -> np.ndarray:
        counts = np.zeros(len(self.task_names), dtype=np.int64)
        for chunk in range(start // _CHUNK, -(-stop // _CHUNK)):
            first = chunk * _CHUNK
            draws = self._draws(chunk)[max(start - first, 0) : stop - first]
            counts += np.bincount(draws, minlength=len(counts))
        return counts

    def task_counts(self, start: int, stop: int) -> dict[str, int]:
        """How many of batches ``[start, stop)`` each task gets (tasks never drawn are left out)."""
        counts = self._count_draws(start, stop)
        return {name: int(n) for name, n in zip(self.task_names, counts) if n}

    def __iter__(self) -> Iterator[Batch]:
        drawn = self._count_draws(0, self.start_batch).tolist()  # draws per task so far, on every rank alike
        cursors = [_Cursor(epochs) for epochs in self._tasks]
        for i in range(self.start_batch, int(self._ends[-1])):
            if i == self.start_batch or i % _CHUNK == 0:
                draws = self._draws(i // _CHUNK).tolist()
            task = draws[i % _CHUNK]
            indices, epoch = cursors[task].batch(drawn[task] * self.world_size + self.rank)
            drawn[task] += 1
            self._next_batch = i + 1  # counted when handed out: islice stops without resuming the generator
            yield [(index, epoch) for index in indices]

    def state_dict(self) -> dict:
        return {"start_batch": self._next_batch, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state['seed']} but this sampler uses seed {self.seed}; "
                "resume with the same seed"
            )
        self.start_batch = self._next_batch = state["start_batch"]

    def padding_ratio(self) -> float:
        """Share of padding in the batches of one epoch of every weighted task (what bucketing keeps low)."""
        audio = padded = 0.0
        for t in np.flatnonzero(self._weights.any(axis=0)):
            order, batches = self._tasks[t].plan(0)
            starts = sorted(a for a, _ in batches)
            seconds = self.durations[order]
            sizes = np.diff([*starts, len(order)])
            audio += seconds.sum()
            padded += (np.maximum.reduceat(seconds, starts) * sizes).sum()
        return 1.0 - audio / padded


class DurationBatchSampler(Sampler[Batch]):
    """Evaluation batches: every example once, sorted by duration to pad little, dealt round-robin to ranks.

    Every rank gets the same number of batches, at least one: the largest batches are split until the count
    divides evenly (Lightning refuses an empty validation loader on one rank, and under FSDP every forward
    pass is a collective that all ranks must join). Only when every batch is down to one example are the
    shortest ones paired instead. Nothing is dropped or repeated, so metrics see each example once.
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_batch_seconds: float,
        max_batch_size: int | None = None,
        token_counts: Sequence[int] | None = None,
        max_batch_tokens: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        durations = _as_durations(durations)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        budget = _budget(max_batch_seconds, max_batch_size, token_counts, max_batch_tokens, len(durations))
        order = np.argsort(durations, kind="stable")
        tokens = None if max_batch_tokens is None else np.asarray(token_counts)[order]
        batches = budget.pack(durations[order], tokens, [(0, len(order))])
        if 0 < len(order) < world_size:
            raise ValueError(f"{len(order)} evaluation example(s) cannot be shared by {world_size} processes")
        while len(batches) % world_size:
            a, b = max(batches, key=lambda batch: batch[1] - batch[0])
            if b - a == 1:  # one example per batch: pair the shortest (first) ones, one pair per batch too many
                extra = len(batches) % world_size
                batches[: 2 * extra] = [(batches[2 * i][0], batches[2 * i + 1][1]) for i in range(extra)]
                break
            at = batches.index((a, b))
            batches[at : at + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
        self._batches = [order[a:b].tolist() for a, b in batches[rank::world_size]]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[Batch]:
        for indices in self._batches:
            yield [(index, 0) for index in indices]
