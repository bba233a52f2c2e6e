"""Sampling a trained model, and what it writes: a `Sampler` (the diffusion, the network and how to sample them),
samples at the data's size, the class list of class-guided samples, the sample files inference writes (grid, PNGs,
npz), the guidance sweep, and the FID of a model's samples.

Training (its per-epoch grids and final FID, ddpm_run.py) and inference (ddpm_main.py) both sample through these.
"""
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_checkpoint import build_diffusion, trained_data
from ddpm_data import crop_to_data
from ddpm_diffusion import Diffusion, SamplerSettings, generate, guidance_sweep
from ddpm_fid import frechet_distance, reference_statistics
from ddpm_helpers import (Denoiser, UserError, atomic_open, choose_compile, choose_precision, describe_precision,
                          save_grid, save_individual_pngs, save_labelled_grid, stderr_is_terminal, to_uint8)

MAX_CLASS_ROWS = 16  # with more classes, grids show one image per class (or, sweeps, the first this many)


@dataclass(eq=False)
class Sampler:
    """A trained model ready to sample: its diffusion process, its network and how to sample them."""
    diffusion: Diffusion
    denoiser: Denoiser         # the network (EMA weights), under the run's precision and compilation
    settings: SamplerSettings  # sampler, steps, guidance
    config: dict               # the checkpoint's config: the image size, channels, classes and data
    batch_size: int = 1000     # images per forward batch (--sample_batch)

    @property
    def device(self):
        return self.diffusion.betas.device

    def sample(self, num_images, class_labels=None, seed=None, progress=False):
        """num_images samples (generate), cut back to the data's size when the model works on padded images:
        (num_images, C, H, W) in [−1, 1] on the CPU. class_labels (num_images,) or None: unconditional."""
        images = generate(self.diffusion, self.denoiser, self.settings, num_images, self.config["image_size"],
                          self.config["model"]["channels"], class_labels, self.batch_size, seed, progress)
        return self.to_data_size(images)

    def to_data_size(self, images):
        """Images of the model's side (N, C, S, S) cut back to the data's size (N, C, H, W)."""
        return crop_to_data(images, trained_data(self.config)["data_size"])


def parse_classes(text):
    """--sample_classes as a list of its items (class indices or names), checked against the checkpoint's classes by
    class_indices."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise UserError("--sample_classes is empty: give class indices or names such as 0,1,2 or cat,dog")
    return items


def class_indices(items, classes):
    """The class index of each --sample_classes item: one of the model's class names, else an index 0 … K−1 (a class
    named by a number is taken by its name)."""
    indices = []
    for item in items:
        if item in classes:
            indices.append(classes.index(item))
        elif item.lstrip("-").isdigit() and 0 <= int(item) < len(classes):
            indices.append(int(item))
        else:
            names = ", ".join(classes[:12]) + (", …" if len(classes) > 12 else "")
            raise UserError(f"--sample_classes: {item!r} is neither a class index 0-{len(classes) - 1} nor a class "
                            f"name of this model ({names})")
    return indices


def class_cycle(classes, n, device):
    """The given class indices repeated to length n, as a LongTensor (n,)."""
    return torch.tensor(classes, dtype=torch.long).repeat(math.ceil(n / len(classes)))[:n].to(device)


def prepare_sampler(model, config, settings, device, precision, compile, batch_size, verbose):
    """A checkpoint's network (on the CPU) as a Sampler on the device, at the precision (--precision) and compilation
    (--compile) chosen for it; says how it samples when verbose."""
    precision, precision_why = choose_precision(precision, device)
    model = model.to(device, memory_format=torch.channels_last).eval()
    denoiser = Denoiser(model, choose_compile(compile, device), precision)
    if verbose:
        print(f"sampling on {device} in {describe_precision(precision)} ({precision_why}"
              f"{', compiled' if denoiser.compiled else ''}): {settings.describe()}", flush=True)
    return Sampler(build_diffusion(config, device), denoiser, settings, config, batch_size)


def save_samples(sampler, images, labels, files, columns, seconds, verbose):
    """The sampler's images as samples_<run>.png (columns: a column per class when given and at most MAX_CLASS_ROWS,
    else a square), one PNG per image (named by its class when labels are given) and the uint8 npz; files: the run's
    RunFiles. When verbose, says where they went and that they took `seconds`."""
    os.makedirs(files.save_dir, exist_ok=True)
    nrow = min(columns, len(images)) if columns is not None and columns <= MAX_CLASS_ROWS else \
        math.ceil(math.sqrt(len(images)))
    save_grid(images, files.output("samples_grid"), nrow)
    save_individual_pngs(images, files.output("samples_folder"), labels, sampler.config.get("classes"))
    with atomic_open(files.output("samples_npz")) as f:
        np.savez(f, images=to_uint8(images))
    if verbose:
        print(f"{len(images)} samples in {seconds:.1f} s on {sampler.device}: grid {files.output('samples_grid')}, "
              f"PNGs in {files.output('samples_folder')}/", flush=True)


def write_guidance_sweep(sampler, scales, classes, seed, files, verbose):
    """guidance_sweep_<run>.png, one labelled grid: a row per guidance scale, a column per class (indices; None: the
    model's first MAX_CLASS_ROWS), every row from the same noise."""
    config = sampler.config
    classes = classes or list(range(min(config["num_classes"], MAX_CLASS_ROWS)))
    images = sampler.to_data_size(guidance_sweep(sampler.diffusion, sampler.denoiser, sampler.settings, scales,
                                                 classes, config["image_size"], config["model"]["channels"], seed))
    os.makedirs(files.save_dir, exist_ok=True)
    path = files.output("guidance_sweep")
    save_labelled_grid(images, path, [f"w = {w:g}" for w in scales], [config["classes"][c] for c in classes])
    if verbose:
        print(f"guidance sweep ({len(scales)} scales × {len(classes)} classes): {path}", flush=True)


def grayscale_fid_note(config, verbose):
    """Says, for a model of grayscale images, that FID repeats them into the network's three colour channels."""
    if trained_data(config)["channels"] == 1 and verbose:
        print("FID: the grayscale images are repeated into the Inception network's three colour channels", flush=True)


def fid_reference(features, config, train_images_uint8, data_dir, dataset, verbose):
    """The reference statistics (mu, sigma) FID compares a model's samples with, when no --fid_ref_stats are given:
    those of the training images (train_images_uint8 (N, C, H, W), or those at data_dir, a `dataset`, when None),
    which must be the data the model was trained on (UserError). features: the FIDFeatures."""
    return reference_statistics(features, data_dir, dataset, trained_data(config), train_images_uint8,
                                progress=verbose and stderr_is_terminal())


def measure_fid(sampler, num_samples, seed, features, reference, samples_path, verbose):
    """FID of num_samples new samples (class-balanced when the model is conditional) against the reference statistics
    (fid_reference). The samples are saved at samples_path (fid_samples_<run>.npz), so any other FID tool can read
    the very same images."""
    if num_samples < 10000:
        print(f"warning: FID from {num_samples} < 10,000 samples reads high; use 10,000 or more to compare with "
              "published figures", file=sys.stderr)
    config = sampler.config
    labels = (torch.arange(num_samples, device=sampler.device) % config["num_classes"] if config["conditional"]
              else None)
    images = to_uint8(sampler.sample(num_samples, labels, seed, verbose and stderr_is_terminal()))
    with atomic_open(samples_path) as f:
        np.savez(f, images=images)
    fid = frechet_distance(*features.statistics(images), *reference)
    if verbose:
        print(f"FID {fid:.3f} (n={num_samples}, {sampler.settings.describe()})", flush=True)
    return fid
