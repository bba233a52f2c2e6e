"""Bad, damaged and foreign files (checkpoints, data, Inception weights, foreign weights): one line naming the file
and what is wrong, nothing written."""
import copy
import io
import json
import lzma
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import (SMALL_CONFIG, TINY_MODEL, make_image_folder, one_line_error, run_cli, run_in_process, run_main,
                      save_edited, tree)
from ddpm_checkpoint import DIGEST_KEY, checkpoint_digest, load_checkpoint, save_checkpoint, write_checkpoint
from ddpm_data import CACHE_NAME, load_dataset
from ddpm_fid import (InceptionFeatures, split_reference, statistics_problem, stats_cache_name,
                      write_random_inception)
from ddpm_helpers import UserError, input_file_problem


def write_bad_checkpoints(folder):
    (folder / "text.pt").write_text("not a checkpoint")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, folder / "other_tool.pt")
    torch.save(torch.nn.Linear(2, 2), folder / "pickled_module.pt")


@pytest.mark.parametrize("name,message", [("text.pt", "not a readable checkpoint"),
                                          ("other_tool.pt", "not a checkpoint of this tool"),
                                          ("pickled_module.pt", "not a readable checkpoint")])
def test_foreign_or_corrupt_checkpoint(name, message, tmp_path, monkeypatch, capsys):
    write_bad_checkpoints(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--inference", "--model_path", name, "--no_cuda"], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "outputs").exists()


def test_missing_dataset_without_download(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--data_dir", "absent", "--no_cuda"], capsys)
    assert code == 2
    assert "--data_dir" in err and "train/<class>" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_half_image_folder_layout_is_an_error(tmp_path, monkeypatch, capsys):
    make_image_folder(str(tmp_path / "d"), per_class_train=1, num_classes=2)
    for f in (tmp_path / "d" / "test").rglob("*.png"):
        f.unlink()
    for d in sorted((tmp_path / "d" / "test").iterdir()):
        d.rmdir()
    (tmp_path / "d" / "test").rmdir()
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--data_dir", "d", "--no_cuda"], capsys)
    assert code == 2 and "not test/" in err
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_a_corrupt_image_is_named_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    data = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=2)
    folder = tmp_path / "d" / "train" / "1_class1"
    Image.open(folder / "0001.png").save(folder / "0001.jpg", quality=75)
    (folder / "0001.png").unlink()
    (folder / "0001.jpg").write_bytes((folder / "0001.jpg").read_bytes()[:300])  # truncated, as a cut download
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--data_dir", data, "--no_cuda", *TINY_MODEL], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"cannot read the image {folder / '0001.jpg'}" in err and "remove or replace it" in err
    assert sorted(os.listdir(tmp_path)) == ["d"] and sorted(os.listdir(data)) == ["test", "train"]


def bomb(path):
    """A PNG whose header claims 30,000 × 30,000 pixels in a few kilobytes."""
    Image.new("1", (30_000, 30_000)).save(path)


def large(path):
    Image.new("L", (5000, 4000)).save(path)


def fifo(path):
    os.remove(path)
    os.mkfifo(path)


def dangling(path):
    os.remove(path)
    os.symlink("nowhere.png", path)


DATA_FOLDERS = [
    ("a decompression bomb first", bomb, "claims more pixels than any image can hold"),
    ("an image too large first", large, "is 5000×4000 pixels, more than the 16,777,216 a training image may have"),
    ("a FIFO named .png", fifo, "is not a regular image file (is not a regular file (a FIFO, socket or device))"),
    ("a link to nothing", dangling, "is not a regular image file (is a symbolic link to 'nowhere.png', which does"),
]


@pytest.mark.parametrize("name,damage,message", DATA_FOLDERS, ids=[row[0] for row in DATA_FOLDERS])
def test_a_data_file_is_checked_before_it_is_read(name, damage, message, tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class_train=2, num_classes=2)
    damage(os.path.join(data, "train", "0_class0", "0000.png"))
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("--data_dir", data, *TINY_MODEL, "--epochs", "1", cwd=work, timeout=120)  # a FIFO would hang
    assert message in one_line_error(result)
    assert tree(work) == {}


def test_a_single_training_image_is_refused_before_anything_is_written(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class_train=1, num_classes=1)
    work = tmp_path / "work"
    work.mkdir()
    line = one_line_error(run_main("--data_dir", data, *TINY_MODEL, "--epochs", "1", cwd=work))
    assert line.endswith("holds 1 training image; training needs at least 2 (one to train on, one to validate)")
    assert tree(work) == {}


def test_a_decode_cache_of_another_image_size_is_decoded_again(tmp_path):
    from ddpm_data import load_dataset
    data = make_image_folder(str(tmp_path / "data"), per_class_train=2, num_classes=2, size=16)
    assert load_dataset(data)["train_images"].shape[-2:] == (16, 16)
    make_image_folder(data, per_class_train=2, num_classes=2, size=24)  # the same names, new images of 24 × 24
    assert load_dataset(data)["train_images"].shape[-2:] == (24, 24)


def test_a_missing_nested_data_dir_leaves_no_folder_behind(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        os.makedirs(args[0], exist_ok=True)  # as torchvision does before it tries to download
        raise RuntimeError("no internet")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    line = one_line_error(run_main("--data_dir", "a/b/c", "--dataset", "cifar10", *TINY_MODEL, cwd=tmp_path))
    assert "could not be downloaded" in line and tree(tmp_path) == {}


def test_a_class_name_too_long_for_a_file_name_still_samples(tmp_path):
    names = ["é" * 120, "b" * 250]  # 240 and 250 bytes: folder names that fit, file names that would not
    data = make_image_folder(str(tmp_path / "data"), per_class_train=2, num_classes=2, class_names=names)
    assert run_main("--data_dir", data, *TINY_MODEL, "--epochs", "1", "--conditional", "--save_model", "--quiet",
                    cwd=tmp_path).returncode == 0
    result = run_main("--inference", "--conditional", "--model_path", "models/DDPM/ckpt.pt", "--num_samples", "2",
                      "--no_cuda", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(len(name.encode()) <= 255 for name in os.listdir(tmp_path / "outputs" / "samples_DDPM"))


def test_input_files_are_named_by_what_is_wrong_with_them(tmp_path, monkeypatch):
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "ok").write_bytes(b"x")
    assert input_file_problem(str(tmp_path / "loop_a")) == "is a loop of symbolic links"
    assert input_file_problem(str(tmp_path / "missing")) == "does not exist"
    assert input_file_problem(str(tmp_path)) == "is a folder, not a file"
    assert input_file_problem(str(tmp_path / "fifo")) == "is not a regular file (a FIFO, socket or device)"
    assert input_file_problem(str(tmp_path / "ok")) is None
    real_open = open

    def unreadable(path, *args, **kwargs):
        if str(path).endswith("ok"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", unreadable)
    assert input_file_problem(str(tmp_path / "ok")) == "cannot be read (Permission denied)"


def test_a_symlink_loop_as_model_path_is_named(tmp_path):
    os.symlink("b.pt", tmp_path / "a.pt")
    os.symlink("a.pt", tmp_path / "b.pt")
    line = one_line_error(run_main("--inference", "--model_path", "a.pt", "--no_cuda", cwd=tmp_path))
    assert line == "ddpm_main.py: error: --model_path 'a.pt' is a loop of symbolic links (see --help)"


def test_fid_statistics_no_inception_network_gives_are_refused():
    from ddpm_fid import statistics_problem
    mu, sigma = np.zeros(2048), np.eye(2048)
    assert statistics_problem({"mu": mu, "sigma": sigma}) is None
    assert "which no Inception network gives" in statistics_problem({"mu": mu + 1e200, "sigma": sigma})
    assert "negative variance" in statistics_problem({"mu": mu, "sigma": -sigma})


def damage(ckpt, how):
    """A copy of a checkpoint damaged in one way, as a foreign tool, a cut download or a hand edit would."""
    ckpt = {**ckpt, "config": {**ckpt["config"], "model": dict(ckpt["config"]["model"])}}
    if how == "no weights":
        ckpt.pop("model"), ckpt.pop("ema")
    elif how == "no timesteps":
        del ckpt["config"]["timesteps"]
    elif how == "other shapes":
        ckpt["config"]["model"]["dim"] = 16
    elif how == "a huge network":
        ckpt["config"]["model"]["dim"] = 8_000_000
    elif how == "unknown schedule":
        ckpt["config"]["schedule"] = "quadratic"
    elif how == "config a list":
        ckpt["config"] = [1, 2]
    elif how == "weights not tensors":
        ckpt["ema"] = {name: 0 for name in ckpt["ema"]}
    elif how == "bad sampling":
        ckpt["config"]["sampling"] = {"sampler": "euler"}
    elif how == "fewer parameters in the optimizer":
        ckpt["optimizer"] = {**ckpt["optimizer"], "param_groups": [{**ckpt["optimizer"]["param_groups"][0],
                                                                   "params": [0, 1]}]}
    elif how == "rng not a tensor":
        ckpt["rng"] = {"cpu": [1, 2, 3], "cuda": []}
    elif how == "no history":
        del ckpt["history"]
    elif how == "no batch_size":
        del ckpt["config"]["batch_size"]
    return ckpt


SAMPLE = ("uncond/ckpt.pt", ["--inference", "--model_path", "damaged.pt", "--num_samples", "2"])
RESUME = ("cond/last.pt", ["--resume", "damaged.pt", "--epochs", "2"])


@pytest.mark.parametrize("use,how,message", [
    (SAMPLE, "no weights", "it holds no weights ('ema' or 'model')"),
    (SAMPLE, "no timesteps", "the config lacks timesteps"),
    (SAMPLE, "other shapes", "its ema weights do not fit the network its config describes (time_mlp.1.weight is "
                             "32×8 in the file and 64×16 for the network its config describes;"),
    (SAMPLE, "a huge network", "its config describes a network of 9,216,000,000,000,000 parameters, its weights "
                               "hold 66,595"),  # 4 · 9 · 16,000,000²: not even built on the meta device
    (SAMPLE, "unknown schedule", "the config's schedule is 'quadratic', not one of linear, cosine, sigmoid"),
    (SAMPLE, "config a list", "its config is not a dict"),
    (SAMPLE, "weights not tensors", "its ema weights are not a dict of tensors"),
    (SAMPLE, "bad sampling", "the config's sampling.sampler is 'euler', not one of dpm++2m, dpm++3m, ddim, ddpm"),
    (RESUME, "fewer parameters in the optimizer", "its optimizer state is for 2 parameters, the network has "),
    (RESUME, "rng not a tensor", "the checkpoint's rng is {'cpu': [1, 2, 3], 'cuda': []}, not the generators' "
                                 "states"),
    (RESUME, "no history", "the checkpoint lacks history"),
    (RESUME, "no batch_size", "the config lacks batch_size"),
    (RESUME, "other shapes", "its ema weights do not fit the network"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_what_is_wrong_before_anything_is_written(
        use, how, message, trained, tmp_path):
    source, argv = use
    save_edited(damage(torch.load(trained / "models" / source, weights_only=True), how), tmp_path / "damaged.pt")
    before = tree(tmp_path)
    result = run_main(*argv, "--no_cuda", cwd=tmp_path)
    assert one_line_error(result).startswith(f"ddpm_main.py: error: 'damaged.pt' is damaged or incomplete: {message}")
    assert tree(tmp_path) == before


def test_a_damaged_decode_cache_is_decoded_again_with_one_warning(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=3)
    fresh = load_dataset(data)
    cache = os.path.join(data, CACHE_NAME)
    good = torch.load(cache, weights_only=True)
    capsys.readouterr()
    for damaged, problem in (
            (b"\x00" * 100, "unreadable: "),
            ({**good, "train_images": good["train_images"][:, 0]}, "its train images are not 6 uint8 images"),
            ({**good, "test_labels": good["test_labels"] + 7}, "its test labels are not 3 class indices"),
            ({**good, "classes": ["x", "y", "z"]}, "its class names or image shapes do not match the folders'")):
        if isinstance(damaged, bytes):
            with open(cache, "wb") as f:
                f.write(damaged)
        else:
            torch.save(damaged, cache)
        data_again = load_dataset(data)
        err = capsys.readouterr().err
        assert err.startswith(f"warning: the decode cache {cache} is damaged ({problem}")
        assert err.endswith("; decoding the images again\n") and len(err.splitlines()) == 1
        for key in ("train_images", "train_labels", "test_images", "test_labels"):
            assert torch.equal(data_again[key], fresh[key])
        assert data_again["classes"] == fresh["classes"]
        load_dataset(data)  # the cache written again is good: read without a word
        assert capsys.readouterr().err == ""


def test_a_checkpoints_invalid_run_name_is_replaced_and_nothing_leaves_the_save_dir(trained, tmp_path):
    ckpt = torch.load(trained / "models" / "uncond" / "ckpt.pt", weights_only=True)
    ckpt["config"]["run_name"] = "../../evil name"  # an older tool's, or a hand-edited file
    write_checkpoint(ckpt, str(tmp_path / "old copy.pt"))  # not a valid run name either: the stored one is tried
    result = run_main("--inference", "--model_path", "old copy.pt", "--num_samples", "2", "--no_cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == ("note: 'old copy.pt' carries the run name '../../evil name', which is "
                                             "not a valid one (letters A-Z a-z, digits, '_', '-' and '.'); its files "
                                             "are named 'evil_name'")
    written = sorted(path for path in tree(tmp_path) if path != "old copy.pt")
    assert written == ["outputs", "outputs/samples_evil_name", "outputs/samples_evil_name.npz",
                       "outputs/samples_evil_name.png", "outputs/samples_evil_name/00000.png",
                       "outputs/samples_evil_name/00001.png"]
    assert not os.path.exists(tmp_path.parent / "evil name")


def test_switching_fid_networks_or_a_damaged_cache_recomputes_the_statistics_and_features(tmp_path, fake_inception, capsys):
    data = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=3)
    loaded = load_dataset(data)
    facts = {"dataset": "folder", "classes": loaded["classes"], "channels": 3, "data_size": [16, 16]}
    first = InceptionFeatures(fake_inception, "cpu")
    second = InceptionFeatures(write_random_inception(str(tmp_path / "b.pth"), seed=1), "cpu")  # other features
    images = loaded["train_images"].permute(0, 2, 3, 1).numpy()
    reference_statistics = lambda net, *_: split_reference(net, loaded["train_images"], "train", data, facts)
    mu_first, _, features_first = reference_statistics(first)
    cache = os.path.join(data, stats_cache_name("train", "folder"))
    assert str(np.load(cache)["network"]) == first.fingerprint
    capsys.readouterr()
    features_cache = os.path.join(data, stats_cache_name("train", "folder", "features"))
    mu_second, sigma_second, features_second = reference_statistics(second)
    assert capsys.readouterr().err == "".join(f"note: {what} {path} was made by another --fid_inception network: "
                                              "computing them again\n" for what, path in (
                                                  ("the FID reference statistics", cache),
                                                  ("the reference features", features_cache)))
    expected_mu, expected_sigma, _ = second.statistics(images)
    assert np.allclose(mu_second, expected_mu) and not np.allclose(mu_second, mu_first)
    assert np.allclose(sigma_second, expected_sigma, rtol=1e-6, atol=1e-6)
    expected_features, _ = second.pool_features(images)  # kept in half precision
    assert torch.equal(features_second, expected_features.half().float())
    assert not torch.allclose(features_second, features_first)
    mu_cached, _, features_cached = reference_statistics(second)  # now from the caches
    assert np.allclose(mu_cached, expected_mu) and torch.equal(features_cached, features_second)
    assert capsys.readouterr().err == ""
    np.savez(cache, **{k: v for k, v in np.load(cache).items() if k != "network"})  # as an older version wrote it
    reference_statistics(second)
    assert "does not record which network made it" in capsys.readouterr().err
    np.savez(features_cache, **{**np.load(features_cache), "features": features_second.numpy()})  # float32
    assert torch.equal(reference_statistics(second)[2], features_second)
    assert capsys.readouterr().err == (f"note: the reference features {features_cache} is damaged (it holds no "
                                       "features (N, 2048) of float16): computing them again\n")


def test_a_split_of_one_image_is_refused_before_any_pass(tmp_path, fake_inception):
    one = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    facts = {"dataset": "folder", "classes": ["a"], "channels": 3, "data_size": [16, 16]}
    with pytest.raises(UserError, match=r"--eval_fid compares with the test split at .*, which holds 1 image: a "
                                        "covariance needs at least 2"):
        split_reference(InceptionFeatures(fake_inception, "cpu"), one, "test", str(tmp_path), facts)
    assert os.listdir(tmp_path) == []  # nothing cached


def test_features_that_are_not_finite_are_refused_and_nothing_is_cached(tmp_path, fake_inception):
    data = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=3)
    loaded = load_dataset(data)
    facts = {"dataset": "folder", "classes": loaded["classes"], "channels": 3, "data_size": [16, 16]}
    features = InceptionFeatures(fake_inception, "cpu")  # finite on the one image it is tried on as it loads ...
    features.net = lambda x: (torch.full((len(x), 2048), float("nan")), torch.zeros(len(x), 1008))  # ... then NaN
    with pytest.raises(UserError, match="gave NaN or infinite features for some of 6 images: the network is broken; "
                                        "nothing was cached"):
        split_reference(features, loaded["train_images"], "train", data, facts)
    assert not any(name.startswith("ddpm_fid_") for name in os.listdir(data))


def test_statistics_are_checked_before_they_are_used():
    good = {"mu": np.zeros(2048), "sigma": np.eye(2048, dtype=np.float32)}
    assert statistics_problem(good) is None
    asymmetric = np.eye(2048)
    asymmetric[0, 1] = 0.5
    assert statistics_problem({**good, "sigma": asymmetric}) == "its sigma is not symmetric, as a covariance is"
    assert statistics_problem({"sigma": good["sigma"]}) == "it holds no mu"
    assert statistics_problem({**good, "mu": np.full(2048, np.nan)}) == "its mu or sigma hold NaN or infinite values"
    assert statistics_problem({**good, "mu": np.zeros(64)}).startswith("its mu is (64,) and sigma (2048, 2048), not")


def bad_fid_files(folder, fake_inception):
    """{name: (flags, the message)} of FID inputs that must stop a training run before its first step."""
    np.savez(folder / "no_mu.npz", sigma=np.eye(2048))
    np.savez(folder / "narrow.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(folder / "pickled.npz", mu=np.array([object()], dtype=object), sigma=np.eye(2048))
    (folder / "text.npz").write_text("mu, sigma")
    (folder / "text.pth").write_text("not a network")
    torch.save({"conv.weight": torch.zeros(2, 2)}, folder / "other.pth")
    state = torch.load(fake_inception, weights_only=True)
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
               folder / "nan.pth")
    return {
        "other weights": (["--fid_inception", str(folder / "other.pth")],
                          "does not hold the Inception-v3 weights torch-fidelity expects"),
        "NaN network": (["--fid_inception", str(folder / "nan.pth")],
                        "gives NaN or infinite features for one image: the network is broken"),
        "not a network": (["--fid_inception", str(folder / "text.pth")], "cannot be read as plain weights"),
        "stats without mu": (["--fid_ref_stats", str(folder / "no_mu.npz")], "cannot be used: it holds no mu"),
        "stats of other shape": (["--fid_ref_stats", str(folder / "narrow.npz")], "cannot be used: its mu is (64,)"),
        "pickled stats": (["--fid_ref_stats", str(folder / "pickled.npz")],
                          "cannot be used: it is not a readable npz of statistics (ValueError)"),
        "stats not an npz": (["--fid_ref_stats", str(folder / "text.npz")],
                             "cannot be used: it is not a readable npz of statistics"),
    }


def test_a_bad_fid_network_or_statistics_file_stops_training_before_its_first_step(tiny_data, tmp_path,
                                                                                    fake_inception):
    for case, (flags, message) in bad_fid_files(tmp_path, fake_inception).items():
        cwd = tmp_path / case.replace(" ", "_")
        cwd.mkdir()
        result = run_main("--data_dir", tiny_data, "--epochs", "1", "--eval_fid", "10", "--fid_inception",
                          fake_inception, *flags, *TINY_MODEL, cwd=cwd)
        assert message in one_line_error(result), case
        assert os.listdir(cwd) == [], case  # no checkpoint, grid or log: not one step was taken


class RunsCode:
    """Pickled, it calls open(marker, 'w') when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def bad_weights_files(folder, fake_inception, checkpoint):
    """{case: (path, what the error says)} of --fid_inception files that are not Inception weights."""
    (folder / "text.pth").write_text("not weights")
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), buffer)
    (folder / "script.pt").write_bytes(buffer.getvalue())
    (folder / "script.pt.xz").write_bytes(lzma.compress(buffer.getvalue()))
    torch.save({"conv.weight": torch.zeros(2, 2)}, folder / "other.pth")
    state = torch.load(fake_inception, weights_only=True)
    torch.save({**state, "Conv2d_1a_3x3.conv.weight": torch.full_like(state["Conv2d_1a_3x3.conv.weight"], np.nan)},
               folder / "nan.pth")
    return {
        "text": (folder / "text.pth", "cannot be read as plain weights (UnpicklingError): it is damaged, or it holds "
                                      "objects that would run code as they load, which this tool never does"),
        "TorchScript": (folder / "script.pt", "is a TorchScript network (what older versions of this tool read); FID "
                                              "now runs on torch-fidelity's weights file"),
        "xz": (folder / "script.pt.xz", "is xz-compressed, as the TorchScript network older versions of this tool "
                                        "read was"),
        "a checkpoint": (checkpoint, "holds no state dict (a dict of tensors)"),
        "other weights": (folder / "other.pth", "does not hold the Inception-v3 weights torch-fidelity expects "
                                                "(RuntimeError: Error(s) in loading state_dict"),
        "NaN weights": (folder / "nan.pth", "gives NaN or infinite features for one image: the network is broken"),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # the TorchScript case is made with torch.jit
def test_files_that_are_not_inception_weights_are_refused_with_what_they_are(tmp_path, fake_inception, trained):
    for case, (path, message) in bad_weights_files(tmp_path, fake_inception,
                                                   trained / "models" / "cond" / "ckpt.pt").items():
        with pytest.raises(UserError) as error:
            InceptionFeatures(str(path), "cpu")
        assert str(error.value).startswith(f"--fid_inception {str(path)!r} {message}"), (case, str(error.value))


def test_a_weights_file_that_would_run_code_is_refused_without_running_it(tmp_path, trained):
    marker = tmp_path / "the_code_ran"
    torch.save({"fc.weight": RunsCode(str(marker))}, tmp_path / "runs_code.pth")
    result = run_main("--inference", "--model_path", trained / "models" / "uncond" / "ckpt.pt", "--eval_fid", "10",
                      "--fid_inception", tmp_path / "runs_code.pth", "--no_cuda", cwd=tmp_path)
    assert "holds objects that would run code as they load, which this tool never does" in one_line_error(result)
    assert not marker.exists()
    torch.load(tmp_path / "runs_code.pth", weights_only=False)  # what torch-fidelity would have done: it runs
    assert marker.exists()


def write_bad_files(folder, small_folder):
    """name → path of files --import_weights must refuse."""
    folder.mkdir(exist_ok=True)
    good = load_file(small_folder / "diffusion_pytorch_model.safetensors")
    (folder / "notes.txt").write_text("not weights")
    (folder / "truncated.safetensors").write_bytes((small_folder / "diffusion_pytorch_model.safetensors")
                                                   .read_bytes()[:5000])
    torch.save({"x": [1, 2], "nested": {"a": torch.ones(1)}}, folder / "not_a_state_dict.pt")

    class Payload:
        def __reduce__(self):
            return os.system, ("touch pwned",)

    torch.save({"w": Payload()}, folder / "code.pt")
    for name, change in (("wrong_shape", lambda t: {**t, "conv_in.weight": torch.zeros(32, 3, 5, 5)}),
                         ("missing", lambda t: {k: v for k, v in t.items() if not k.startswith("conv_out.")}),
                         ("extra", lambda t: {**t, "extra.weight": torch.zeros(3)})):
        (folder / name).mkdir()
        save_file(change(good), folder / name / "diffusion_pytorch_model.safetensors")
        (folder / name / "config.json").write_text(json.dumps(SMALL_CONFIG))
    (folder / "other_layout").mkdir()
    save_file(good, folder / "other_layout" / "diffusion_pytorch_model.safetensors")
    (folder / "other_layout" / "config.json").write_text(json.dumps({**SMALL_CONFIG, "flip_sin_to_cos": True}))
    (folder / "no_config").mkdir()
    save_file(good, folder / "no_config" / "diffusion_pytorch_model.safetensors")
    (folder / "empty").mkdir()


BAD_FILES = [
    ("notes.txt", "is not a readable weights file"),
    ("truncated.safetensors", "is not a readable safetensors file"),
    ("not_a_state_dict.pt", "is not a state dict (a dict of named tensors)"),
    ("code.pt", "is not a readable weights file (UnpicklingError)"),
    ("wrong_shape", "conv_in.weight is 32×3×5×5, Ho et al.'s network of its layout has 32×3×3×3 there"),
    ("missing", "lacks conv_out.weight, which Ho et al.'s network of its layout has"),
    ("extra", "holds 1 tensors Ho et al.'s network has no place for (extra.weight)"),
    ("other_layout", "its config.json is not Ho et al.'s CIFAR-10 layout: flip_sin_to_cos True (Ho et al.: False)"),
    ("no_config", "is a folder without a diffusers UNet2DModel in it"),
    ("empty", "is a folder without a diffusers UNet2DModel in it"),
    ("absent", "does not exist"),
]


@pytest.mark.parametrize("name, message", BAD_FILES)
def test_damaged_and_foreign_files_are_one_line_and_write_nothing(name, message, small_folder, tmp_path):
    write_bad_files(tmp_path / "bad", small_folder[0])
    result = run_main("--import_weights", tmp_path / "bad" / name, "--run_name", "bad", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "bad").exists() and not (tmp_path / "pwned").exists()


def nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def first_weight(part, change):
    """A change to the first weight tensor of `part`."""
    def apply(ckpt):
        name = next(iter(ckpt[part]))
        ckpt[part][name] = change(ckpt[part][name])
    return apply


def holder(ckpt, keys):
    """The dict that holds ckpt[k1][k2]…[kn], kn its key."""
    for key in keys[:-1]:
        ckpt = ckpt[key]
    return ckpt


def set_in(*keys_and_value):
    """A change that sets ckpt[k1][k2]… = value."""
    *keys, value = keys_and_value
    return lambda ckpt: holder(ckpt, keys).__setitem__(keys[-1], value)


def delete(*keys):
    return lambda ckpt: holder(ckpt, keys).pop(keys[-1])


def save_damaged(source, change, path):
    """A copy of the checkpoint `source` changed by `change`, saved as a foreign tool would (no digest)."""
    ckpt = copy.deepcopy(torch.load(source, weights_only=True))
    ckpt.pop(DIGEST_KEY, None)
    change(ckpt)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # as a hostile writer might: torch.save recurses into nested entries
    try:
        torch.save(ckpt, path)
    finally:
        sys.setrecursionlimit(limit)


SAMPLE = ("uncond/ckpt.pt", ["--inference", "--model_path", "damaged.pt", "--num_samples", "2"])
SAMPLE_COND = ("cond/ckpt.pt", ["--inference", "--conditional", "--model_path", "damaged.pt", "--num_samples", "2"])
RESUME = ("cond/last.pt", ["--resume", "damaged.pt", "--epochs", "2"])
CHECKPOINT_CONTENTS = [
    ("guidance scale a string", SAMPLE, set_in("config", "sampling", "guidance_scale", "3"),
     "the config's sampling.guidance_scale is '3', not a number ≥ 0"),
    ("negative guidance scale", SAMPLE, set_in("config", "sampling", "guidance_scale", -2.0),
     "the config's sampling.guidance_scale is -2.0, not a number ≥ 0"),
    ("fractional step count", SAMPLE, set_in("config", "sampling", "steps", 2.5),
     "the config's sampling.steps is 2.5, not none or a whole number ≥ 1"),
    ("step count a string", SAMPLE, set_in("config", "sampling", "steps", "15"),
     "the config's sampling.steps is '15', not none or a whole number ≥ 1"),
    ("eta out of range", SAMPLE, set_in("config", "sampling", "eta", 7.0),
     "the config's sampling.eta is 7.0, not a number in [0, 1]"),
    ("unknown sampling entry", SAMPLE, set_in("config", "sampling", "order", 3),
     "the config's sampling holds order, not one of sampler, steps"),
    ("nested thousands deep", SAMPLE, set_in("config", "notes", nested(5000)),
     "the checkpoint's config is nested more than 32 deep"),
    ("image size of 1", SAMPLE, lambda c: (c["config"].update(image_size=1), c["config"]["model"].update(image_size=1)),
     "the config's image_size is 1, and its 2 stages need at least 2 pixels a side"),
    ("image sizes disagree", SAMPLE, set_in("config", "image_size", 32),
     "the config's image_size (32) and its model's (16) differ"),
    ("no class names", SAMPLE_COND, delete("config", "classes"), "the config lacks classes"),
    ("ema a tensor", SAMPLE, set_in("ema", torch.zeros(3)), "its ema weights are not a dict of tensors"),
    ("model a list", SAMPLE, set_in("model", [1, 2]), "its model weights are not a dict of tensors"),
    ("sparse weights", SAMPLE, first_weight("ema", lambda w: w.to_sparse()),
     "its ema weights hold time_mlp.1.weight as a sparse tensor, not a dense one"),
    ("complex weights", SAMPLE, first_weight("ema", lambda w: w.to(torch.complex64)),
     "its ema weights hold time_mlp.1.weight as torch.complex64, not real floating point"),
    ("integer weights", SAMPLE, first_weight("ema", lambda w: w.to(torch.int32)),
     "its ema weights hold time_mlp.1.weight as torch.int32, not real floating point"),
    ("raw weights integer", SAMPLE, first_weight("model", lambda w: w.to(torch.int64)),
     "its model weights hold time_mlp.1.weight as torch.int64, not real floating point"),
    ("meta weights", SAMPLE, first_weight("ema", lambda w: torch.empty_like(w, device="meta")),
     "its ema weights hold time_mlp.1.weight on the meta device, not in the file"),
]


@pytest.mark.parametrize("name,use,change,message", CHECKPOINT_CONTENTS, ids=[row[0] for row in CHECKPOINT_CONTENTS])
def test_checkpoint_contents_are_checked_by_their_declarations(name, use, change, message, trained, tmp_path):
    source, argv = use
    save_damaged(trained / "models" / source, change, tmp_path / "damaged.pt")
    before = tree(tmp_path)
    result = run_main(*argv, "--no_cuda", cwd=tmp_path)
    line = one_line_error(result)
    assert line.startswith("ddpm_main.py: error: 'damaged.pt' is damaged or incomplete: "), line
    assert message in line, line
    assert tree(tmp_path) == before


LAST_PT_STATE = [
    ("timing a string", set_in("timing", "train_s", "slow"),
     "the checkpoint's timing.train_s is 'slow', not a number ≥ 0"),
    ("timing NaN", set_in("timing", "wall_s", math.nan), "the checkpoint's timing.wall_s is nan, not a number ≥ 0"),
    ("timing a list", set_in("timing", [1.0]), "the checkpoint's timing is [1.0], not seconds per activity"),
    ("epoch fractional", set_in("epoch", 1.5), "the checkpoint's epoch is 1.5, not a whole number ≥ 0"),
    ("step a string", set_in("step", "4"), "the checkpoint's step is '4', not a whole number ≥ 0"),
    ("skipped steps negative", set_in("skipped_steps", -1), "the checkpoint's skipped_steps is -1, not a whole number"),
    ("best_val a string", set_in("best_val", "low"), "the checkpoint's best_val is 'low', not a number"),
    ("epoch_loss_sum NaN", set_in("epoch_loss_sum", math.nan), "the checkpoint's epoch_loss_sum is nan, not a number"),
    ("budget_spent a string", set_in("budget_spent", "yes"),
     "the checkpoint's budget_spent is 'yes', not true or false"),
    ("history lengths differ", lambda c: c["history"]["val_loss"].append(1.0),
     "the checkpoint's history holds lists of different lengths"),
    ("history losses strings", lambda c: c["history"].update(train_loss=["a"]),
     "the checkpoint's history.train_loss is ['a'], not a list of numbers"),
    ("optimizer lr a string", lambda c: c["optimizer"]["param_groups"][0].update(lr="fast"),
     "its optimizer's lr is 'fast', not a number ≥ 0"),
    ("optimizer betas wrong", lambda c: c["optimizer"]["param_groups"][0].update(betas=(0.9,)),
     "its optimizer's betas is (0.9,), not two numbers in [0, 1)"),
    ("optimizer eps negative", lambda c: c["optimizer"]["param_groups"][0].update(eps=-1.0),
     "its optimizer's eps is -1.0, not a number > 0"),
    ("optimizer moment integer", lambda c: c["optimizer"]["state"][0].update(
        exp_avg=c["optimizer"]["state"][0]["exp_avg"].long()), "its optimizer state of parameter 0 does not fit"),
    ("optimizer step a string", lambda c: c["optimizer"]["state"][0].update(step="3"),
     "its optimizer state of parameter 0 does not fit"),
    ("grad scaler a list", set_in("grad_scaler", [1]), "the checkpoint's grad_scaler is [1], not none or fp16's loss"),
    ("lr in config a string", set_in("config", "lr", "0.1"), "the config's lr is '0.1', not a number > 0"),
]


@pytest.mark.parametrize("name,change,message", LAST_PT_STATE, ids=[row[0] for row in LAST_PT_STATE])
def test_a_last_pt_state_is_checked_before_a_resume_uses_it(name, change, message, trained, tmp_path):
    source, argv = RESUME
    save_damaged(trained / "models" / source, change, tmp_path / "damaged.pt")
    before = tree(tmp_path)
    line = one_line_error(run_main(*argv, "--no_cuda", cwd=tmp_path))
    assert line.startswith("ddpm_main.py: error: 'damaged.pt' is damaged or incomplete: "), line
    assert message in line, line
    assert tree(tmp_path) == before


def flip_byte(path, where):
    data = bytearray(path.read_bytes())
    data[where(len(data))] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_checkpoint_written_carries_a_digest_of_its_contents(trained):
    for name in ("cond/last.pt", "cond/best.pt", "cond/ckpt.pt", "uncond/ckpt.pt"):
        ckpt = torch.load(trained / "models" / name, weights_only=True)
        assert ckpt[DIGEST_KEY] == checkpoint_digest(ckpt), name
        assert len(ckpt[DIGEST_KEY]) == 64


@pytest.mark.parametrize("where", [lambda n: n // 2, lambda n: n // 3, lambda n: 2 * n // 3],
                         ids=["middle", "a third in", "two thirds in"])
def test_a_flipped_byte_is_one_line_naming_the_file(where, trained, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((trained / "models" / "uncond" / "ckpt.pt").read_bytes())
    flip_byte(damaged, where)
    before = tree(tmp_path)
    line = one_line_error(run_main("--inference", "--model_path", "damaged.pt", "--num_samples", "2", "--no_cuda",
                                   cwd=tmp_path))
    assert line.startswith("ddpm_main.py: error: 'damaged.pt' "), line
    assert tree(tmp_path) == before


def test_a_digest_mismatch_names_the_file_and_says_what_to_do(trained, tmp_path):
    ckpt = torch.load(trained / "models" / "uncond" / "ckpt.pt", weights_only=True)
    name = next(iter(ckpt["ema"]))
    ckpt["ema"][name] = ckpt["ema"][name] + 1e-3  # a change no other check can see; the old digest kept
    torch.save(ckpt, tmp_path / "damaged.pt")
    with pytest.raises(UserError, match=r"'.*damaged.pt' is damaged: its contents differ from the digest it was "
                                        r"written with .*; use another copy or an earlier checkpoint"):
        load_checkpoint(str(tmp_path / "damaged.pt"))


def test_an_older_checkpoint_without_a_digest_loads_with_a_note(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "models" / "uncond" / "ckpt.pt", weights_only=True)
    del ckpt[DIGEST_KEY]
    torch.save(ckpt, tmp_path / "old.pt")
    load_checkpoint(str(tmp_path / "old.pt"))
    err = capsys.readouterr().err
    assert err.startswith("note: ") and "carries no digest" in err and len(err.splitlines()) == 1


def test_the_digest_covers_every_tensor_and_value_and_no_key_order(trained):
    ckpt = torch.load(trained / "models" / "cond" / "last.pt", weights_only=True)
    digest = checkpoint_digest(ckpt)
    reordered = dict(reversed(list(ckpt.items())))
    assert checkpoint_digest(reordered) == digest
    for change in (set_in("step", ckpt["step"] + 1), set_in("config", "lr", 0.5),
                   lambda c: c["optimizer"]["state"][0]["exp_avg"].view(-1)[0].add_(1),
                   lambda c: c["rng"]["cpu"].view(-1)[7].add_(1)):
        changed = copy.deepcopy(ckpt)
        change(changed)
        assert checkpoint_digest(changed) != digest


def test_save_checkpoint_records_the_digest_of_what_it_writes(trained, tmp_path):
    ckpt = torch.load(trained / "models" / "cond" / "last.pt", weights_only=True)
    save_checkpoint(ckpt, str(tmp_path / "best.pt"), with_optimizer=False)
    written = torch.load(tmp_path / "best.pt", weights_only=True)
    assert "optimizer" not in written and written[DIGEST_KEY] == checkpoint_digest(written)
    assert load_checkpoint(str(tmp_path / "best.pt"))["step"] == ckpt["step"]
    assert os.listdir(tmp_path) == ["best.pt"]
