"""Unclipped share, the sign-momentum detector, missing refreshes, gamma from a target."""

from __future__ import annotations

import math

import numpy as np
import pytest
from backend_support import to_numpy

import sophia_core as sc

KW = dict(eps=1e-12, clip_threshold=1.0)


def _direct_unclipped(m, h, gamma, eps=1e-12, c=1.0):
    return np.abs(m / np.maximum(gamma * h, eps)) < c


def test_unclipped_count_is_exact_and_groups_add_up(xp):
    rng = np.random.default_rng(0)
    ms = [rng.normal(size=(40, 3)), rng.normal(size=(7,))]
    hs = [rng.random((40, 3)) * 4 - 1, rng.random(7)]
    count, total = sc.unclipped_count([xp.asarray(m) for m in ms], [xp.asarray(h) for h in hs],
                                      gamma=0.5, **KW)
    want = sum(int(_direct_unclipped(m, h, 0.5).sum()) for m, h in zip(ms, hs, strict=True))
    assert int(to_numpy(count)) == want and total == 127
    share = sc.unclipped_share([xp.asarray(m) for m in ms], [xp.asarray(h) for h in hs],
                               gamma=0.5, **KW)
    assert float(to_numpy(share)) == pytest.approx(want / 127, rel=1e-6)
    # two "param groups" with different gamma combine through their counts
    parts = [sc.unclipped_count([xp.asarray(m)], [xp.asarray(h)], gamma=g, **KW)
             for m, h, g in zip(ms, hs, (0.5, 2.0), strict=True)]
    want = (int(_direct_unclipped(ms[0], hs[0], 0.5).sum())
            + int(_direct_unclipped(ms[1], hs[1], 2.0).sum()))
    assert sum(int(to_numpy(c)) for c, _ in parts) == want


def test_raising_gamma_raises_the_unclipped_share(xp):
    """The direction the hyperparameter guide must give."""
    rng = np.random.default_rng(1)
    m, h = xp.asarray(rng.normal(size=1000)), xp.asarray(rng.random(1000))
    shares = [float(to_numpy(sc.unclipped_share([m], [h], gamma=g, **KW)))
              for g in (1e-3, 1e-1, 10.0, 1e3)]
    assert shares == sorted(shares) and shares[0] < 0.01 and shares[-1] > 0.99


def test_clip_fraction_is_the_old_name():
    assert sc.clip_fraction is sc.unclipped_share


def test_unclipped_count_survives_overflowing_denominators(xp):
    big = float(np.finfo(np.float32).max)
    m = xp.asarray(np.array([big, 1.0], dtype=np.float32))
    h = xp.asarray(np.array([big, big], dtype=np.float32))
    count, _ = sc.unclipped_count([m], [h], gamma=10.0, b1=0.9, step=3, bias_correction=True,
                                  **KW)
    assert int(to_numpy(count)) in (0, 1, 2)


class TestSignMomentumRegime:
    def run(self, shares, **kwargs):
        streak, warnings = 0, []
        for n, share in enumerate(shares, start=1):
            streak, warn = sc.sign_momentum_regime(streak, share, refreshes=n, **kwargs)
            warnings.append(bool(warn))
        return warnings

    def test_warns_once_after_warmup_and_patience(self):
        warnings = self.run([0.01] * 60)
        first = sc.SIGN_MOMENTUM_WARMUP + sc.SIGN_MOMENTUM_PATIENCE
        assert warnings.index(True) == first - 1 and sum(warnings) == 1

    def test_a_healthy_share_never_warns(self):
        assert not any(self.run([0.3] * 60))
        assert not any(self.run([sc.SIGN_MOMENTUM_SHARE] * 60))  # the threshold is not low

    def test_one_healthy_refresh_restarts_the_count(self):
        shares = [0.01] * 18 + [0.5] + [0.01] * 9
        assert not any(self.run(shares))
        assert any(self.run(shares + [0.01]))

    def test_low_share_during_warmup_does_not_count(self):
        warmup, patience = sc.SIGN_MOMENTUM_WARMUP, sc.SIGN_MOMENTUM_PATIENCE
        assert not any(self.run([0.0] * (warmup + patience - 1)))

    def test_arrays_give_the_same_answers(self, xp):
        shares = [0.01] * 25 + [0.4] + [0.02] * 12
        want = self.run(shares)
        streak = 0
        for n, share in enumerate(shares, start=1):
            streak, warn = sc.sign_momentum_regime(
                streak, xp.asarray(share), refreshes=xp.asarray(n))
            assert bool(to_numpy(warn)) == want[n - 1]

    def test_message_names_the_remedies(self):
        message = sc.sign_momentum_message(0.012)
        for words in ("1.2 %", "Raise gamma", "target_unclipped_share",
                      "hessian_bias_correction", "warn_sign_momentum=False"):
            assert words in message, words


@pytest.mark.parametrize(("steps", "refreshes", "k", "at_start", "want"), [
    (11, 0, 10, True, True),
    (10, 0, 10, True, False),
    (11, 1, 10, True, False),
    (20, 0, 10, False, False),
    (21, 0, 10, False, True),
    (10**12, 0, 10, True, True),
    (10**12, 3, 10, True, False),
    (2, 0, 1, True, True),
])
def test_missing_refresh(steps, refreshes, k, at_start, want):
    assert sc.missing_refresh(steps, refreshes, hessian_interval=k,
                              refresh_at_start=at_start) is want


def test_missing_refresh_on_arrays(xp):
    got = sc.missing_refresh(xp.asarray(11), xp.asarray(0), hessian_interval=10)
    assert bool(to_numpy(got))


def test_missing_refresh_message_says_what_happened_and_the_fix():
    message = sc.missing_refresh_message(31, "Call opt.refresh_hessian(...) every step.")
    assert "31 steps" in message and "sign-momentum" in message
    assert "Call opt.refresh_hessian" in message and "require_refresh=False" in message


class TestGammaForUnclippedShare:
    def arrays(self, seed=0, sizes=((50, 4), (33,), (0,), (9, 2))):
        rng = np.random.default_rng(seed)
        ms = [rng.normal(size=s) for s in sizes]
        hs = [rng.random(s) + 1e-3 for s in sizes]
        return ms, hs

    @pytest.mark.parametrize("target", [0.1, 0.3, 0.9])
    def test_the_new_gamma_gives_the_target_share(self, xp, target):
        ms, hs = self.arrays()
        gamma = sc.gamma_for_unclipped_share([xp.asarray(m) for m in ms],
                                             [xp.asarray(h) for h in hs],
                                             target=target, gamma=0.04, clip_threshold=1.0)
        gamma = float(to_numpy(gamma))
        share = np.mean(np.concatenate([_direct_unclipped(m, h, gamma).ravel()
                                        for m, h in zip(ms, hs, strict=True)]))
        total = sum(m.size for m in ms)
        assert abs(share - target) <= 1.5 / total

    def test_the_sample_does_not_depend_on_how_coordinates_are_split(self, xp):
        """The numpy reference runs on one flat vector; adapters per parameter."""
        ms, hs = self.arrays(seed=2, sizes=((300,), (517,), (1,), (182,)))
        split = sc.gamma_for_unclipped_share([xp.asarray(m) for m in ms],
                                             [xp.asarray(h) for h in hs], target=0.3,
                                             gamma=0.04, clip_threshold=1.0, max_samples=97)
        flat = sc.gamma_for_unclipped_share([xp.asarray(np.concatenate(ms))],
                                            [xp.asarray(np.concatenate(hs))], target=0.3,
                                            gamma=0.04, clip_threshold=1.0, max_samples=97)
        assert float(to_numpy(split)) == float(to_numpy(flat))

    def test_matches_numpy_bit_for_bit(self, xp, dtype_name):
        ms, hs = self.arrays(seed=3)
        kwargs = dict(target=0.3, gamma=0.04, clip_threshold=1.5, b1=0.9, step=4,
                      bias_correction=True, max_samples=64)
        want = sc.gamma_for_unclipped_share([m.astype(dtype_name) for m in ms],
                                            [h.astype(dtype_name) for h in hs], **kwargs)
        got = sc.gamma_for_unclipped_share([xp.asarray(m.astype(dtype_name)) for m in ms],
                                           [xp.asarray(h.astype(dtype_name)) for h in hs],
                                           **kwargs)
        assert to_numpy(got).tobytes() == np.asarray(want).tobytes()

    def test_no_curvature_keeps_the_previous_gamma(self, xp):
        m = xp.asarray(np.ones(10))
        for h in (np.zeros(10), -np.ones(10)):
            gamma = sc.gamma_for_unclipped_share([m], [xp.asarray(h)], target=0.5, gamma=0.07,
                                                 clip_threshold=1.0)
            assert float(to_numpy(gamma)) == 0.07
        zero_m = xp.asarray(np.zeros(10))  # momentum 0: any gamma leaves them unclipped
        gamma = sc.gamma_for_unclipped_share([zero_m], [xp.asarray(np.ones(10))], target=0.5,
                                             gamma=0.07, clip_threshold=1.0)
        assert float(to_numpy(gamma)) == 0.07

    def test_target_is_checked(self, xp):
        with pytest.raises(ValueError, match="target_unclipped_share"):
            sc.gamma_for_unclipped_share([xp.asarray(np.ones(2))], [xp.asarray(np.ones(2))],
                                         target=1.0, gamma=0.04, clip_threshold=1.0)


def test_estimate_rows():
    assert sc.estimate_rows(16, 0.25) == 4
    assert sc.estimate_rows(10, 0.25) == 3  # rounded up
    assert sc.estimate_rows(3, 0.01) == 1  # never empty
    assert sc.estimate_rows(8, 1.0) == 8
    assert sc.estimate_rows(0, 0.5) == 0
    with pytest.raises(ValueError, match="hessian_batch_fraction"):
        sc.estimate_rows(8, 0.0)
    with pytest.raises(TypeError, match="hessian_batch_fraction"):
        sc.estimate_rows(8, "0.25")
    assert sc.estimate_rows(8, sc.DEFAULTS["hessian_batch_fraction"]) == math.ceil(8 * 0.25)
    with pytest.raises(ValueError, match="batch_size"):
        sc.estimate_rows(-1, 0.5)


def test_estimate_rows_of_a_run_time_batch_size_is_the_python_count(xp):
    """A batch size known only inside compiled code gets the same rows (Keras's fit)."""
    # 0.3 * 100 is 30.000000000000004 in double precision (31 rows), 30 in float32.
    for fraction in (0.1, 0.25, 1 / 3, 0.3, 0.7, 1.0):
        for batch in (0, 1, 3, 10, 30, 64, 100, 1000):
            got = sc.estimate_rows(xp.asarray(batch, dtype=xp.int32), fraction)
            assert int(to_numpy(got)) == sc.estimate_rows(batch, fraction), (batch, fraction)


@pytest.mark.parametrize("target", [None, 0.3])
def test_after_fold_runs_target_share_and_detector_in_order(xp, target):
    rng = np.random.default_rng(5)
    ms = [xp.asarray(rng.normal(size=(20, 3))), xp.asarray(rng.normal(size=9))]
    hs = [xp.asarray(rng.random((20, 3))), xp.asarray(rng.random(9))]
    moments = dict(clip_threshold=1.0, b1=0.9, step=7, bias_correction=True)
    after = sc.after_fold(ms, hs, gamma=0.04, target=target, streak=9, refreshes=30,
                          eps=1e-12, **moments)
    gamma = 0.04 if target is None else sc.gamma_for_unclipped_share(
        ms, hs, target=target, gamma=0.04, **moments)
    share = sc.unclipped_share(ms, hs, gamma=gamma, eps=1e-12, **moments)
    assert to_numpy(after.share).tobytes() == to_numpy(share).tobytes()
    assert float(to_numpy(after.gamma)) == (0.04 if target is None else float(to_numpy(gamma)))
    low = float(to_numpy(share)) < sc.SIGN_MOMENTUM_SHARE
    assert int(to_numpy(after.streak)) == (10 if low else 0)
    assert bool(to_numpy(after.warn)) == low
    if target is not None:  # the target moves the share there, away from sign momentum
        assert abs(float(to_numpy(after.share)) - target) < 0.05
