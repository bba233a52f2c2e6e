"""Are the samples copies of the training images? For each sample its nearest training images, in Inception-feature
space and in pixels; the share of samples nearer to a training image than held-out (test) images are, which is how
close an image the model never saw comes by chance; and a picture of the nearest samples beside their nearest
training images (the check of Carlini et al. 2023 and layer6ai-labs/dgm-eval, on a user's own model)."""
import math
from dataclasses import dataclass

import torch

from ddpm_data import evenly_spread
from ddpm_pictures import save_labelled_grid

NEIGHBOURS = 3          # nearest training images found (and shown) for each sample, in each space
HELD_OUT_IMAGES = 1000  # test images, evenly spread over the split, whose distances to the training set set the bar
COPY_QUANTILE = 0.01    # a sample counts as a copy when nearer to a training image than 99 % of held-out images are
PICTURE_ROWS = 8        # the nearest samples in the picture
CHUNK = 8192            # training images compared at a time: memory stays CHUNK × queries distances


def nearest(queries, keys, k=NEIGHBOURS):
    """(distances (Q, k), indices (Q, k)) of each query's k nearest keys (N, D) by Euclidean distance, in float32,
    CHUNK keys at a time."""
    queries, distances, indices = queries.float(), [], []
    for start in range(0, len(keys), CHUNK):
        part = torch.cdist(queries, keys[start:start + CHUNK].float())               # (Q, ≤ CHUNK)
        top = part.topk(min(k, part.shape[1]), dim=1, largest=False)
        distances.append(top.values)
        indices.append(top.indices + start)
    top = torch.cat(distances, 1).topk(min(k, len(keys)), dim=1, largest=False)
    return top.values, torch.cat(indices, 1).gather(1, top.indices)


def pixels(images_uint8):
    """Images (N, C, H, W) uint8 as rows (N, C·H·W) whose Euclidean distance / √(C·H·W) is the RMS difference."""
    return images_uint8.flatten(1)


@dataclass(frozen=True)
class TrainingSet:
    """The training images, their pool features, and how near to them held-out images come."""
    images: torch.Tensor        # (N, C, H, W) uint8
    features: torch.Tensor      # (N, 2048)
    feature_bar: float          # COPY_QUANTILE of held-out images' feature distance to their nearest training image
    pixel_bar: float            # the same in pixels: RMS difference, 0–255 levels
    held_out: int               # how many held-out images set the bars


def training_set(train_images, train_features, test_images, test_features):
    """The TrainingSet, its bars from HELD_OUT_IMAGES test images (all, when the split holds fewer)."""
    chosen = evenly_spread(torch.arange(len(test_images)), HELD_OUT_IMAGES)
    feature_d, _ = nearest(test_features[chosen], train_features, 1)
    pixel_d, _ = nearest(pixels(test_images[chosen]), pixels(train_images), 1)
    side = math.sqrt(pixels(train_images).shape[1])
    return TrainingSet(train_images, train_features, float(feature_d.quantile(COPY_QUANTILE)),
                       float(pixel_d.quantile(COPY_QUANTILE)) / side, len(chosen))


def copy_check(samples_uint8, sample_features, training):
    """metrics_<run>.json's copy entries of samples (N, C, H, W) uint8 and their features (N, 2048), and the picture's
    rows: (sample indices, their nearest training images by features, by pixels), nearest samples first."""
    feature_d, feature_i = nearest(sample_features, training.features)
    pixel_d, pixel_i = nearest(pixels(samples_uint8), pixels(training.images))
    pixel_d = pixel_d / math.sqrt(pixels(samples_uint8).shape[1])
    order = feature_d[:, 0].argsort()[:PICTURE_ROWS]
    entries = {"copy_share": float((feature_d[:, 0] < training.feature_bar).float().mean()),
               "copy_share_pixels": float((pixel_d[:, 0] < training.pixel_bar).float().mean()),
               "copy_bar": training.feature_bar, "copy_bar_pixels": training.pixel_bar,
               "nearest_distance_median": float(feature_d[:, 0].median()),
               "nearest_distance_median_pixels": float(pixel_d[:, 0].median())}
    return entries, (order, feature_i[order], pixel_i[order], feature_d[order, 0], pixel_d[order, 0])


def copy_protocol(training):
    """How copy_check reads its figures, for the JSON."""
    return {"copy_held_out_images": training.held_out, "copy_quantile": COPY_QUANTILE,
            "copy_training_images": len(training.images), "copy_neighbours": NEIGHBOURS}


def write_nearest_picture(samples_uint8, training, rows, path):
    """The nearest samples (a row each, their feature and pixel distances beside) with their NEIGHBOURS nearest
    training images by features, then by pixels."""
    order, by_features, by_pixels, feature_d, pixel_d = rows
    to_range = lambda images: images.float() / 127.5 - 1                            # uint8 → [−1, 1]
    images = torch.cat([to_range(samples_uint8[order]).unsqueeze(1), to_range(training.images[by_features]),
                        to_range(training.images[by_pixels])], 1)                     # (rows, 1 + 2k, C, H, W)
    labels = [f"{f:.1f} | {p:.0f}" for f, p in zip(feature_d.tolist(), pixel_d.tolist())]
    columns = ["sample", *(f"features {j + 1}" for j in range(by_features.shape[1])),
               *(f"pixels {j + 1}" for j in range(by_pixels.shape[1]))]
    save_labelled_grid(images.flatten(0, 1), path, labels, columns,
                       title=f"nearest training images; a copy is nearer than {training.feature_bar:.1f} (features) "
                             f"| {training.pixel_bar:.0f} (pixels)")
