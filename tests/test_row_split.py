import itertools
import threading

import numpy as np
import pytest

from ts2cli.row_split import RowSplitter, part_bounds


@pytest.mark.parametrize(("rows", "parts"), [(0, 2), (1, 4), (5, 2), (7, 3), (512, 4), (3, 1)])
def test_parts_cover_the_rows_once_in_order_with_sizes_apart_by_at_most_one(rows, parts):
    bounds = part_bounds(rows, parts)
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert len(bounds) == max(1, min(parts, rows)) and max(sizes) - min(sizes) <= 1


def test_split_matrix_product_equals_the_whole_and_uses_the_workers():
    rng = np.random.default_rng(0)
    weight, columns = rng.standard_normal((1001, 64)), rng.standard_normal((64, 7))
    out = np.full((1001, 7), np.nan)
    threads: set[int] = set()
    two_threads = threading.Event()

    def part(start: int, stop: int) -> None:
        threads.add(threading.get_ident())
        if len(threads) >= 2:
            two_threads.set()
        assert two_threads.wait(timeout=30), "no worker thread took a part"
        np.matmul(weight[start:stop], columns, out=out[start:stop])

    RowSplitter(3).run(part, len(weight))
    np.testing.assert_allclose(out, weight @ columns)


def test_a_worker_that_cannot_run_does_not_hold_up_the_caller():
    splitter = RowSplitter(2)
    release = threading.Event()
    splitter._pool.submit(release.wait)  # the only worker is busy, as if another process had its core
    try:
        done = []
        splitter.run(lambda start, stop: done.append((start, stop)), 100)
        assert sorted(done) == part_bounds(100, 2 * 4)  # all parts, taken by the caller alone
    finally:
        release.set()


def test_a_failing_part_raises_in_the_caller():
    def part(start: int, stop: int) -> None:
        if start > 0:
            raise ValueError("bad rows")

    with pytest.raises(ValueError, match="bad rows"):
        RowSplitter(2).run(part, 10)
