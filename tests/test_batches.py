"""Training and evaluation windows (tinygpt.data.batches)."""

import numpy as np

from tinygpt.data import batches


def test_sampler_visits_each_window_once_per_epoch_and_resumes():
    sampler = batches.EpochSampler(n_tokens=1000, block_size=10, batch_size=7, seed=3)
    per_epoch = sampler.windows_per_epoch
    seen = np.concatenate([sampler.next_starts() for _ in range(per_epoch // 7)])
    assert len(set(seen.tolist())) == len(seen)  # without replacement
    assert len(np.unique(seen % 10)) == 1  # one shift per epoch: back-to-back windows
    state = sampler.state_dict()
    expected = [sampler.next_starts() for _ in range(30)]  # crosses into later epochs
    assert sampler.epoch >= 2
    again = batches.EpochSampler(n_tokens=1000, block_size=10, batch_size=7, seed=3)
    again.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(expected, [again.next_starts() for _ in range(30)]))
    other_seed = batches.EpochSampler(n_tokens=1000, block_size=10, batch_size=7, seed=4)
    assert not np.array_equal(other_seed.next_starts(), batches.EpochSampler(1000, 10, 7, 3).next_starts())


def test_windows_are_shifted_targets():
    tokens = np.arange(100, dtype=np.uint16)
    x, y, seg = batches.windows(batches.Split(tokens), np.array([0, 50]), 8)
    assert seg is None
    assert x[1].tolist() == list(range(50, 58)) and y[1].tolist() == list(range(51, 59))
    mask = (np.arange(100) % 2).astype(np.uint8)  # only odd tokens are targets
    _, y, _ = batches.windows(batches.Split(tokens, mask), np.array([10]), 4)
    assert y[0].tolist() == [11, -1, 13, -1]


def test_eval_windows_cover_the_split_or_spread_evenly():
    assert batches.eval_starts(101, 10).tolist() == list(range(0, 100, 10))
    picks = batches.eval_starts(1001, 10, max_windows=3)
    assert picks.tolist() == [0, 490, 990]
