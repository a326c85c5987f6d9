import pytest

from vistune.train.sampler import BatchPlan


def test_plan_is_deterministic_covers_every_sample_and_splits_across_processes():
    one = BatchPlan(37, batch_size=4, world_size=1, grad_accum=2, seed=3)
    assert one.steps_per_epoch == 5  # ceil(37 / 8)
    assert one.epoch_order(0) == BatchPlan(37, 4, 1, 2, seed=3).epoch_order(0)
    assert one.epoch_order(0) != one.epoch_order(1)
    assert sorted(one.epoch_order(0)) == list(range(37))
    # 2 processes x batch 2 see the same global batches as 1 process x batch 4
    two = BatchPlan(37, batch_size=2, world_size=2, grad_accum=2, seed=3)
    assert two.usable() == 36  # the odd sample out cannot split over 2 processes
    w1, w2 = one.windows(0), two.windows(0)
    assert len(w1) == len(w2) and w1[:-1] == w2[:-1]
    assert [i for c in w2[-1] for i in c] == [i for c in w1[-1] for i in c][:-1]  # the last sample is dropped
    r0, r1 = two.rank_windows(0, 0), two.rank_windows(0, 1)
    for win, m0, m1 in zip(w2, r0, r1):
        for chunk, a, b in zip(win, m0, m1):
            assert a + b == chunk and len(a) == len(b)


def test_group_by_length_keeps_modalities_apart_and_sorts_within_windows():
    lengths = [(-1 if i % 3 == 0 else 1) * (10 + (i * 37) % 90) for i in range(200)]
    plan = BatchPlan(200, batch_size=4, world_size=1, grad_accum=1, seed=0, lengths=lengths, group_by_length=True)
    order = plan.epoch_order(0)
    assert sorted(order) == list(range(200))
    assert order == plan.epoch_order(0) and order != plan.epoch_order(1)
    wins = [w[0] for w in plan.windows(0)]
    full = [w for w in wins if len(w) == 4]
    mixed = [w for w in full if len({lengths[i] > 0 for i in w}) > 1]
    assert len(mixed) <= 1  # only the leftover window may mix images and text
    for w in full:
        lens = [abs(lengths[i]) for i in w]
        assert lens == sorted(lens, reverse=True)
    # less padding than a plain shuffle: sum over batches of (max length x batch)
    plain = BatchPlan(200, 4, seed=0)

    def padded(p):
        return sum(max(abs(lengths[i]) for i in w[0]) * len(w[0]) for w in p.windows(0))

    assert padded(plan) < 0.8 * padded(plain)


def test_plan_checks_its_inputs():
    with pytest.raises(ValueError, match="needs the samples' lengths"):
        BatchPlan(10, 2, group_by_length=True)
    with pytest.raises(ValueError, match="cannot feed 4 processes"):
        BatchPlan(3, 1, world_size=4)
