"""Data (ddpm_data): image folders, torchvision datasets, padding, the on-device loader and its cache."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import ddpm_data
import ddpm_pictures
from conftest import TINY_MODEL, make_image_folder, run_main
from ddpm_data import (CIFAR10_CLASSES, DeviceLoader, crop_to_data, load_dataset, majority_mode, model_side,
                       pad_to_side, padding, stages_allowed)
from ddpm_fid import InceptionFeatures
from ddpm_pictures import file_name_part
from ddpm_sample import class_indices

FAST_SAMPLING = ["--sampler", "ddim", "--sampling_steps", "2"]  # for the per-epoch grids too


def train(cwd, data_dir, run, *extra):
    """A one-epoch run of the tiny model on data_dir, saved as models/<run>/ckpt.pt; returns its CompletedProcess."""
    result = run_main("--data_dir", data_dir, "--epochs", "1", "--save_model", "--run_name", run, *TINY_MODEL,
                      *FAST_SAMPLING, *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


def sample(cwd, run, *extra):
    """Inference from models/<run>/ckpt.pt, written as outputs/samples_<run>*; returns its CompletedProcess."""
    return run_main("--inference", "--model_path", f"models/{run}/ckpt.pt", "--no_cuda", *extra, cwd=cwd)


def config_of(cwd, run):
    return torch.load(cwd / "models" / run / "ckpt.pt", weights_only=True)["config"]


def test_twelve_classes_train_and_sample_class_11_by_index_and_by_name(tmp_path):
    names = sorted(f"{word}" for word in ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "koi",
                                          "lynx"))
    data = make_image_folder(str(tmp_path / "twelve"), per_class_train=1, num_classes=12, size=8, class_names=names)
    train(tmp_path, data, "c12", "--conditional")
    config = config_of(tmp_path, "c12")
    assert config["classes"] == names and config["num_classes"] == 12
    assert Image.open(tmp_path / "outputs" / "samples_c12_epoch001.png").size == (8 * 10 + 2, 12 * 10 + 2)  # a row each

    result = sample(tmp_path, "c12", "--conditional", "--num_samples", "3", "--sample_classes", "11,lynx,cat")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "outputs" / "samples_c12")) == ["00000_lynx.png", "00001_lynx.png",
                                                                        "00002_cat.png"]
    result = sample(tmp_path, "c12", "--conditional", "--sample_classes", "12")
    assert result.returncode == 2
    assert "'12' is neither a class index 0-11 nor a class name of this model (ant, bee, cat" in result.stderr


def test_a_class_named_by_a_number_is_taken_by_its_name():
    classes = sorted(str(c) for c in range(12))  # '0', '1', '10', '11', '2', …: folder names sort as text
    assert class_indices(["2", "3", "11", "1"], classes) == [4, 5, 3, 1]
    assert class_indices(["ant", "0"], ["ant", "bee"]) == [0, 0]


def test_grayscale_folder_trains_a_one_channel_model_and_writes_mode_l_images(tmp_path):
    data = make_image_folder(str(tmp_path / "grey"), per_class_train=3, num_classes=2, size=16, mode="L")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "grey" / "train" / "0_class0" / "0000.png")  # one colour
    result = train(tmp_path, data, "grey", "--conditional")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: 1 of 8 images under {data} are colour and were converted to grayscale, the mode of "
                        "most of them"]
    config = config_of(tmp_path, "grey")
    assert config["channels"] == 1 and config["model"]["channels"] == 1 and config["data_size"] == [16, 16]
    assert Image.open(tmp_path / "outputs" / "samples_grey_epoch001.png").mode == "L"

    result = sample(tmp_path, "grey", "--conditional", "--num_samples", "4")
    assert result.returncode == 0, result.stderr
    pngs = sorted((tmp_path / "outputs" / "samples_grey").iterdir())
    assert [p.name for p in pngs] == ["00000_0_class0.png", "00001_1_class1.png", "00002_0_class0.png",
                                      "00003_1_class1.png"]
    assert {(Image.open(p).mode, Image.open(p).size) for p in pngs} == {("L", (16, 16))}
    assert Image.open(tmp_path / "outputs" / "samples_grey.png").mode == "L"
    assert np.load(tmp_path / "outputs" / "samples_grey.npz")["images"].shape == (4, 16, 16, 1)


def test_the_majority_mode_wins_and_a_tie_keeps_colour():
    grey, colour = np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8)
    assert majority_mode([grey, grey, colour, grey]) == ("L", 1)
    assert majority_mode([grey, colour]) == ("RGB", 1)
    assert majority_mode([colour]) == ("RGB", 0)


def test_64px_folder_trains_and_samples_at_64_and_a_resume_on_other_data_is_refused(tmp_path, tiny_data):
    data = make_image_folder(str(tmp_path / "big"), per_class_train=2, num_classes=2, size=64)
    train(tmp_path, data, "big", "--conditional")
    config = config_of(tmp_path, "big")
    assert config["image_size"] == 64 and config["data_size"] == [64, 64] and config["channels"] == 3
    result = sample(tmp_path, "big", "--conditional", "--num_samples", "2")
    assert result.returncode == 0, result.stderr
    assert {Image.open(p).size for p in (tmp_path / "outputs" / "samples_big").iterdir()} == {(64, 64)}

    last_pt = (tmp_path / "models" / "big" / "last.pt").read_bytes()
    result = run_main("--resume", "auto", "--run_name", "big", "--data_dir", tiny_data, "--epochs", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert (f"--resume: the data at {tiny_data!r} is not what the model was trained on (classes 2: 0_class0, "
            "1_class1 for the model, 10: 0_class0, 1_class1, 2_class2, … here; data_size 64×64 for the model, 16×16 "
            "here)") in result.stderr
    assert (tmp_path / "models" / "big" / "last.pt").read_bytes() == last_pt


def test_28px_images_are_padded_to_32_for_four_stages_and_samples_cut_back_to_28(tmp_path):
    data = make_image_folder(str(tmp_path / "d28"), per_class_train=2, num_classes=3, size=28)
    result = train(tmp_path, data, "p28", "--conditional", "--dim_mults", "1,2,2,2")
    assert "folder: 28×28 colour, 3 classes, padded to 32×32 for the U-Net's 4 stages (samples are cut back)" \
        in result.stdout
    config = config_of(tmp_path, "p28")
    assert config["image_size"] == 32 and config["data_size"] == [28, 28]
    assert Image.open(tmp_path / "outputs" / "samples_p28_epoch001.png").size == (8 * 30 + 2, 3 * 30 + 2)

    result = sample(tmp_path, "p28", "--conditional", "--num_samples", "3")
    assert result.returncode == 0, result.stderr
    assert {Image.open(p).size for p in (tmp_path / "outputs" / "samples_p28").iterdir()} == {(28, 28)}
    assert np.load(tmp_path / "outputs" / "samples_p28.npz")["images"].shape == (3, 28, 28, 3)
    result = sample(tmp_path, "p28", "--guidance_sweep", "0,2")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "outputs" / "guidance_sweep_p28.png").is_file()


def test_the_padding_rule():
    assert [model_side((28, 28), stages) for stages in (1, 2, 3, 4, 5)] == [28, 28, 28, 32, 32]
    assert model_side((12, 12), 4) == 16 and model_side((64, 48), 3) == 64 and model_side((30, 17), 2) == 30
    assert stages_allowed((28, 28)) == 5 and stages_allowed((32, 32)) == 6 and stages_allowed((12, 12)) == 4
    assert padding((28, 28), 32) == (2, 2, 2, 2) and padding((29, 27), 32) == (2, 3, 1, 2)
    images = torch.arange(2 * 3 * 29 * 27, dtype=torch.float32).reshape(2, 3, 29, 27)
    padded = pad_to_side(images, 32)
    assert padded.shape == (2, 3, 32, 32)
    assert torch.equal(crop_to_data(padded, (29, 27)), images)
    assert torch.equal(padded[..., 0, 0], images[..., 0, 0]) and torch.equal(padded[..., -1, -1], images[..., -1, -1])
    assert torch.equal(padded[..., 0, 2:-3], images[..., 0, :])  # the edge row repeated above the image
    assert torch.equal(padded[..., 3:-2, 0], images[..., 2:, 0])  # and the edge column to the left
    fits = torch.zeros(1, 1, 8, 8)
    assert pad_to_side(fits, 8) is fits


def test_loader_flips_the_image_before_padding_it(tmp_path):
    images = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.zeros(4, dtype=torch.long), 4, "cpu", shuffle=False, flip=True, side=8)
    (x, _), = loader.batches()
    _, flips = loader.epoch_indices(0)
    plain = images.float() / 127.5 - 1
    expected = torch.where(flips[:, None, None, None], plain.flip(3), plain)
    assert x.shape == (4, 1, 8, 8) and flips.any() and not flips.all()
    assert torch.equal(crop_to_data(x, (5, 5)), expected)  # a flipped image stays where the crop looks


def write_idx(path, array):
    """An uint8 array in the IDX format of the MNIST files: magic (0, 0, 8 = ubyte, ndim), big-endian sizes, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
                     + array.tobytes())


def write_fake_torchvision(dataset, root):
    """A tiny copy of the dataset's on-disk format as torchvision downloads it (20 train, 10 test images); returns
    its class names."""
    rng = np.random.default_rng(0)
    if dataset in ("mnist", "fashion_mnist"):
        raw = root / ("MNIST" if dataset == "mnist" else "FashionMNIST") / "raw"
        for prefix, n in (("train", 20), ("t10k", 10)):
            write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
        return list((torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.FashionMNIST).classes)
    classes = CIFAR10_CLASSES if dataset == "cifar10" else [f"class {c}" for c in range(100)]
    label_key = "labels" if dataset == "cifar10" else "fine_labels"
    batch = lambda n: {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),  # rows of R, G, B planes
                       label_key: rng.integers(0, len(classes), n).tolist()}
    if dataset == "cifar10":
        files = {"data_batch_1": batch(4), "data_batch_2": batch(4), "data_batch_3": batch(4), "data_batch_4": batch(4),
                 "data_batch_5": batch(4), "test_batch": batch(10), "batches.meta": {"label_names": classes}}
    else:
        files = {"train": batch(20), "test": batch(10), "meta": {"fine_label_names": classes}}
    folder = root / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(pickle.dumps(content))
    return classes


@pytest.fixture
def offline_torchvision(monkeypatch):
    """torchvision without the network, and without the CIFAR files' MD5 check (a fake copy cannot pass it)."""
    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_download)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_download)


@pytest.mark.parametrize("dataset,size,channels", [("cifar10", 32, 3), ("cifar100", 32, 3), ("mnist", 28, 1),
                                                   ("fashion_mnist", 28, 1)])
def test_torchvision_dataset_by_name_trains_and_samples(dataset, size, channels, tmp_path, offline_torchvision):
    classes = write_fake_torchvision(dataset, tmp_path / "tv")
    data = load_dataset(str(tmp_path / "tv"), dataset)
    assert data["train_images"].shape == (20, channels, size, size) and data["test_images"].shape[0] == 10
    assert data["dataset"] == dataset and data["classes"] == classes

    train(tmp_path, str(tmp_path / "tv"), dataset, "--dataset", dataset, "--conditional")
    config = config_of(tmp_path, dataset)
    assert (config["dataset"], config["classes"], config["channels"]) == (dataset, classes, channels)
    assert config["data_size"] == [size, size] and config["image_size"] == size
    columns, rows = (8, 10) if len(classes) == 10 else (10, 10)  # 100 classes: one image each
    grid = Image.open(tmp_path / "outputs" / f"samples_{dataset}_epoch001.png")
    assert grid.size == (columns * (size + 2) + 2, rows * (size + 2) + 2)
    result = sample(tmp_path, dataset, "--conditional", "--num_samples", "2", "--sample_classes", "1,0")
    assert result.returncode == 0, result.stderr
    pngs = sorted((tmp_path / "outputs" / f"samples_{dataset}").iterdir())
    assert [p.name for p in pngs] == [f"00000_{file_name_part(classes[1])}.png",
                                      f"00001_{file_name_part(classes[0])}.png"]
    assert {(Image.open(p).mode, Image.open(p).size) for p in pngs} == {("L" if channels == 1 else "RGB",
                                                                         (size, size))}
    if len(classes) > 16:  # no column per class: a square grid
        assert sample(tmp_path, dataset, "--conditional", "--num_samples", "4", "--run_name", "sq").returncode == 0
        assert Image.open(tmp_path / "outputs" / "samples_sq.png").size == (2 * 34 + 2, 2 * 34 + 2)


def test_the_default_dataset_is_the_folder_tree_when_there_is_one_else_cifar10(tmp_path, tiny_data,
                                                                               offline_torchvision):
    assert load_dataset(tiny_data)["dataset"] == "folder"
    write_fake_torchvision("cifar10", tmp_path)
    assert load_dataset(str(tmp_path))["dataset"] == "cifar10"


def test_fid_repeats_grey_into_three_channels(fake_inception):
    features = InceptionFeatures(fake_inception, "cpu")
    grey = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    for of_grey, of_colour in zip(features(grey), features(np.repeat(grey, 3, axis=-1))):  # pool features, logits
        assert torch.equal(of_grey, of_colour)


def test_fid_of_a_grayscale_model_and_references_of_other_data_are_refused(tmp_path, tiny_data, fake_inception):
    data = make_image_folder(str(tmp_path / "grey"), per_class_train=3, num_classes=2, size=16, mode="L")
    train(tmp_path, data, "g")
    fid = ["--eval_fid", "10", "--fid_inception", fake_inception, "--num_samples", "2"]
    result = sample(tmp_path, "g", *fid)
    assert result.returncode == 0, result.stderr
    assert "grayscale images are repeated into the Inception network's three colour channels" in result.stdout
    assert np.isfinite(json.loads((tmp_path / "outputs" / "metrics_g.json").read_text())["fid"])

    before = sorted(os.listdir(tmp_path / "outputs"))
    np.savez(tmp_path / "cifar_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # untagged, as the referee's
    result = sample(tmp_path, "g", *fid, "--run_name", "other", "--fid_ref_stats", tmp_path / "cifar_stats.npz")
    assert result.returncode == 2
    assert ("holds statistics of cifar10 (32×32 colour) (an npz without a 'dataset' entry, like the referee's, is "
            "taken to be CIFAR-10's), but the model was trained on folder (16×16 grayscale)") in result.stderr
    result = sample(tmp_path, "g", *fid, "--run_name", "other", "--data_dir", tiny_data)
    assert result.returncode == 2
    assert (f"--data_dir {tiny_data!r} holds folder: 16×16 colour, 10 classes, but the model was trained on folder: "
            "16×16 grayscale, 2 classes") in result.stderr
    assert sorted(os.listdir(tmp_path / "outputs")) == before  # nothing written by either


def test_a_dataset_that_cannot_be_downloaded_is_one_line_and_leaves_no_folders(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)  # as without internet
    result = run_main("--dataset", "mnist", "--data_dir", "data", "--no_cuda", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("ddpm_main.py: error: MNIST is not in --data_dir 'data' and could not be "
                                    "downloaded (RuntimeError: Error downloading train-images-idx3-ubyte.gz: Tried ")
    assert len(result.stderr.splitlines()) == 1  # torchvision's message spans lines
    assert os.listdir(tmp_path) == []  # data/MNIST/raw, made for the download, removed again


def test_loader_yields_every_image_once_per_epoch_flipped_about_half():
    n = 1000
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256  # make every image identifiable and asymmetric
    images[:, 1, 0, 0] = torch.arange(n) // 256
    images[:, :, :, -1] = 0
    loader = DeviceLoader(images, torch.arange(n), 64, "cpu", seed=3)
    assert len(loader) == 16
    seen, flipped = [], 0
    for x, idx in loader.batches(epoch=1):
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        original = ddpm_pictures.to_model_range(images[idx])
        is_flipped = (x == original.flip(3)).flatten(1).all(1)
        assert (is_flipped | (x == original).flatten(1).all(1)).all()
        flipped += int(is_flipped.sum())
        seen += idx.tolist()
    assert sorted(seen) == list(range(n))
    assert 0.4 * n < flipped < 0.6 * n
    order_2 = torch.cat([idx for _, idx in loader.batches(epoch=2)])
    assert not torch.equal(order_2, torch.tensor(seen))  # a new order every epoch
    resumed = torch.cat([idx for _, idx in loader.batches(epoch=2, start_batch=5)])
    assert torch.equal(resumed, order_2[5 * 64:])  # an epoch can be replayed from any batch


def test_loader_shards_are_disjoint_and_cover_the_epoch():
    images, labels = torch.zeros(103, 3, 2, 2, dtype=torch.uint8), torch.arange(103)
    loaders = [DeviceLoader(images, labels, 8, "cpu", seed=1, rank=r, world_size=3) for r in range(3)]
    shards = [torch.cat([y for _, y in loader.batches(epoch=4)]) for loader in loaders]
    assert [len(s) for s in shards] == [34, 34, 34] and len({len(loader) for loader in loaders}) == 1
    seen = torch.cat(shards)
    assert len(set(seen.tolist())) == 102  # disjoint; 103 % 3 = 1 image waits for the next epoch's order
    order, _ = DeviceLoader(images, labels, 8, "cpu", seed=1).epoch_indices(4)
    assert sorted(seen.tolist()) == sorted(order[:102].tolist())  # exactly the single-process epoch, cut


def test_uint8_cache_is_written_and_reused(tmp_path, monkeypatch):
    root = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=3)
    first = load_dataset(root)
    assert (tmp_path / "d" / ddpm_data.CACHE_NAME).is_file()
    monkeypatch.setattr(ddpm_data, "_decode", lambda path: pytest.fail("decoded again"))
    second = load_dataset(root)
    assert torch.equal(first["train_images"], second["train_images"]) and second["classes"] == first["classes"]
    assert first["train_images"].dtype == torch.uint8 and first["train_images"].shape == (6, 3, 16, 16)


def test_the_epoch_order_takes_any_seed_in_the_generators_range_and_is_unchanged_for_the_rest():
    images, labels = torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long)
    for seed in (2 ** 64 - 1, -2 ** 63):
        order, _ = DeviceLoader(images, labels, 2, "cpu", seed=seed).epoch_indices(3)
        assert sorted(order.tolist()) == list(range(10))
    order, flips = DeviceLoader(images, labels, 2, "cpu", seed=5).epoch_indices(3)
    g = torch.Generator().manual_seed(5 * 1_000_003 + 3)  # the seeding before any seed was allowed
    assert torch.equal(order, torch.randperm(10, generator=g)) and torch.equal(flips, torch.rand(10, generator=g) < 0.5)
