"""The thread work split (csrc/worksplit.h) behind the decode products: every item exactly once, in
contiguous runs, for any team size; a slow thread's leftovers are taken over (the point of it)."""
import numpy as np
import pytest

from pyengine import _worksplit


def runs(taker: np.ndarray) -> int:
    """Number of maximal runs of items taken by one thread."""
    return int(np.count_nonzero(np.diff(taker))) + 1 if taker.size else 0


@pytest.mark.parametrize("n_items", [0, 1, 2, 7, 64, 1000, 4099])
@pytest.mark.parametrize("n_threads,team", [(1, 1), (2, 2), (2, 1), (3, 2), (4, 4), (8, 3)])
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_every_item_exactly_once(n_items, n_threads, team, step):
    for slow in (0.0, 2.0):
        taker, count = _worksplit.cover(n_items, n_threads, step, team, slow)
        assert np.all(count == 1), (n_items, n_threads, team, step, slow, np.flatnonzero(count != 1)[:10])
        assert np.all((taker >= 0) & (taker < team))


def test_slow_thread_is_relieved_and_runs_stay_long():
    """Thread 0 takes 200 us per item, thread 1 none: thread 1 must take over most of thread 0's half
    (a static split leaves it exactly half), and the items still come in long runs (each take is
    contiguous and a thief takes half of what is left, so a few dozen runs, not thousands)."""
    n = 4000
    taker, count = _worksplit.cover(n, 2, 4, 2, 200.0)
    assert np.all(count == 1)
    assert np.count_nonzero(taker == 1) > 0.75 * n
    assert np.count_nonzero(taker[: n // 2] == 1) > 0.5 * (n // 2)  # stolen from thread 0's own range
    assert runs(taker) < 64


def test_static_share_when_equal():
    """Without a slow thread and with one thread, the split is the plain contiguous one."""
    taker, _ = _worksplit.cover(1000, 1, 4, 1)
    assert np.all(taker == 0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        _worksplit.cover(10, 0, 1, 1)
    with pytest.raises(ValueError):
        _worksplit.cover(10, 2, 0, 2)
    with pytest.raises(ValueError):
        _worksplit.cover(2 ** 32, 2, 1, 2)
