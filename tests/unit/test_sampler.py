"""Specification of the training and evaluation batch samplers."""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict

import numpy as np
import pytest
import torch

from speechllm.data.sampler import (
    DurationBatchSampler,
    MixturePhase,
    TaskMixtureBatchSampler,
    temperature_weights,
)


def lognormal_durations(n: int, seed: int = 0) -> np.ndarray:
    """Utterance lengths like a speech corpus: median 4 s, long tail, clipped to 1-15 s."""
    return np.clip(np.random.default_rng(seed).lognormal(np.log(4.0), 0.6, n), 1.0, 15.0)


def corpus(sizes: dict[str, int], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    tasks = [task for task, n in sizes.items() for _ in range(n)]
    order = np.random.default_rng(seed + 1).permutation(len(tasks))  # interleave tasks in the manifest
    return lognormal_durations(len(tasks), seed), [tasks[i] for i in order]


ASR_THEN_MIX = [MixturePhase(300, {"asr": 1.0}), MixturePhase(1000, {"asr": 1.0, "st": 2.0, "ic": 1.0})]


def make_sampler(durations, tasks, schedule=ASR_THEN_MIX, **kwargs) -> TaskMixtureBatchSampler:
    return TaskMixtureBatchSampler(durations, tasks, schedule, **{"max_batch_seconds": 60.0, **kwargs})


@pytest.fixture(scope="module")
def three_tasks():
    return corpus({"asr": 2000, "st": 1000, "ic": 500})


@pytest.mark.parametrize(
    "budget",
    [{"max_batch_seconds": 30.0}, {"max_batch_tokens": 150}, {"max_batch_size": 3}],
    ids=["seconds", "tokens", "size"],
)
def test_batches_respect_seconds_tokens_and_size_budgets(three_tasks, budget):
    durations, tasks = three_tasks
    tokens = np.ceil(durations * 8).astype(int)  # ~ 32 tokens per utterance: 150 binds before 60 s
    sampler = make_sampler(durations, tasks, token_counts=tokens, **{"max_batch_seconds": 60.0, **budget})
    batches = [[i for i, _ in batch] for batch in sampler]
    assert len(batches) == 1000
    seconds = [durations[b].sum() for b in batches]
    assert max(seconds) <= budget.get("max_batch_seconds", 60.0) + 1e-9
    assert max(tokens[b].sum() for b in batches) <= budget.get("max_batch_tokens", math.inf)
    assert max(len(b) for b in batches) <= budget.get("max_batch_size", math.inf)
    assert np.mean([len(b) for b in batches]) > 2  # budgets are filled, not met by tiny batches


def test_example_longer_than_budget_forms_a_batch_alone():
    durations = [2.0, 45.0, 3.0, 2.5, 4.0]
    sampler = TaskMixtureBatchSampler(durations, ["asr"] * 5, [MixturePhase(6, {"asr": 1.0})],
                                      max_batch_seconds=10.0, num_buckets=1)
    batches = [sorted(i for i, _ in batch) for batch in sampler]
    assert [1] in batches
    for batch in batches:
        assert 1 not in batch or batch == [1]


def test_every_batch_holds_one_task_the_one_drawn_for_its_index(three_tasks):
    durations, tasks = three_tasks
    sampler = make_sampler(durations, tasks)
    for b, batch in enumerate(sampler):
        assert {tasks[i] for i, _ in batch} == set(sampler.task_counts(b, b + 1))


def test_mixture_matches_phase_weights_and_switches_exactly_at_boundary(three_tasks):
    durations, tasks = three_tasks
    schedule = [MixturePhase(3000, {"asr": 1.0}), MixturePhase(43000, {"asr": 1.0, "st": 2.0, "ic": 1.0})]
    sampler = make_sampler(durations, tasks, schedule)
    assert sampler.task_counts(0, 3000) == {"asr": 3000}
    assert set(sampler.task_counts(3000, 3050)) == {"asr", "st", "ic"}
    counts, n = sampler.task_counts(3000, 43000), 40000
    for task, p in {"asr": 0.25, "st": 0.5, "ic": 0.25}.items():
        assert abs(counts[task] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (task, counts)


def test_unlisted_and_zero_weight_tasks_are_never_drawn(three_tasks):
    durations, tasks = three_tasks
    sampler = make_sampler(durations, tasks, [MixturePhase(5000, {"asr": 0.0, "st": 1.0})])
    assert sampler.task_counts(0, 5000) == {"st": 5000}


def test_temperature_weights_interpolate_between_size_and_given_weights():
    sizes = {"asr": 9000, "ic": 1000}
    assert temperature_weights({"asr": 3.0, "ic": 1.0}, sizes, None) == {"asr": 0.75, "ic": 0.25}
    assert temperature_weights({"asr": 1.0, "ic": 1.0}, sizes, 1.0) == pytest.approx({"asr": 0.9, "ic": 0.1})
    nearly_uniform = temperature_weights({"asr": 1.0, "ic": 1.0}, sizes, 1000.0)
    assert nearly_uniform == pytest.approx({"asr": 0.5, "ic": 0.5}, abs=0.01)
    assert temperature_weights({"asr": 1.0, "ic": 0.0}, sizes, 2.0) == {"asr": 1.0, "ic": 0.0}
    with pytest.raises(ValueError, match="weight 0"):
        temperature_weights({"asr": 0.0}, sizes, None)


def test_phase_weighting_a_task_without_examples_names_it(three_tasks):
    durations, tasks = three_tasks
    with pytest.raises(ValueError, match="'sqa'"):
        make_sampler(durations, tasks, [MixturePhase(10, {"asr": 1.0}), MixturePhase(20, {"sqa": 1.0})])
    with pytest.raises(ValueError, match="phase 0 gives every task"):
        make_sampler(durations, tasks, [MixturePhase(10, {"asr": 0.0, "st": 0.0})])


def test_two_ranks_get_equal_batch_counts_and_disjoint_examples_per_task_epoch():
    durations, tasks = corpus({"asr": 400, "st": 150, "rare": 7})
    schedule = [MixturePhase(2000, {"asr": 1.0, "st": 1.0, "rare": 1.0})]
    ranks = [list(make_sampler(durations, tasks, schedule, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2000
    seen = [defaultdict(list) for _ in ranks]  # (task, epoch) -> indices
    for rank_batches, rank_seen in zip(ranks, seen):
        for batch in rank_batches:
            for i, epoch in batch:
                rank_seen[tasks[i], epoch].append(i)
    for key in seen[0].keys() & seen[1].keys():
        assert not set(seen[0][key]) & set(seen[1][key]), key
        assert len(set(seen[0][key])) == len(seen[0][key])  # an epoch uses an example once
    # Both ranks draw the same task at every step.
    for batch0, batch1 in zip(*ranks):
        assert tasks[batch0[0][0]] == tasks[batch1[0][0]]
    # Together the ranks cover a finished task-epoch exactly.
    rare_epoch_0 = seen[0]["rare", 0] + seen[1]["rare", 0]
    assert sorted(rare_epoch_0) == sorted(i for i, t in enumerate(tasks) if t == "rare")


def test_same_seed_gives_identical_batches_and_another_seed_differs(three_tasks):
    durations, tasks = three_tasks
    first = list(make_sampler(durations, tasks, seed=7))
    assert list(make_sampler(durations, tasks, seed=7)) == first
    other = list(make_sampler(durations, tasks, seed=8))
    assert sum(a != b for a, b in zip(first, other)) > 900


@pytest.mark.parametrize("start", [1, 299, 300, 777, 5000])
def test_resume_from_start_batch_equals_tail_of_fresh_run(three_tasks, start):
    durations, tasks = three_tasks
    # 6000 batches: the draws span two RNG chunks and every task runs through several epochs.
    schedule = [MixturePhase(300, {"asr": 1.0}), MixturePhase(6000, {"asr": 1.0, "st": 2.0, "ic": 1.0})]
    fresh = list(make_sampler(durations, tasks, schedule, rank=1, world_size=2))
    resumed = make_sampler(durations, tasks, schedule, rank=1, world_size=2, start_batch=start)
    assert len(resumed) == 6000 - start
    assert list(resumed) == fresh[start:]


def test_state_dict_round_trips_to_the_same_remaining_batches(three_tasks):
    durations, tasks = three_tasks
    fresh = list(make_sampler(durations, tasks, seed=3))
    running = make_sampler(durations, tasks, seed=3)
    consumed = list(itertools.islice(iter(running), 420))
    state = running.state_dict()
    assert state == {"start_batch": 420, "seed": 3}
    restored = make_sampler(durations, tasks, seed=3)
    restored.load_state_dict(state)
    assert consumed + list(restored) == fresh
    with pytest.raises(ValueError, match="seed 3"):
        make_sampler(durations, tasks, seed=4).load_state_dict(state)


def test_rare_task_still_gets_full_multi_example_batches():
    durations, tasks = corpus({"asr": 1000, "rare": 5})
    rare = sorted(i for i, t in enumerate(tasks) if t == "rare")
    sampler = make_sampler(durations, tasks, [MixturePhase(400, {"asr": 1.0, "rare": 1.0})], world_size=2)
    rare_batches = [batch for batch in sampler if tasks[batch[0][0]] == "rare"]
    assert len(rare_batches) > 100
    for batch in rare_batches:  # 5 utterances fit one 60 s batch: each pass is one whole batch
        assert sorted(i for i, _ in batch) == rare
    epochs = [batch[0][1] for batch in rare_batches]
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)  # rank 0 takes every other epoch


def test_bucketing_pads_far_less_than_random_batching():
    durations = lognormal_durations(20000)
    schedule = [MixturePhase(2000, {"asr": 1.0})]
    bucketed = make_sampler(durations, ["asr"] * 20000, schedule).padding_ratio()
    random = make_sampler(durations, ["asr"] * 20000, schedule, bucketing=False).padding_ratio()
    assert bucketed <= 0.10
    assert random >= 0.40


def test_small_tasks_with_one_wide_bucket_still_pad_little():
    # 8 tasks of 200 clips, 40 s batches: ~20 batches a task, too few for more than 5 buckets, so each
    # bucket spans a wide range of durations; sorting within pools of a few batches keeps padding low.
    durations, tasks = corpus(dict.fromkeys(["asr", "st", "ic", "sf", "kws", "kwe", "sc", "sns"], 200))
    schedule = [MixturePhase(1, dict.fromkeys(set(tasks), 1.0))]
    bucketed = make_sampler(durations, tasks, schedule, max_batch_seconds=40.0)
    random = make_sampler(durations, tasks, schedule, max_batch_seconds=40.0, bucketing=False)
    assert bucketed.padding_ratio() <= 0.10
    assert random.padding_ratio() >= 0.30


def test_long_schedule_is_generated_lazily():
    durations, tasks = corpus({"asr": 3000, "st": 3000})
    started = time.perf_counter()
    sampler = make_sampler(durations, tasks, [MixturePhase(10**9, {"asr": 1.0, "st": 1.0})])
    first = list(itertools.islice(iter(sampler), 50))
    assert len(sampler) == 10**9
    assert len(first) == 50
    assert time.perf_counter() - started < 5.0


def test_a_million_examples_build_and_iterate_in_seconds():
    n = 1_000_000
    durations = lognormal_durations(n)
    tasks = np.array(["asr", "st", "ic", "er"])[np.random.default_rng(2).integers(0, 4, n)].tolist()
    started = time.perf_counter()
    sampler = make_sampler(durations, tasks, [MixturePhase(100_000, dict.fromkeys(["asr", "st", "ic", "er"], 1.0))])
    examples = sum(len(batch) for batch in sampler)
    assert examples > n  # more than one pass over the data
    assert time.perf_counter() - started < 30.0


def test_dataloader_passes_index_and_task_epoch_to_the_dataset(three_tasks):
    durations, tasks = three_tasks

    class Echo(torch.utils.data.Dataset):
        def __getitem__(self, key):
            index, epoch = key
            return torch.tensor([index, epoch])

    sampler = make_sampler(durations, tasks)
    loader = torch.utils.data.DataLoader(Echo(), batch_sampler=sampler)
    for batch, expected in zip(itertools.islice(loader, 20), sampler):
        assert batch.tolist() == [list(pair) for pair in expected]


def test_duration_batch_sampler_packs_sorted_batches_and_shards_every_example_once():
    durations = lognormal_durations(1003)
    tokens = np.ceil(durations * 8).astype(int)
    ranks = [
        list(DurationBatchSampler(durations, max_batch_seconds=40.0, token_counts=tokens, max_batch_tokens=200,
                                  max_batch_size=8, rank=r, world_size=3))
        for r in range(3)
    ]
    assert max(map(len, ranks)) - min(map(len, ranks)) <= 1
    indices = [i for batches in ranks for batch in batches for i, _ in batch]
    assert sorted(indices) == list(range(1003))
    assert {epoch for batches in ranks for batch in batches for _, epoch in batch} == {0}
    for batch in (b for batches in ranks for b in batches):
        members = [i for i, _ in batch]
        assert durations[members].sum() <= 40.0 + 1e-9 and tokens[members].sum() <= 200 and len(members) <= 8
    # Sorted by duration: consecutive batches of one rank do not overlap in length range.
    lengths = [durations[[i for i, _ in batch]] for batch in ranks[0]]
    assert all(a.max() <= b.min() for a, b in zip(lengths, lengths[1:]))
    assert DurationBatchSampler(durations, max_batch_seconds=40.0, rank=0, world_size=1).__len__() == len(
        list(DurationBatchSampler(durations, max_batch_seconds=40.0)))


def test_batch_order_mixes_duration_buckets_within_an_epoch():
    durations = lognormal_durations(5000)
    sampler = make_sampler(durations, ["asr"] * 5000, [MixturePhase(60, {"asr": 1.0})])
    medians = [np.median(durations[[i for i, _ in batch]]) for batch in sampler]
    # Unshuffled, the epoch would start with the whole shortest bucket (all medians under 2 s).
    assert min(medians) < 2.5 and max(medians) > 7.0


def test_every_rank_gets_an_evaluation_batch_when_they_would_fit_in_fewer():
    durations = [2.0, 2.5, 3.0, 1.0, 1.5]  # one 12 s batch, shared by 4 ranks
    ranks = [list(DurationBatchSampler(durations, max_batch_seconds=12.0, rank=r, world_size=4)) for r in range(4)]
    assert all(len(batches) == 1 for batches in ranks)
    assert sorted(i for batches in ranks for batch in batches for i, _ in batch) == list(range(5))
