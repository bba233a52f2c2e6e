"""The copy check (ddpm_memorisation) on constructed images and features, never the network: nearest neighbours
equal a brute-force search, an injected copy of a training image is found and shown first, the bars come from the
held-out images."""
import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_memorisation
from ddpm_memorisation import COPY_QUANTILE, copy_check, nearest, training_set, write_nearest_picture


def images(seed, count, side=8):
    """Random uint8 images (count, 3, side, side)."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, 3, side, side), dtype=np.uint8))


def features_of(images_uint8):
    """Constructed 'features': a fixed random projection of the pixels (no network)."""
    projection = torch.from_numpy(np.random.default_rng(7).normal(size=(images_uint8[0].numel(), 32)))
    return (images_uint8.flatten(1).double() / 255 @ projection).float()


def test_nearest_in_chunks_equals_a_brute_force_search(monkeypatch):
    monkeypatch.setattr(ddpm_memorisation, "CHUNK", 7)  # 50 keys in 8 chunks, the last short
    rng = np.random.default_rng(0)
    queries, keys = (torch.from_numpy(rng.normal(size=shape).astype(np.float32)) for shape in ((12, 5), (50, 5)))
    distances, indices = nearest(queries, keys, k=3)
    expected = torch.cdist(queries, keys).topk(3, dim=1, largest=False)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(distances, expected.values)


def test_an_injected_copy_of_a_training_image_is_found_and_shown_first(tmp_path):
    train, test, samples = images(0, 500), images(1, 200), images(2, 100)
    samples[37] = train[123]                                   # one sample is a training image
    training = training_set(train, features_of(train), test, features_of(test))
    assert training.held_out == 200
    held_out_d, _ = nearest(features_of(test), features_of(train), 1)
    assert training.feature_bar == pytest.approx(float(held_out_d.quantile(COPY_QUANTILE)))

    entries, rows = copy_check(samples, features_of(samples), training)
    order, by_features, by_pixels, feature_d, pixel_d = rows
    assert order[0] == 37 and by_features[0, 0] == by_pixels[0, 0] == 123  # the copy first, beside its original
    assert feature_d[0] < 1e-3 < training.feature_bar and pixel_d[0] < 1e-3 < training.pixel_bar  # counted
    # the copy and, by chance, about COPY_QUANTILE of the others (as near as the nearest 1 % of held-out images)
    assert 1 / 100 <= entries["copy_share"] <= 5 / 100 and 1 / 100 <= entries["copy_share_pixels"] <= 5 / 100
    assert entries["copy_bar"] == training.feature_bar and entries["copy_bar_pixels"] == training.pixel_bar

    path = tmp_path / "nearest.png"
    write_nearest_picture(samples, training, rows, path)
    assert Image.open(path).size[0] > 7 * 8                     # the sample and 2 × 3 training images a row


def test_samples_of_the_held_out_distribution_are_not_copies():
    train, test, samples = images(0, 500), images(1, 1000), images(2, 400)
    entries, _ = copy_check(samples, features_of(samples), training_set(train, features_of(train), test,
                                                                        features_of(test)))
    assert entries["copy_share"] < 0.05 and entries["copy_share_pixels"] < 0.05  # about COPY_QUANTILE
