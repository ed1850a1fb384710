"""`LengthGroupedBatches`: every question once per epoch, in batches of similar length, the same order for a given
(seed, epoch), and gradient accumulation that does not change which questions make an optimizer step."""

import random

import pytest

from florence_ops.model_inputs import LengthGroupedBatches

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(5, 80) for _ in range(50)]  # 50 questions: 6 batches of 8 and one of 2


def epoch(sampler: LengthGroupedBatches, number: int = 0) -> list[list[int]]:
    sampler.set_epoch(number)
    return list(sampler)


@pytest.mark.parametrize("pool_batches", [1, 3, 100])
def test_every_question_once_per_epoch_full_batches_first(pool_batches):
    batches = epoch(LengthGroupedBatches(LENGTHS, 8, seed=1, pool_batches=pool_batches))
    assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
    assert [len(batch) for batch in batches] == [8] * 6 + [2]


def test_order_depends_on_seed_and_epoch_only():
    first, again = LengthGroupedBatches(LENGTHS, 8, seed=1), LengthGroupedBatches(LENGTHS, 8, seed=1)
    assert epoch(first, 3) == epoch(again, 3)  # what every process, and a resumed run, computes
    assert epoch(first, 0) != epoch(first, 1)
    assert epoch(first, 0) != epoch(LengthGroupedBatches(LENGTHS, 8, seed=2), 0)


def test_one_pool_sorts_the_epoch_by_length_and_shuffles_the_batches():
    batches = epoch(LengthGroupedBatches(LENGTHS, 8, seed=1, pool_batches=100))
    spans = sorted((min(LENGTHS[i] for i in b), max(LENGTHS[i] for i in b)) for b in batches)
    assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:])), "batches overlap in length"
    full = batches[:-1]
    assert full != sorted(full, key=lambda b: LENGTHS[b[0]]), "batches should come in shuffled order"


def test_pool_of_one_batch_is_plain_shuffling():
    """Without grouping, batches mix short and long questions: the spread inside batches is far above grouping's."""

    def mean_spread(pool_batches: int) -> float:
        batches = epoch(LengthGroupedBatches(LENGTHS, 8, seed=1, pool_batches=pool_batches))
        return sum(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in batches) / len(batches)

    assert mean_spread(1) > 3 * mean_spread(100)


@pytest.mark.parametrize("batch_size, micro_batches", [(8, 2), (8, 3), (7, 2)])
def test_micro_batches_split_each_step_without_changing_it(batch_size, micro_batches):
    whole = epoch(LengthGroupedBatches(LENGTHS, batch_size, seed=1, pool_batches=2))
    sampler = LengthGroupedBatches(LENGTHS, batch_size, seed=1, pool_batches=2, micro_batches=micro_batches)
    split = epoch(sampler)
    assert len(split) == len(sampler)
    size = -(-batch_size // micro_batches)
    regrouped, rest = [], list(split)
    for batch in whole:  # consecutive micro-batches make up exactly one step's questions, in the same order
        parts = -(-len(batch) // size)
        regrouped.append([i for part in rest[:parts] for i in part])
        rest = rest[parts:]
    assert regrouped == whole and rest == []


@pytest.mark.parametrize("n, batch_size", [(0, 4), (3, 4), (8, 4), (9, 4), (50, 8)])
def test_len_is_the_number_of_batches_yielded(n, batch_size):
    sampler = LengthGroupedBatches(LENGTHS[:n], batch_size, seed=0)
    assert len(sampler) == len(list(sampler)) == -(-n // batch_size)
