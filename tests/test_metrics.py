import math

import numpy as np
import pytest

from ts2cli.metrics import inverted_softmax, retrieval_metrics, video_to_text_metrics

NAN = float("nan")


def _official_reference(x: np.ndarray) -> dict[str, float]:
    """The official procedure written out literally (spec §11.3): sort each row, keep every tied position."""
    positions = []
    for i in range(x.shape[0]):
        ordered = np.sort(-x[i])
        positions.extend(np.flatnonzero(ordered - (-x[i, i]) == 0).tolist())
    ranks = np.asarray(positions)
    return {
        "R@1": 100 * np.mean(ranks < 1),
        "R@5": 100 * np.mean(ranks < 5),
        "R@10": 100 * np.mean(ranks < 10),
        "R@50": 100 * np.mean(ranks < 50),
        "MdR": np.median(ranks) + 1,
        "MnR": np.mean(ranks) + 1,
    }


def test_no_ties_hand_computed():
    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.3, 0.2], [0.7, 0.6, 0.4]])  # ranks 0, 1, 2
    for ties in ("strict", "official"):
        m = retrieval_metrics(sim, ties=ties)
        assert m["R@1"] == pytest.approx(100 / 3)
        assert m["R@5"] == m["R@10"] == m["R@50"] == 100.0
        assert m["MdR"] == 2.0
        assert m["MnR"] == 2.0
        assert all(isinstance(v, float) for v in m.values())


def test_ties_differ_between_modes():
    # Row 0: correct tied with one other; row 1: clean win; row 2: all three tied.
    sim = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [5.0, 5.0, 5.0]])
    strict = retrieval_metrics(sim)
    assert strict == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0, "MdR": 1.0, "MnR": 1.0}

    # Official: ranks {0, 1}, {0}, {0, 1, 2} → six entries 0,0,0,1,1,2.
    official = retrieval_metrics(sim, ties="official")
    assert official["R@1"] == 50.0
    assert official["R@5"] == 100.0
    assert official["MdR"] == 1.5
    assert official["MnR"] == pytest.approx(1 + 4 / 6)


def test_nan_rows():
    sim = np.array([[0.9, NAN, 0.5], [0.2, NAN, 0.1], [0.7, 0.6, 0.4]])
    # Strict: the NaN-diagonal row is worst (rank 2); the NaN in row 0 is ignored → ranks 0, 2, 2.
    strict = retrieval_metrics(sim)
    assert strict["R@1"] == pytest.approx(100 / 3)
    assert strict["MdR"] == 3.0
    assert strict["MnR"] == pytest.approx(1 + 4 / 3)
    # In a gallery of 3 the last rank is "within 5": the broken row is still a miss (the middle row is a real
    # rank-2 retrieval, within 5).
    assert strict["R@5"] == pytest.approx(200 / 3)
    # Official: the NaN row contributes nothing → ranks 0, 2.
    official = retrieval_metrics(sim, ties="official")
    assert official["R@1"] == 50.0
    assert official["MdR"] == 2.0
    assert official["MnR"] == 2.0


def test_all_nan_official_is_nan_without_warnings(recwarn):
    m = retrieval_metrics(np.full((2, 2), NAN), ties="official")
    assert all(math.isnan(v) for v in m.values())
    assert not recwarn.list


def test_official_matches_literal_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=(40, 40)).astype(np.float32)  # small integers → many ties
    x[3, 3] = np.nan
    x[5, 9] = np.nan
    for key, value in _official_reference(x).items():
        assert retrieval_metrics(x, ties="official")[key] == pytest.approx(value)


def test_recall_at_k_boundaries():
    n = 60
    sim = np.tile(np.arange(n, 0, -1, dtype=float), (n, 1))  # every row ranks column j at rank j
    m = retrieval_metrics(sim)
    assert m["R@1"] == pytest.approx(100 / n)
    assert m["R@5"] == pytest.approx(500 / n)
    assert m["R@10"] == pytest.approx(1000 / n)
    assert m["R@50"] == pytest.approx(5000 / n)
    assert m["MdR"] == 30.5
    assert m["MnR"] == 30.5


def test_inverted_softmax_hand_case():
    sim = np.array([[2.0, 3.0], [0.0, 4.0]])
    # Text 0 prefers video 1 (3 > 2), but video 1 is "claimed" more strongly by text 1.
    assert retrieval_metrics(sim)["R@1"] == 50.0
    dsl = inverted_softmax(sim)
    e = math.e
    expected = np.array([[2 * e**2 / (e**2 + 1), 3 / (1 + e)], [0.0, 4 * e / (1 + e)]])
    np.testing.assert_allclose(dsl, expected, rtol=1e-12)
    assert retrieval_metrics(dsl)["R@1"] == 100.0


def test_inverted_softmax_is_stable_at_large_scale():
    sim = np.array([[2000.0, 3000.0], [0.0, 4000.0]], dtype=np.float32)
    dsl = inverted_softmax(sim)
    assert dsl.dtype == np.float32
    assert np.isfinite(dsl).all()
    np.testing.assert_allclose(dsl, [[2000.0, 0.0], [0.0, 4000.0]])


def test_targets_several_captions_per_video():
    caption_video = np.array([0, 0, 1, 1])
    sim = np.array([[0.9, 0.1], [0.2, 0.85], [0.3, 0.8], [0.6, 0.4]])
    t2v = retrieval_metrics(sim, targets=caption_video)  # ranks 0, 1, 0, 1
    assert t2v["R@1"] == 50.0
    assert t2v["MdR"] == 1.5
    assert t2v["MnR"] == 1.5
    # Video 0's best caption (0.9) is first; video 1's best own caption (0.8) is beaten by caption 1 (0.85).
    v2t = video_to_text_metrics(sim, caption_video)
    assert v2t["R@1"] == 50.0
    assert v2t["MnR"] == 1.5


def test_video_to_text_with_one_caption_each_equals_transpose():
    rng = np.random.default_rng(1)
    sim = rng.integers(0, 5, size=(30, 30)).astype(float)
    sim[4, 4] = np.nan
    for ties in ("strict", "official"):
        assert video_to_text_metrics(sim, np.arange(30), ties=ties) == retrieval_metrics(sim.T, ties=ties)


def test_video_to_text_broken_video_is_worst():
    sim = np.array([[0.9, NAN], [0.1, NAN], [0.3, NAN]])
    m = video_to_text_metrics(sim, np.array([0, 1, 1]))
    # Video 0 found first; video 1 (all its captions NaN) gets rank 2 of 3 captions.
    assert m["R@1"] == 50.0 and m["R@5"] == 50.0  # a broken video is a miss at every K
    assert m["MnR"] == 2.0


def test_bad_input():
    with pytest.raises(ValueError, match="targets"):
        retrieval_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(np.eye(2), ties="optimistic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one caption"):
        video_to_text_metrics(np.zeros((2, 3)), np.array([0, 1]))
