"""FID and the Inception Score (ddpm_fid, ddpm_download): the metrics pinned, the network fetched and checked, the
protocol end to end, agreement with torch-fidelity (with the referee: tests/test_gpu_check.py, which reads the FID
of the samples the tool wrote with both, 15 s of scipy's sqrtm that one test pays)."""
import hashlib
import http.server
import json
import os
import shutil
import socket
import threading

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image

import ddpm_fid
from conftest import TINY_MODEL, make_image_folder, one_line_error, run_main
from ddpm_download import RemoteFile, cache_folder, fetched, file_digest
from ddpm_fid import INCEPTION, IS_SPLITS, InceptionFeatures, frechet_distance, inception_score
from ddpm_helpers import UserError
from ddpm_runtime import format_bytes


def test_eval_fid_alone_writes_fids_samples_and_no_grid(trained, tmp_path, fake_inception):
    result = run_main("--inference", "--conditional", "--model_path", trained / "models" / "cond" / "ckpt.pt",
                      "--eval_fid", "10", "--fid_inception", fake_inception, "--sampling_steps", "2", "--no_cuda",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "outputs")) == ["fid_samples_cond.npz", "metrics_cond.json",
                                                        "nearest_training_cond.png"]


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((20, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 10])
def test_inception_score_of_sure_predictions_spread_evenly_over_k_classes_is_k(k):
    # every split holds each of k classes equally often, p(y|x) one-hot: IS = exp H(p(y)) = k
    n = IS_SPLITS * k * 3
    logits = np.full((n, 1008), -50.0)
    logits[np.arange(n), np.arange(n) % k] = 0.0
    mean, std = inception_score(logits)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_splits_are_consecutive_images_not_shuffled():
    # 10 classes sorted, 10 images each: each split holds one class only, so each split's score is 1
    logits = np.full((100, 1008), -50.0)
    logits[np.arange(100), np.arange(100) // 10] = 0.0
    assert inception_score(logits)[0] == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError, match="10 splits need at least 10 images, got 9"):
        inception_score(np.zeros((9, 1008)))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 8))
    sigma = a @ a.T + np.eye(8)
    mu = rng.normal(size=8)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    # diagonal covariances: Σ (σ1 − σ2)² over the standard deviations, plus the mean term
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(np.zeros(3), s1, np.ones(3), s2) == pytest.approx(3 + 1 + 0 + 4)


@pytest.fixture
def server(tmp_path):
    """(folder, base URL, paths requested) of an HTTP server on 127.0.0.1 serving the folder."""
    folder, requested = tmp_path / "served", []
    folder.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):  # once per request
            requested.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_port}", requested
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def closed_port_url(name):
    """A URL on 127.0.0.1 where nothing listens: what a machine without network gets."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def test_fetch_downloads_once_with_a_progress_bar_into_torch_hub_and_checks_the_hash(server, torch_home, capsys):
    folder, base, requested = server
    content = np.random.default_rng(0).bytes(3_000_000)  # several chunks
    (folder / "blob.bin").write_bytes(content)
    remote = RemoteFile(f"{base}/blob.bin", hashlib.sha256(content).hexdigest(), len(content), "the test file",
                        "--test_file")
    path = fetched(remote, progress=True)
    assert path == str(torch_home / "hub" / "checkpoints" / "blob.bin") == os.path.join(cache_folder(), "blob.bin")
    assert open(path, "rb").read() == content and requested == ["/blob.bin"]
    err = capsys.readouterr().err
    assert f"fetching the test file (3.0 MB, once) from {base}/blob.bin into {path}" in err
    assert "\rblob.bin:" in err and "B/s]" in err  # tqdm's bar
    assert fetched(remote) == path and requested == ["/blob.bin"]  # from the cache, checked, not fetched again
    assert os.listdir(cache_folder()) == ["blob.bin"]


def test_fetched_bytes_that_are_not_the_expected_ones_are_not_kept(server, torch_home):
    folder, base, _ = server
    (folder / "blob.bin").write_bytes(b"not what was published")
    remote = RemoteFile(f"{base}/blob.bin", "0" * 64, 22, "the test file", "--test_file")
    with pytest.raises(UserError) as error:
        fetched(remote)
    assert str(error.value) == (f"the file fetched from {base}/blob.bin is not the expected one (SHA-256 "
                                f"{hashlib.sha256(b'not what was published').hexdigest()[:12]}…, expected "
                                "000000000000…): nothing was kept; download it by hand and pass it with --test_file "
                                "PATH")
    assert os.listdir(cache_folder()) == []  # no file, no temporary


def test_a_fetch_without_network_or_of_a_missing_file_is_one_line_naming_the_url_and_the_flag(server, torch_home):
    url = closed_port_url("blob.bin")
    with pytest.raises(UserError) as error:
        fetched(RemoteFile(url, "0" * 64, 10, "the test file", "--test_file"))
    message = str(error.value)
    assert message.startswith(f"could not fetch the test file from {url} (URLError: ")
    assert message.endswith("): download it by hand and pass it with --test_file PATH") and "\n" not in message
    _, base, _ = server
    with pytest.raises(UserError, match=r"\(HTTPError: File not found\): download it by hand"):
        fetched(RemoteFile(f"{base}/missing.bin", "0" * 64, 10, "the test file", "--test_file"))
    assert os.listdir(cache_folder()) == []


def test_a_file_url_is_fetched_and_a_damaged_cached_copy_fetched_again(tmp_path, torch_home, capsys):
    source = tmp_path / "blob.bin"
    source.write_bytes(b"published bytes")
    remote = RemoteFile(source.as_uri(), hashlib.sha256(b"published bytes").hexdigest(), 15, "the test file", "--f")
    path = fetched(remote, verbose=False)
    with open(path, "wb") as f:
        f.write(b"damaged")
    assert fetched(remote, verbose=False) == path and open(path, "rb").read() == b"published bytes"
    assert f"note: {path} is not the file {remote.url} serves (its SHA-256 differs): fetching it again" in \
        capsys.readouterr().err


def serve_as_official(folder, base, weights, monkeypatch):
    """ddpm_fid.INCEPTION pointed at `weights` served from the local server, under the official file name."""
    shutil.copyfile(weights, folder / INCEPTION.file_name)
    monkeypatch.setattr(ddpm_fid, "INCEPTION", RemoteFile(f"{base}/{INCEPTION.file_name}", file_digest(weights),
                                                          os.path.getsize(weights), INCEPTION.what, INCEPTION.flag))


def test_eval_fid_with_no_weights_file_fetches_the_network_once_and_offline_says_what_to_do(
        trained, server, torch_home, fake_inception, monkeypatch, tmp_path):
    folder, base, requested = server
    serve_as_official(folder, base, fake_inception, monkeypatch)
    sample = ["--inference", "--conditional", "--model_path", trained / "models" / "cond" / "ckpt.pt",
              "--num_samples", "1", "--eval_fid", "10", "--sampler", "ddim", "--sampling_steps", "2", "--no_cuda"]
    first = run_main(*sample, "--run_name", "first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (f"fetching the Inception-v3 weights of FID and IS ({format_bytes(os.path.getsize(fake_inception))}, once) "
            f"from {base}/{INCEPTION.file_name} into {torch_home / 'hub' / 'checkpoints'}/") in first.stderr
    assert "not the official" not in first.stderr
    metrics = json.loads((tmp_path / "outputs" / "metrics_first.json").read_text())
    assert metrics["fid_protocol"]["official_network"] and metrics["fid_protocol"]["network_sha256"] == \
        file_digest(fake_inception)
    assert run_main(*sample, "--run_name", "second", cwd=tmp_path).returncode == 0
    assert requested == [f"/{INCEPTION.file_name}"]  # fetched once, then read from the cache

    offline = tmp_path / "offline"
    offline.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    url = closed_port_url(INCEPTION.file_name)
    monkeypatch.setattr(ddpm_fid, "INCEPTION", RemoteFile(url, INCEPTION.digest, INCEPTION.size, INCEPTION.what,
                                                          INCEPTION.flag))
    message = one_line_error(run_main(*sample, cwd=offline))
    assert message.startswith(f"ddpm_main.py: error: could not fetch the Inception-v3 weights of FID and IS from "
                              f"{url} (")
    assert message.endswith("): download it by hand and pass it with --fid_inception PATH")
    assert os.listdir(offline) == []  # nothing sampled or written


def test_a_file_other_than_the_official_one_is_noted_and_one_without_classifier_gives_fid_but_no_is(
        tmp_path, fake_inception, capsys):
    features = InceptionFeatures(fake_inception, "cpu", verbose=True)
    assert not features.official and features.has_classifier
    assert (f"note: --fid_inception {fake_inception!r} is not the official weights-inception-2015-12-05-6726825d.pth "
            f"(SHA-256 {file_digest(fake_inception)[:12]}…, official 6726825d0af5…): its FID and IS compare only with "
            "figures read with this same file") in capsys.readouterr().err
    state = torch.load(fake_inception, weights_only=True)
    torch.save({**state, "fc.weight": torch.full_like(state["fc.weight"], np.nan)}, tmp_path / "no_fc.pth")
    assert not InceptionFeatures(str(tmp_path / "no_fc.pth"), "cpu").has_classifier  # as ../shared's copy


def test_eval_fid_and_is_after_training_and_at_inference_with_their_protocol(tmp_path, fake_inception):
    data = make_image_folder(str(tmp_path / "data"), per_class_train=3, num_classes=10)
    result = run_main("--data_dir", data, "--conditional", "--epochs", "1", "--save_model", "--run_name", "f",
                      "--eval_fid", "10", "--fid_inception", fake_inception, "--sampler", "ddim",
                      "--sampling_steps", "2", *TINY_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("warning: FID from 10 samples reads high against published figures, which use 50,000 (Ho et al. 2020; "
            "some use 10,000): compare FIDs of equal sample counts") in result.stderr
    metrics = json.loads((tmp_path / "outputs" / "metrics_f.json").read_text())
    assert metrics["fid_samples"] == 10 and metrics["fid_sampler"] == "ddim, 2 steps, eta 0.0, guidance 3.0"
    assert metrics["fid_protocol"] == {
        "samples": 10, "class_balanced": True, "seed": 0, "sampler": "ddim, 2 steps, eta 0.0, guidance 3.0",
        "reference": f"the train split at {data}", "reference_images": 30,
        "network_sha256": file_digest(fake_inception), "official_network": False, "is_splits": 10,
        "fid_half_samples": 100, "kid_subsets": 100, "kid_subset_size": 10, "prc_neighbourhood": 3,
        "prc_reference_images": 10, "features_reference": f"the train split at {data}",
        "copy_held_out_images": 10, "copy_quantile": 0.01, "copy_training_images": 30, "copy_neighbours": 3,
        "torch_fidelity": torch_fidelity.__version__}
    assert metrics["precision"] == "fp32" and 0 <= metrics["prc_precision"] <= 1  # the run's and the samples'
    picture = os.path.join("outputs", "nearest_training_f.png")
    assert (f"FID {metrics['fid']:.3f} ± {metrics['fid_second_draw']:.2f} (where a second draw of 10 lands, 95 %), "
            f"KID {metrics['kid']:.5f} ± {metrics['kid_std']:.5f}, precision {metrics['prc_precision']:.3f}, recall "
            f"{metrics['prc_recall']:.3f}, IS {metrics['inception_score']:.3f} ± {metrics['inception_score_std']:.3f}\n"
            f"  copies: {metrics['copy_share']:.1%} of the samples are nearer to a training image than 99% of 10 test "
            f"images are (pixels: {metrics['copy_share_pixels']:.1%}); the nearest beside their training images: "
            f"{picture}\n"
            f"  from 10 class-balanced samples (seed 0, ddim, 2 steps, eta 0.0, guidance 3.0) against the train split "
            f"at {data} (30 images); Inception weights {file_digest(fake_inception)[:8]}… (not the official file)") \
        in result.stdout
    assert Image.open(tmp_path / picture).size[0] > 7 * 16  # a sample and 2 × 3 training images a row

    # the figures are those of the saved samples, against the cached statistics of the 30 training images
    samples = np.load(tmp_path / "outputs" / "fid_samples_f.npz")["images"]
    assert samples.shape == (10, 16, 16, 3) and samples.dtype == np.uint8
    stats = np.load(os.path.join(data, "ddpm_fid_train_stats.npz"))
    assert int(stats["n"]) == 30 and str(stats["network"]) == file_digest(fake_inception)
    mu, sigma, logits = InceptionFeatures(fake_inception, "cpu").statistics(samples, keep_logits=True)
    assert metrics["fid"] == pytest.approx(frechet_distance(mu, sigma, stats["mu"], stats["sigma"]), rel=1e-6)
    assert (metrics["inception_score"], metrics["inception_score_std"]) == pytest.approx(inception_score(logits))

    inference = run_main("--inference", "--conditional", "--model_path", "models/f/ckpt.pt", "--num_samples", "2",
                         "--eval_fid", "10", "--fid_inception", fake_inception, "--fid_ref", "test", "--run_name", "g",
                         "--sampler", "ddim", "--sampling_steps", "2", "--no_cuda", cwd=tmp_path)
    assert inference.returncode == 0, inference.stderr
    protocol = json.loads((tmp_path / "outputs" / "metrics_g.json").read_text())["fid_protocol"]
    assert (protocol["reference"], protocol["reference_images"]) == (f"the test split at {data}", 10)
    assert int(np.load(os.path.join(data, "ddpm_fid_test_stats.npz"))["n"]) == 10
    for split, count in (("train", 30), ("test", 10)):  # each split's features cached beside the data, half precision
        cached = np.load(os.path.join(data, f"ddpm_fid_{split}_features.npz"))
        assert cached["features"].shape == (count, 2048) and cached["features"].dtype == np.float16
        assert int(cached["n"]) == count and str(cached["network"]) == file_digest(fake_inception)


def test_without_a_classifier_the_json_says_no_inception_score(tmp_path, fake_inception, trained):
    state = torch.load(fake_inception, weights_only=True)
    torch.save({**state, "fc.weight": torch.full_like(state["fc.weight"], np.nan)}, tmp_path / "no_fc.pth")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048), dataset="folder", shape=[3, 16, 16])
    result = run_main("--inference", "--model_path", trained / "models" / "uncond" / "ckpt.pt", "--num_samples", "1",
                      "--eval_fid", "10", "--fid_inception", tmp_path / "no_fc.pth", "--fid_ref_stats",
                      tmp_path / "stats.npz", "--sampler", "ddim", "--sampling_steps", "2", "--no_cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(no IS: the network file's classifier layer is not finite)" in result.stdout
    metrics = json.loads((tmp_path / "outputs" / "metrics_uncond.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["inception_score"] is None and metrics["inception_score_std"] is None


def test_eval_fid_leaves_a_seeded_commands_samples_as_they_are(tmp_path, fake_inception, trained):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048), dataset="folder", shape=[3, 16, 16])
    sample = ["--inference", "--model_path", trained / "models" / "uncond" / "ckpt.pt", "--num_samples", "4",
              "--seed", "3", "--sampler", "ddim", "--sampling_steps", "2", "--no_cuda"]
    assert run_main(*sample, "--run_name", "plain", cwd=tmp_path).returncode == 0
    measured = run_main(*sample, "--run_name", "measured", "--eval_fid", "10", "--fid_inception", fake_inception,
                        "--fid_ref_stats", tmp_path / "stats.npz", cwd=tmp_path)  # the network loads before sampling
    assert measured.returncode == 0, measured.stderr
    plain, with_fid = (np.load(tmp_path / "outputs" / f"samples_{run}.npz")["images"] for run in ("plain", "measured"))
    assert np.array_equal(plain, with_fid)


class Images(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) as torch-fidelity takes them: a dataset of tensors."""

    def __init__(self, images):
        self.images = torch.from_numpy(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_the_metrics_equal_torch_fidelity_calculate_metrics_on_the_same_images(fake_inception):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    features = InceptionFeatures(fake_inception, "cpu")
    features_a, logits = features.pool_features(a, batch_size=4, keep_logits=True)  # batches do not matter
    features_b, _ = features.pool_features(b)
    theirs = torch_fidelity.calculate_metrics(input1=Images(a), input2=Images(b), cuda=False, isc=True, fid=True,
                                              kid=True, kid_subset_size=10, prc=True, feature_layer_prc="2048",
                                              feature_extractor="inception-v3-compat", samples_shuffle=False,
                                              cache=False, verbose=False, save_cpu_ram=True,
                                              feature_extractor_weights_path=fake_inception)
    reference = ddpm_fid.Reference(*ddpm_fid.moments(features_b), "b", 10, features_b)
    ours = ddpm_fid.sample_metrics(features_a, reference)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    # every subset is all 10 images, reordered: KID's spread here is float32 rounding of the reordered sums
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], abs=1e-6)
    assert (ours["prc_precision"], ours["prc_recall"]) == (theirs["precision"], theirs["recall"])
    assert inception_score(logits) == pytest.approx((theirs["inception_score_mean"], theirs["inception_score_std"]),
                                                    rel=1e-6)


def gaussian_features(rng, n, d, shift=0.0):
    """n features (n, d) of a fixed correlated Gaussian, its mean moved by `shift`: float32, as the network gives."""
    mixing = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)
    return torch.from_numpy((rng.normal(size=(n, d)) @ mixing + shift).astype(np.float32))


@pytest.mark.parametrize("n", [40, 200])  # fewer samples than dimensions (an N × N eigenproblem), and more
def test_fid_of_chosen_rows_equals_torch_fidelitys_frechet_distance(n):
    rng = np.random.default_rng(0)
    samples, reference = gaussian_features(rng, n, 64), gaussian_features(rng, 500, 64, shift=0.3)
    mu, sigma = ddpm_fid.moments(samples)
    ref_mu, ref_sigma = ddpm_fid.moments(reference)
    values, vectors = np.linalg.eigh(ref_sigma)
    root = torch.from_numpy((vectors * np.sqrt(values.clip(0))) @ vectors.T)
    projected, ref_mu_t = samples.double() @ root, torch.from_numpy(ref_mu)
    ours = ddpm_fid.fid_of_rows(samples.double(), projected, ref_mu_t, values.sum())
    assert ours == pytest.approx(frechet_distance(mu, sigma, ref_mu, ref_sigma), rel=1e-6)
    rows = torch.from_numpy(rng.integers(0, n, n))  # rows taken 0, 1, 2, … times
    drawn = ddpm_fid.fid_of_rows(samples.double(), projected, ref_mu_t, values.sum(),
                                 torch.bincount(rows, minlength=n).double())
    assert drawn == pytest.approx(frechet_distance(*ddpm_fid.moments(samples[rows]), ref_mu, ref_sigma), rel=1e-6)


def test_where_a_second_draw_lands_covers_second_draws():
    """FID of n = 100 draws of one distribution against another's statistics, 40 pairs: the second draw lands within
    the first's interval about 95 % of the time, and the interval matches the spread of the differences."""
    rng = np.random.default_rng(1)
    ref_mu, ref_sigma = ddpm_fid.moments(gaussian_features(rng, 5000, 16, shift=0.5))
    readings, widths = [], []
    for _ in range(80):
        samples = gaussian_features(rng, 100, 16)
        readings.append(frechet_distance(*ddpm_fid.moments(samples), ref_mu, ref_sigma))
        widths.append(ddpm_fid.fid_second_draw(samples, ref_mu, ref_sigma, draws=100, seed=len(readings))[0])
    differences = np.abs(np.diff(readings)[::2])                     # 40 independent pairs
    assert np.mean(differences <= np.array(widths[::2])) >= 0.85
    assert np.mean(widths) == pytest.approx(1.96 * np.sqrt(2) * np.std(readings), rel=0.3)


def test_kid_of_two_draws_of_one_distribution_is_about_zero_and_of_two_is_not():
    rng = np.random.default_rng(2)
    first, second = gaussian_features(rng, 300, 2048), gaussian_features(rng, 1000, 2048)
    kid, kid_std = ddpm_fid.kernel_inception_distance(first, second)
    assert abs(kid) < 3 * kid_std + 1e-4          # unbiased: zero in expectation
    moved, moved_std = ddpm_fid.kernel_inception_distance(gaussian_features(rng, 300, 2048, shift=0.2), second)
    assert moved > kid + 10 * moved_std


def test_precision_and_recall_of_point_clouds_with_known_answers():
    """Two far clusters of 50 reference points; samples that are the first cluster's points are all real (precision
    1) but cover half the reference (recall 0.5); and the other way round."""
    rng = np.random.default_rng(3)
    first = torch.from_numpy(rng.normal(size=(50, 8)).astype(np.float32))
    both = torch.cat([first, first + 100])
    assert ddpm_fid.precision_recall(first, both) == (1.0, 0.5)
    assert ddpm_fid.precision_recall(both, first) == (0.5, 1.0)
    assert ddpm_fid.precision_recall(first, first) == (1.0, 1.0)
