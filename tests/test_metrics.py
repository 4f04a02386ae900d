"""FID, KID, precision/recall against plain-numpy references; the FID Inception loader's checks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from neighbourhoods.core.errors import NeighbourhoodsError
from neighbourhoods.metrics import scores as metrics
from neighbourhoods.nets import inception


# --- plain-numpy references: the textbook formulas, written as directly as possible ----------
def reference_fid(real, gen):
    mu1, mu2 = real.mean(0), gen.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    # tr sqrt(S1 S2) from the (possibly non-symmetric) product's own eigenvalues
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def reference_mmd2(x, y):
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def reference_precision_recall(real, gen, k):
    def radii(x):
        return np.array([np.sort(np.linalg.norm(x - x[i], axis=1))[k] for i in range(len(x))])

    def covered(manifold, r, probes):
        return np.mean([any(np.linalg.norm(manifold - p, axis=1) <= r) for p in probes])

    return covered(real, radii(real), gen), covered(gen, radii(gen), real)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- FID ----------------------------------------------------------------------------------------
def test_fid_of_a_feature_set_against_itself_is_about_zero(rng):
    x = rng.normal(size=(500, 32))
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_against_a_shifted_set_grows_with_the_shift(rng):
    x, y = rng.normal(size=(500, 32)), rng.normal(size=(500, 32))
    same_distribution = metrics.fid(x, y)
    shifted = metrics.fid(x, y + 0.5)
    assert shifted > 5 * same_distribution
    # the mean term alone is 32 * 0.5^2 = 8
    assert shifted == pytest.approx(8 + same_distribution, rel=0.15)


def test_fid_agrees_with_the_numpy_reference_on_random_features(rng):
    real = rng.normal(size=(300, 24))
    gen = rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.3 + 0.2
    assert metrics.fid(real, gen) == pytest.approx(reference_fid(real, gen), rel=1e-6)


def test_fid_with_fewer_rows_than_dimensions_agrees_with_the_numpy_reference(rng):
    real = rng.normal(size=(20, 64))
    gen = rng.normal(size=(30, 64)) * 0.7 + 0.1
    assert metrics.fid(real, gen) == pytest.approx(reference_fid(real, gen), rel=1e-6)


def test_fid_rejects_mismatched_dimensions(rng):
    with pytest.raises(NeighbourhoodsError, match="dimensions differ"):
        metrics.fid(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))


# --- KID ----------------------------------------------------------------------------------------
def test_kid_of_a_feature_set_against_itself_is_about_zero(rng):
    x = rng.normal(size=(400, 32))
    itself, _ = metrics.kid(x, x, subsets=20, subset_size=200)
    shifted, _ = metrics.kid(x, x + 0.5, subsets=20, subset_size=200)
    # identical (not independent) rows make the unbiased estimate slightly negative: ~ -2/m
    assert -0.05 < itself <= 0.0
    assert abs(itself) < 0.05 * shifted


def test_kid_of_two_draws_of_one_distribution_is_zero_within_its_std(rng):
    x, y = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    mean, std = metrics.kid(x, y, subsets=20, subset_size=200)
    assert abs(mean) < 3 * std


def test_kid_against_a_shifted_set_is_clearly_larger(rng):
    x, y = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    same_mean, same_std = metrics.kid(x, y, subsets=20, subset_size=200)
    shifted_mean, shifted_std = metrics.kid(x, y + 0.5, subsets=20, subset_size=200)
    assert shifted_mean > same_mean + 10 * (same_std + shifted_std)


def test_kid_agrees_with_the_numpy_reference_on_random_features(rng):
    real, gen = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 0.3
    # one subset as large as both sets uses every row: the plain unbiased MMD^2
    mean, std = metrics.kid(real, gen, subsets=1, subset_size=30)
    assert mean == pytest.approx(reference_mmd2(gen, real), rel=1e-9)
    assert std == 0.0


def test_kid_std_reflects_the_spread_over_subsets(rng):
    real, gen = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 0.2
    mean, std = metrics.kid(real, gen, subsets=30, subset_size=20, seed=5)
    sub = np.random.default_rng(5)
    values = []
    for _ in range(30):
        x = gen[sub.choice(200, 20, replace=False)]
        y = real[sub.choice(200, 20, replace=False)]
        values.append(reference_mmd2(x, y))
    assert mean == pytest.approx(np.mean(values), rel=1e-9)
    assert std == pytest.approx(np.std(values), rel=1e-9)
    # sets too large to precompute take the on-the-fly path: same numbers
    assert metrics.kid(real, gen, subsets=30, subset_size=20, seed=5, precompute_limit=0) == pytest.approx((mean, std))


# --- precision / recall ---------------------------------------------------------------------------
def test_precision_recall_agree_with_the_numpy_reference(rng):
    real = rng.normal(size=(120, 6))
    gen = rng.normal(size=(90, 6)) * 0.6 + 0.4
    assert metrics.precision_recall(real, gen, k=3) == pytest.approx(reference_precision_recall(real, gen, 3))


def test_collapsed_generator_has_high_precision_but_low_recall(rng):
    real = rng.normal(size=(400, 8))
    collapsed = real[:5].repeat(80, axis=0) + rng.normal(scale=1e-3, size=(400, 8))  # 5 modes only
    precision, recall = metrics.precision_recall(real, collapsed, k=3)
    assert precision > 0.95
    assert recall < 0.2


def test_far_away_samples_have_zero_precision(rng):
    real = rng.normal(size=(200, 8))
    precision, recall = metrics.precision_recall(real, rng.normal(size=(200, 8)) + 20.0, k=3)
    assert precision == 0.0 and recall == 0.0


def test_realism_is_high_among_the_photos_and_low_off_their_manifold(rng):
    real = rng.normal(size=(400, 16))
    radii = metrics.realism_radii(real)
    assert (radii == 0).sum() >= 200                     # the wider half of the balls is left out
    inside = real[radii > 0][:50] + 0.01 * rng.normal(size=(50, 16))   # samples on top of (kept) photos
    typical = rng.normal(size=(200, 16))                 # fresh draws of the photos' distribution
    far = rng.normal(size=(50, 16)) + 8.0                # off the manifold
    r_in, r_typ, r_far = (metrics.realism(real, radii, x) for x in (inside, typical, far))
    assert np.median(r_in) > 10 and r_far.max() < 0.5
    assert r_far.max() < np.quantile(r_typ, 0.1) < np.median(r_typ) < np.median(r_in)
    # precision counts exactly the samples scoring at least 1 against all balls
    full = np.sqrt(metrics._knn_radii(real, 3))
    p, _ = metrics.precision_recall(real, typical)
    assert abs(p - (metrics.realism(real, full, typical) >= 1).mean()) < 1e-9


# --- the FID Inception network ------------------------------------------------------------------
def test_near_duplicate_share_is_one_percent_for_photos_and_near_one_for_one_house(rng):
    # a city's "photos": features on a sphere-ish cloud; samples drawn like them share the photos' 1%
    centre = rng.normal(size=64) * 0.5
    real = centre + rng.normal(size=(120, 64))
    like_real = centre + rng.normal(size=(120, 64))
    assert metrics.near_duplicate_share(real, real) == pytest.approx(0.01, abs=0.002)   # by construction
    assert metrics.near_duplicate_share(real, like_real) < 0.03
    # one house under every seed, with a little noise: nearly every pair is a near-duplicate
    one_house = real[0] + 0.05 * rng.normal(size=(40, 64))
    assert metrics.near_duplicate_share(real, one_house) > 0.95
    # half the seeds on one house: at least the share of pairs inside that half
    half = np.concatenate([one_house[:20], like_real[:20]])
    assert metrics.near_duplicate_share(real, half) >= 190 / 780
    # the threshold is a percentile of the photos' own pair similarities
    assert metrics.near_duplicate_share(real, like_real, percentile=50.0) > metrics.near_duplicate_share(real, like_real)


def test_bundled_inception_weights_pass_their_checksum():
    inception.verify_weights(inception.weights_path())


def test_checksum_check_fires_on_a_tampered_file(tmp_path):
    tampered = tmp_path / inception.WEIGHTS_NAME
    shutil.copyfile(inception.weights_path(), tampered)
    with open(tampered, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(NeighbourhoodsError, match="fail their checksum"):
        inception.load_fid_inception(path=tampered)


def test_missing_inception_weights_give_a_clear_error(tmp_path):
    with pytest.raises(NeighbourhoodsError, match="weights missing"):
        inception.load_fid_inception(path=tmp_path / "nope.pt")


def test_resize_is_pil_bicubic_per_channel_and_keeps_the_value_range(rng):
    images = rng.integers(0, 256, size=(2, 16, 12, 3), dtype=np.uint8)
    out = inception.resize_bicubic(images, (40, 30))
    assert out.shape == (2, 40, 30, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    flat = np.full((1, 16, 12, 3), 77, dtype=np.uint8)
    assert np.allclose(inception.resize_bicubic(flat, (40, 30)), 77, atol=1e-3)


@pytest.fixture(scope="module")
def fid_inception():
    return inception.load_fid_inception()


def test_inception_features_are_2048_d_deterministic_and_batch_independent(fid_inception, rng):
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    together = fid_inception.features(images, batch_size=3)
    alone = fid_inception.features(images[1:2], batch_size=1)
    assert together.shape == (3, inception.FEATURE_DIM)
    assert np.allclose(together[1], alone[0], atol=1e-4)
    assert not np.allclose(together[0], together[1], atol=1e-2)
