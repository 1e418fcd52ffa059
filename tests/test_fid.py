"""FID-style metrics: Fréchet distance against scipy, streamed statistics, KID, sources, feature networks, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from fewstep.errors import FewstepError
from fewstep.metrics import (
    FeatureNetworkError,
    FeatureStats,
    compute_stats,
    fid_score,
    frechet_distance,
    iter_image_batches,
    kernel_inception_distance,
    quantize,
    undo_nearest_upscale,
)

ROOT = Path(__file__).resolve().parent.parent


def scipy_frechet(mu1, s1, mu2, s2):
    """The usual reference implementation (pytorch-fid / EDM): scipy.linalg.sqrtm, imaginary part dropped."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_stats(rng, d, n=None):
    a = rng.normal(size=(d, n or 3 * d))
    return rng.normal(size=d), a @ a.T / a.shape[1] + 0.05 * np.eye(d)


class FlatFeatures:
    """A stand-in feature network: the (quantised) pixels themselves."""

    name = "flat"
    dim = 0

    def __call__(self, images):
        return images.reshape(images.shape[0], -1).double()


# ------------------------------------------------------------------------------------------ Fréchet distance


@pytest.mark.parametrize("d,seed", [(2, 0), (16, 1), (64, 2), (128, 3)])
def test_frechet_matches_scipy_sqrtm(d, seed):
    rng = np.random.default_rng(seed)
    mu1, s1 = random_stats(rng, d)
    mu2, s2 = random_stats(rng, d)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_identical_sets_is_zero_and_symmetric():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(500, 64)) * rng.uniform(0.1, 3, 64) + rng.normal(size=64)
    a = FeatureStats().update(feats)
    b = FeatureStats().update(feats[::-1].copy())
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a, b)) < 1e-6
    mu2, s2 = random_stats(rng, 64)
    assert frechet_distance(a.mu, a.sigma, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, a.mu, a.sigma), rel=1e-9)


def test_frechet_grows_monotonically_with_a_mean_shift():
    rng = np.random.default_rng(5)
    mu, s = random_stats(rng, 32)
    direction = rng.normal(size=32)
    values = [frechet_distance(mu, s, mu + t * direction, s) for t in np.linspace(0, 3, 13)]
    assert values[0] < 1e-6
    assert all(b > a for a, b in zip(values, values[1:]))
    # equal covariances: FD is exactly the squared mean distance
    assert values[-1] == pytest.approx(9 * direction @ direction, rel=1e-9)


def test_frechet_rank_deficient_covariance_is_finite_and_nonnegative():
    rng = np.random.default_rng(6)
    a = FeatureStats().update(rng.normal(size=(10, 40)))  # 10 images, 40 features: rank 9
    b = FeatureStats().update(rng.normal(size=(10, 40)) + 0.5)
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance(a, a) < 1e-6


def test_frechet_rejects_mismatched_statistics():
    with pytest.raises(FewstepError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -------------------------------------------------------------------------------------------- streaming stats


def test_streaming_statistics_equal_batch_statistics():
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(1003, 48)) * 2.0 + 100.0  # a large mean: the shifted sums keep full accuracy
    one = FeatureStats(reservoir=64).update(feats)
    streamed = FeatureStats(reservoir=64)
    i = 0
    for size in [1, 7, 100, 3, 500, 392]:
        streamed.update(torch.as_tensor(feats[i : i + size]))  # tensors or arrays
        i += size
    assert i == len(feats) and streamed.n == one.n == len(feats)
    np.testing.assert_allclose(one.mu, feats.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(one.sigma, np.cov(feats, rowvar=False), rtol=0, atol=1e-9)
    np.testing.assert_allclose(streamed.mu, one.mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(streamed.sigma, one.sigma, rtol=0, atol=1e-9)
    # the KID subset is bounded, made of input rows, and independent of the batching
    assert one.kid_features.shape == (64, 48)
    np.testing.assert_array_equal(one.kid_features, streamed.kid_features)
    rows = {r.tobytes() for r in feats.astype(np.float32)}
    assert all(r.tobytes() in rows for r in one.kid_features)


def test_merge_equals_single_pass():
    rng = np.random.default_rng(8)
    feats = rng.normal(size=(300, 10)) + 5
    a = FeatureStats(reservoir=40).update(feats[:120])
    b = FeatureStats(reservoir=40).update(feats[120:] * 1.0)
    b2 = FeatureStats(reservoir=40).update(feats)
    a.merge(b)
    np.testing.assert_allclose(a.mu, b2.mu, atol=1e-12)
    np.testing.assert_allclose(a.sigma, b2.sigma, atol=1e-11)
    assert a.n == 300 and len(a.kid_features) == 40


def test_stats_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(9)
    st = FeatureStats(reservoir=20, feature_name="digits").update(rng.normal(size=(50, 6)))
    path = st.save(tmp_path / "s.npz", source="unit test")
    back = FeatureStats.load(path)
    np.testing.assert_array_equal(back.mu, st.mu)
    np.testing.assert_array_equal(back.sigma, st.sigma)
    np.testing.assert_array_equal(back.kid_features, st.kid_features)
    assert back.n == 50 and back.feature_name == "digits" and back.meta == {"source": "unit test"}
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file
    # pytorch-fid style statistics (mu/sigma only) load too
    np.savez(tmp_path / "pf.npz", mu=st.mu, sigma=st.sigma)
    pf = FeatureStats.load(tmp_path / "pf.npz")
    assert frechet_distance(pf, back) < 1e-9 and pf.kid_features is None
    with pytest.raises(FewstepError, match="KID needs feature rows"):
        kernel_inception_distance(pf, back)
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(FewstepError, match="not a statistics file"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_stats_need_two_rows_and_finite_features():
    st = FeatureStats().update(np.ones((1, 3)))
    with pytest.raises(FewstepError, match="at least 2"):
        _ = st.sigma
    with pytest.raises(FewstepError, match="non-finite"):
        FeatureStats().update(np.array([[np.nan, 1.0]]))


# ------------------------------------------------------------------------------------------------------- KID


def brute_force_mmd(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3
    kid = kernel_inception_distance(x, y, subset_size=12, subsets=1)
    assert kid.mean == pytest.approx(brute_force_mmd(x, y), rel=1e-10)


def test_kid_sanity_same_vs_shifted_distribution():
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(800, 16)), rng.normal(size=(800, 16))
    same = kernel_inception_distance(a, b, subset_size=200, subsets=50)
    shifted = kernel_inception_distance(a, b + 0.5, subset_size=200, subsets=50)
    assert abs(same.mean) < 3 * same.std + 1e-3  # unbiased: zero in expectation, may be negative
    assert shifted.mean > 10 * max(same.std, abs(same.mean))
    assert shifted.subset_size == 200 and shifted.subsets == 50


# --------------------------------------------------------------------------------------------------- sources


def test_sources_png_folder_npz_and_tensor_agree(tmp_path):
    from fewstep.sampling import save_png, to_uint8

    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1
    u8 = to_uint8(x)  # what `fewstep sample` writes
    for i, img in enumerate(u8):
        save_png(tmp_path / "png" / f"{i:06d}.png", img)
    np.savez(tmp_path / "u8.npz", images=u8)
    np.savez(tmp_path / "f.npz", images=x.numpy())
    net = FlatFeatures()
    ref = compute_stats(x, net, batch=3)
    for src in (tmp_path / "png", tmp_path / "u8.npz", tmp_path / "f.npz", u8, [x[:4], x[4:]]):
        st = compute_stats(src, net, batch=4)
        assert st.n == 10
        np.testing.assert_allclose(st.mu, ref.mu, atol=1e-6)
        np.testing.assert_allclose(st.sigma, ref.sigma, atol=1e-6)
    # tensors are rounded to the 256 PNG levels unless asked not to be
    assert torch.equal(next(iter_image_batches(x, 10)), quantize(x))
    assert torch.equal(next(iter_image_batches(x, 10, quantize_floats=False)), x)


def test_sources_rgb_and_bad_inputs(tmp_path):
    from PIL import Image

    (tmp_path / "rgb").mkdir()
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).save(tmp_path / "rgb" / "a.png")
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(tmp_path / "rgb" / "b.png")
    batch = next(iter_image_batches(tmp_path / "rgb", 8))
    assert batch.shape == (2, 3, 4, 4) and batch[0].min() == 1 and batch[1].max() == -1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FewstepError, match="no images"):
        next(iter_image_batches(tmp_path / "empty"))
    with pytest.raises(FewstepError, match="not a folder"):
        next(iter_image_batches(tmp_path / "missing.txt"))
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.zeros(2))
    with pytest.raises(FewstepError, match="no 'images'"):
        next(iter_image_batches(tmp_path / "two.npz"))


def test_undo_nearest_upscale():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 8, 8, generator=g)
    for f in (2, 3, 4):
        up = x.repeat_interleave(f, -2).repeat_interleave(f, -1)
        assert torch.equal(undo_nearest_upscale(up), x)
    assert torch.equal(undo_nearest_upscale(x), x)  # not block-constant: unchanged


# -------------------------------------------------------------------------------------------- digits network


def _digits_network():
    from fewstep.metrics import get_feature_network

    try:
        return get_feature_network("digits")
    except FeatureNetworkError as e:
        pytest.skip(f"digit classifier not available: {e}")


def test_digits_classifier_missing_weights_is_a_clear_error(tmp_path):
    from fewstep.metrics import DigitsFeatures

    with pytest.raises(FeatureNetworkError, match="digit"):
        DigitsFeatures(classifier=tmp_path / "nope.safetensors")


def test_digits_features_real_vs_noise_and_png_roundtrip(tmp_path):
    from fewstep.sampling import save_png, to_uint8

    net = _digits_network()
    ref = compute_stats("digits-train", net)
    held = compute_stats("digits-held", net)
    g = torch.Generator().manual_seed(0)
    noise = compute_stats(torch.rand(400, 1, 16, 16, generator=g) * 2 - 1, net)
    fd_real, fd_noise = frechet_distance(held, ref), frechet_distance(noise, ref)
    assert fd_real * 10 < fd_noise
    # saved PNGs (nearest-upscaled ×4 from 8×8, as `fewstep sample` writes them) score like the tensor
    from fewstep.models.digits import digits_data

    x = digits_data()[:40].float()
    for i, img in enumerate(to_uint8(x)):
        save_png(tmp_path / f"{i:03d}.png", img, upscale=4)
    a, b = compute_stats(x, net), compute_stats(tmp_path, net)
    np.testing.assert_allclose(a.mu, b.mu, atol=1e-4)
    assert frechet_distance(a, b) < 1e-6


def test_shipped_reference_statistics():
    from fewstep.metrics import reference_stats

    _digits_network()
    try:
        ref = reference_stats("digits")
    except FeatureNetworkError as e:
        pytest.skip(str(e))
    assert ref.feature_name == "digits" and ref.n == 1438 and ref.kid_features.shape[0] == 1438
    assert np.isfinite(ref.sigma).all() and np.allclose(ref.sigma, ref.sigma.T)
    # made with the shipped classifier's exact weights (a retrained classifier needs make_reference_stats())
    from fewstep.evaluation.fid import check_network

    check_network(ref, _digits_network())


def test_statistics_of_other_network_weights_are_refused():
    net = _digits_network()
    ref = FeatureStats(reservoir=0).update(np.random.default_rng(0).normal(size=(20, net.dim)))
    ref.feature_name, ref.meta["network"] = "digits", "0123456789abcdef"
    with pytest.raises(FeatureNetworkError, match="other 'digits' network weights"):
        fid_score(torch.zeros(4, 1, 16, 16), ref)


# ----------------------------------------------------------------------------------------- Inception (extra)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A state dict of the right shapes from pytorch-fid's own FID-Inception architecture (random weights)."""
    pfi = pytest.importorskip("pytorch_fid.inception")
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None):
        net = pfi.fid_inception_v3()
    torch.manual_seed(0)
    for m in net.modules():  # a scale-preserving init, so features are not vanishingly small
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-test.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_match_the_library(inception_weights):
    import pytorch_fid.inception as pfi

    from fewstep.metrics import InceptionFeatures

    feats = InceptionFeatures(weights=inception_weights)
    assert feats.path == inception_weights
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (1, 3, 32, 32), generator=g, dtype=torch.uint8)
    ours = feats(u8.float() / 127.5 - 1)
    assert ours.shape == (1, 2048) and torch.isfinite(ours).all() and ours.abs().mean() > 1e-3
    state = torch.load(inception_weights, weights_only=True)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        lib = pfi.InceptionV3([3]).eval()  # the library's standard configuration on its [0, 1] input
    with torch.no_grad():
        theirs = lib(u8.float() / 255)[0].reshape(1, -1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_inception_weights_from_env_and_hub_cache(inception_weights, tmp_path, monkeypatch):
    from fewstep.evaluation.fid import _inception_file_name
    from fewstep.metrics import INCEPTION_WEIGHTS_ENV, InceptionFeatures

    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(inception_weights))
    assert InceptionFeatures().path == inception_weights
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / _inception_file_name()
    cached.parent.mkdir(parents=True)
    os.symlink(inception_weights, cached)
    assert InceptionFeatures().path == cached


def test_inception_missing_or_wrong_weights_are_clear_errors(tmp_path, monkeypatch):
    pytest.importorskip("pytorch_fid")
    from fewstep.metrics import INCEPTION_WEIGHTS_ENV, InceptionFeatures

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(FeatureNetworkError) as e:
        InceptionFeatures(weights=tmp_path / "given.pth")
    msg = str(e.value)
    for part in ("not found", "given.pth", "env.pth", str(tmp_path / "torch" / "hub" / "checkpoints"),
                 "--inception-weights", INCEPTION_WEIGHTS_ENV):
        assert part in msg
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(FeatureNetworkError, match="not a pytorch-fid Inception"):
        InceptionFeatures(weights=tmp_path / "wrong.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureNetworkError, match="cannot read"):
        InceptionFeatures(weights=tmp_path / "garbage.pth")


def test_unknown_feature_network():
    from fewstep.metrics import get_feature_network

    with pytest.raises(FeatureNetworkError, match="unknown feature network"):
        get_feature_network("resnet")


# --------------------------------------------------------------------------------------------- CLI and bench


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fewstep", *args]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_cli_fid_inception_without_weights_says_where_it_looked(tmp_path):
    pytest.importorskip("pytorch_fid")
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    p = _run("fid", "ref", "--images", str(tmp_path / "x.npz"), "--dest", str(tmp_path / "s.npz"),
             "--features", "inception", "--device", "cpu", "--no-progress",
             env={"TORCH_HOME": str(tmp_path / "th"), "FEWSTEP_INCEPTION_WEIGHTS": ""})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "not found" in p.stderr and "--inception-weights" in p.stderr
    assert not (tmp_path / "s.npz").exists()


def test_cli_fid_ref_and_calc_with_digits(tmp_path):
    _digits_network()
    from fewstep.cli import main

    assert main(["fid", "ref", "--images", "digits-train", "--dest", str(tmp_path / "ref.npz"), "--device", "cpu",
                 "--no-progress"]) == 0
    p = _run("fid", "calc", "--images", "digits-held", "--ref", str(tmp_path / "ref.npz"), "--kid", "--json",
             "--device", "cpu", "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["features"] == "digits" and out["n"] == 359 and out["n_ref"] == 1438
    assert out["fd"] > 0 and "kid" in out
    ref = FeatureStats.load(tmp_path / "ref.npz")
    assert fid_score("digits-held", ref, batch=128)["fd"] == pytest.approx(out["fd"], rel=1e-9)


def test_bench_fd_metric_table_and_plot(tmp_path):
    _digits_network()
    from fewstep.evaluation.bench import table_rows
    from fewstep.evaluation.fid import bench_fd_metric, reference_stats
    from fewstep.evaluation.plots import plot_error_vs_nfe
    from fewstep.models.digits import digits_data

    try:
        reference_stats("digits")
    except FeatureNetworkError as e:
        pytest.skip(str(e))
    metric = bench_fd_metric("digits-opt")  # 8×8 samples of digits-opt, scored at the classifier's 16×16
    real = metric(digits_data()[:300].float())["fd_digits"]
    noise = metric(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)["fd_digits"]
    assert 0 < real * 10 < noise
    records = [{"solver": s, "schedule": "x", "nfe": n, "rmse": 1.0 / n, "fd_digits": v / n}
               for s, v in (("euler", noise), ("ipndm", real)) for n in (4, 8)]
    header, rows = table_rows(records, [4, 8], metric="fd_digits")
    assert header[2:] == ["NFE 4", "NFE 8"] and rows[1][2].endswith("*")
    plot_error_vs_nfe(records, tmp_path / "p.png", title="t", metric=["rmse", "fd_digits"])
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_record_rows_keep_their_json_keys():
    """A Record's JSON row holds the fields that were set, extra metrics last (the table.json format)."""
    from fewstep.evaluation.bench import Record

    classic = Record("euler", 5, 6, "polynomial(rho=7)", False, 0.1, seconds=1.5, metrics={"fd_digits": 2.0})
    assert classic.to_json() == {"solver": "euler", "nfe": 5, "num_steps": 6, "schedule": "polynomial(rho=7)",
                                 "afs": False, "rmse": 0.1, "seconds": 1.5, "fd_digits": 2.0}
    card = Record("learned card (UniPC)", 3, 5, "learned", True, 0.2, train_seconds=4.0, learned=True)
    assert card.to_json() == {"solver": "learned card (UniPC)", "nfe": 3, "num_steps": 5, "schedule": "learned",
                              "afs": True, "rmse": 0.2, "train_seconds": 4.0, "learned": True}
    assert Record("AMED-Solver", 5, 4, "time_uniform(rho=1)", True, 0.3, predictor="p").to_json()["predictor"] == "p"


def test_bench_extra_metrics_and_plot_without_a_feature_network(tmp_path):
    from fewstep.evaluation.bench import SolverSpec, run_bench, table_rows
    from fewstep.evaluation.fid import model_feature_network
    from fewstep.evaluation.plots import plot_error_vs_nfe
    from fewstep.models import load_model

    with pytest.raises(FeatureNetworkError, match="no feature network"):
        model_feature_network("gmm")
    records = run_bench(load_model("gmm"), [SolverSpec.parse("euler")], [3, 5], n_samples=16, progress=False,
                        extra_metrics=lambda x: {"mean_abs": float(x.abs().mean())})
    assert all("mean_abs" in r and r["seconds"] >= 0 for r in records)
    assert table_rows(records, [3, 5], metric="mean_abs")[1][0][0] == "euler"
    plot_error_vs_nfe(records, tmp_path / "one.png", metric="mean_abs")
    assert (tmp_path / "one.png").exists()
