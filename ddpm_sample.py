"""Sampling a trained model, and what it writes: how a job samples (the one resolver of SamplerSettings), a `Sampler`
(the diffusion, the network and how to sample them), batched generation, the class list of class-guided samples, the
files inference writes (grid, PNGs, npz), the guidance sweep and the denoising strip; what measures a model: the FID
of its samples and the variational bound of test images in bits/dim; and the jobs of --inference made of these.

Training (its per-epoch grids and final FID, ddpm_train.py) and inference (ddpm_main.py) both sample through these.
"""
import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm_config import SAMPLING_FLAGS, build_diffusion
from ddpm_data import (crop_to_data, data_facts, evenly_spread, load_dataset, pad_to_side, require_trained_data,
                       trained_data)
from ddpm_diffusion import SAMPLERS, Diffusion, SamplerSettings, samplers_where
from ddpm_fid import (IS_SPLITS, InceptionFeatures, Reference, evaluation_data, inception_score, metrics_protocol,
                      ref_statistics_file, sample_metrics, split_reference, torch_fidelity_version)
from ddpm_helpers import UserError, atomic_open, require_finite, stderr_is_terminal, write_json
from ddpm_memorisation import COPY_QUANTILE, copy_check, copy_protocol, training_set, write_nearest_picture
from ddpm_pictures import (GRID_PER_CLASS, GRID_UNCONDITIONAL, MAX_CLASS_ROWS, STRIP_COLUMNS, STRIP_ROWS,
                           plot_bound_terms,
                           save_grid, save_individual_pngs, save_labelled_grid, to_model_range, to_uint8)
from ddpm_runtime import Denoiser, choose_compile, choose_precision, describe_precision, memory_guard

PAPER_SAMPLES = 50_000  # the samples of Ho et al.'s FID and IS (Table 1)
SAMPLE_REMEDY = "lower --sample_batch"
OPTIONS = {option for kind in SAMPLERS.values() for option in kind.options}  # what only some samplers take


def sampler_settings(asked, saved, timesteps, own=None, given=()):
    """How a job samples a T-step model, the one resolver of SamplerSettings: the job's `own` sampler (steps at most
    T), else the checkpoint's `saved` settings (None: the defaults), the flags `asked` over them. A switched sampler
    starts from its own defaults; another sampler's option is refused when its flag is `given`."""
    base, own = saved or SamplerSettings(), dict(own or {})
    if own:
        steps = own.pop("steps", None)
        base = dataclasses.replace(switched(base, own.pop("sampler")), **own, steps=steps and min(steps, timesteps))
    elif asked.get("sampler", base.sampler) != base.sampler:
        base = switched(base, asked["sampler"])
    if asked.keys() & {"steps", "spacing", "timesteps"}:  # steps asked for replace the checkpoint's own
        base = dataclasses.replace(base, timesteps=None, steps=None if "timesteps" in asked else base.steps)
    flags, sampler = {field: flag for flag, field in SAMPLING_FLAGS.items()}, asked.get("sampler", base.sampler)
    kind = SAMPLERS[sampler]
    if kind.every_step and "steps" in asked:
        takers = samplers_where(lambda other: not other.every_step)
        raise UserError(f"--sampling_steps applies to --sampler {takers} ({sampler} always runs all T steps)")
    for option in sorted(OPTIONS - set(kind.options)):
        if flags[option] in given:
            takers = samplers_where(lambda other: option in other.options)
            raise UserError(f"--{flags[option]} applies to --sampler {takers} (the sampler here is {sampler})")
    try:
        return dataclasses.replace(base, **asked).for_timesteps(timesteps)
    except ValueError as e:  # timesteps not as the model's T needs them, or steps > T (the flags refuse steps < 1)
        raise UserError(f"--sampling_timesteps: {e}" if "timesteps" in asked else
                        f"--sampling_steps {asked.get('steps', base.steps)} is more than the model's T = {timesteps}") \
            from None


def switched(settings, sampler):
    """`sampler` at its own defaults, with the guidance (scale and interval) and variance of `settings`."""
    return SamplerSettings(sampler, guidance_scale=settings.guidance_scale,
                           guidance_interval=settings.guidance_interval, variance=settings.variance)


def describe_sampling(settings, guided=True):
    """SamplerSettings as banners and metrics say them, e.g. 'dpm++2m, 15 steps (lambda spacing), guidance 1.5' or
    'dpm++3m, 3 steps at t = 999, 420, 0, guidance 3.0'."""
    options = SAMPLERS[settings.sampler].options
    steps = f"{settings.steps or 'default'} steps"
    if settings.timesteps is not None:
        steps += f" at t = {', '.join(map(str, settings.timesteps))}"
    elif "spacing" in options:
        steps += f" ({settings.spacing} spacing)"
    noise = f", eta {settings.eta}" if "eta" in options else ""
    noise += ", σ_t² = β_t" if "variance" in options and settings.variance == "beta" else ""
    interval = (f" for σ in ({settings.guidance_interval[0]:g}, {settings.guidance_interval[1]:g}]"
                if settings.guidance_interval is not None else "")
    guidance = f", guidance {settings.guidance_scale}{interval}" if guided else ""
    return f"{settings.sampler}, {steps}{noise}{guidance}"


def asked_sampling(options):
    """The sampling flags the command line sets (a preset's included), by SamplerSettings field."""
    return {field: getattr(options, flag) for flag, field in SAMPLING_FLAGS.items()
            if getattr(options, flag) is not None}


@contextlib.contextmanager
def seeded_rng(seed, device):
    """Draw from `seed` inside the block, leaving the caller's RNG state (training's) untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate(diffusion, denoiser, settings, num_images, image_size, channels=3, class_labels=None,
             batch_size=1000, seed=None, progress=False):
    """num_images samples (N, C, S, S) in [−1, 1] on the CPU, batch_size at a time; with a seed, the caller's RNG
    is left as it was. A batch that runs out of device memory is retried at half the size, with one warning."""
    device = diffusion.betas.device
    chunks, done, warned = [], 0, False
    with seeded_rng(seed, device) if seed is not None else contextlib.nullcontext(), \
            tqdm(total=num_images, desc="sampling", unit="img", disable=not progress, leave=False) as bar:
        while done < num_images:
            n = min(batch_size, num_images - done)
            labels = None if class_labels is None else class_labels[done:done + n]
            try:
                chunks.append(diffusion.sample(denoiser, (n, channels, image_size, image_size), settings, labels,
                                               progress=progress).cpu())
            except torch.OutOfMemoryError:
                if n == 1:
                    raise
                batch_size = n // 2
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if not warned:
                    print(f"warning: out of memory sampling {n} images at a time; going on with {batch_size} "
                          "(halved again if need be; a smaller --sample_batch avoids the retry)", file=sys.stderr)
                    warned = True
                continue
            done += n
            bar.update(n)
    return torch.cat(chunks)


def guidance_sweep(diffusion, denoiser, settings, scales, classes, image_size, channels, seed):
    """A row per guidance scale, a column per class, every row from the same noise: (rows · columns, C, H, W)."""
    labels = torch.tensor(classes, device=diffusion.betas.device)
    return torch.cat([generate(diffusion, denoiser, dataclasses.replace(settings, guidance_scale=w), len(classes),
                               image_size, channels, labels, batch_size=len(classes), seed=seed) for w in scales])


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
        """num_images samples (N, C, H, W) in [−1, 1] on the CPU, cut back to the data's size; class_labels or None."""
        images = generate(self.diffusion, self.denoiser, self.settings, num_images, self.config["image_size"],
                          self.config["model"]["channels"], class_labels, self.batch_size, seed, progress)
        return self.to_data_size(images)

    def to_data_size(self, images):
        """Images of the model's side (N, C, S, S) cut back to the data's size (N, C, H, W)."""
        return crop_to_data(images, trained_data(self.config)["data_size"])


def class_indices(items, classes):
    """The class index of each --sample_classes item: a class name of the model, else an index 0 … K−1."""
    indices = []
    for item in items:
        if item in classes:
            indices.append(classes.index(item))
        elif re.fullmatch(r"[0-9]{1,9}", item) and int(item) < len(classes):  # ASCII digits: int() takes others
            indices.append(int(item))
        else:
            names = ", ".join(classes[:12]) + (", …" if len(classes) > 12 else "")
            raise UserError(f"--sample_classes: {item!r} is neither a class index 0-{len(classes) - 1} nor a class "
                            f"name of this model ({names})")
    return indices


def class_cycle(classes, n, device):
    """The given class indices repeated to length n, as a LongTensor (n,)."""
    return torch.tensor(classes, dtype=torch.long).repeat(math.ceil(n / len(classes)))[:n].to(device)


def prepare_sampler(model, config, settings, device, precision, compile, batch_size, verbose, job):
    """A checkpoint's network as a Sampler on the device at the precision and compilation chosen for it; when
    verbose, says so: job = (what it does, its settings)."""
    precision, precision_why = choose_precision(precision, device)
    model = model.to(device, memory_format=torch.channels_last).eval()
    denoiser = Denoiser(model, choose_compile(compile, device), precision)
    if verbose:
        print(f"{job[0]} on {device} in {describe_precision(precision)} ({precision_why}"
              f"{', compiled' if denoiser.compiled else ''}): {job[1]}", flush=True)
    return Sampler(build_diffusion(config, device), denoiser, settings, config, batch_size)


def save_samples(sampler, images, labels, files, columns, seconds, verbose):
    """samples_<run>.png (a column per class, else a square), a PNG per image and the uint8 npz."""
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
    """guidance_sweep_<run>.png: a row per guidance scale, a column per class (None: the first MAX_CLASS_ROWS)."""
    config = sampler.config
    classes = classes or list(range(min(config["num_classes"], MAX_CLASS_ROWS)))
    images = sampler.to_data_size(guidance_sweep(sampler.diffusion, sampler.denoiser, sampler.settings, scales,
                                                 classes, config["image_size"], config["model"]["channels"], seed))
    os.makedirs(files.save_dir, exist_ok=True)
    path = files.output("guidance_sweep")
    interval = sampler.settings.guidance_interval
    save_labelled_grid(images, path, [f"w = {w:g}" for w in scales], [config["classes"][c] for c in classes],
                       f"w applied for σ in ({interval[0]:g}, {interval[1]:g}], conditional elsewhere" if interval
                       else None)
    if verbose:
        print(f"guidance sweep ({len(scales)} scales × {len(classes)} classes): {path}", flush=True)


@torch.no_grad()
def write_denoising_strip(sampler, rows, classes, seed, files, verbose):
    """denoising_strip_<run>.png: a row per sample, x̂_0 as the network predicts it at STRIP_COLUMNS evenly
    spaced evaluations, x_T (left) to the sample (right), each column labelled with the paper's t."""
    diffusion, config = sampler.diffusion, sampler.config
    labels = class_cycle(classes, rows, sampler.device) if classes else None
    side, trace = config["image_size"], []
    with seeded_rng(seed, sampler.device):
        final = diffusion.sample(sampler.denoiser, (rows, config["model"]["channels"], side, side), sampler.settings,
                                 labels, trace=trace)
    trace[-1] = final                                                   # the sample, as every sampler returns it
    picks = torch.linspace(0, len(trace) - 1, min(STRIP_COLUMNS, len(trace))).round().long().tolist()
    images = torch.stack([trace[i].float().clamp(-1, 1).cpu() for i in picks], 1)  # (rows, columns, C, side, side)
    steps = diffusion.sampler_timesteps(sampler.settings)
    row_labels = [config["classes"][c] for c in labels.tolist()] if labels is not None else [""] * rows
    os.makedirs(files.save_dir, exist_ok=True)
    path = files.output("denoising_strip")
    save_labelled_grid(sampler.to_data_size(images.flatten(0, 1)), path, row_labels,
                       [f"t = {steps[i] + 1}" if i + 1 < len(trace) else "x_0" for i in picks])
    if verbose:
        print(f"denoising strip ({rows} samples, x̂_0 at {len(picks)} of {len(trace)} steps, "
              f"{describe_sampling(sampler.settings, guided=classes is not None)}): {path}", flush=True)


def grayscale_fid_note(config, verbose):
    """Says, for a model of grayscale images, that FID repeats them into the network's three colour channels."""
    if trained_data(config)["channels"] == 1 and verbose:
        print("FID: the grayscale images are repeated into the Inception network's three colour channels", flush=True)


def fid_reference(features, config, data, data_dir, split, stats_file, verbose):
    """What --eval_fid compares samples with, from the model's data (load_dataset's dict, at data_dir): the Reference
    (the `split`'s statistics, or stats_file's Reference of --fid_ref_stats; the split's features, train's with
    --fid_ref_stats) and the TrainingSet of the copy check (test images held out)."""
    facts, progress = trained_data(config), verbose and stderr_is_terminal()
    splits = {name: split_reference(features, data[f"{name}_images"], name, data_dir, facts, progress)
              for name in ("train", "test")}
    training = training_set(data["train_images"], splits["train"][2], data["test_images"], splits["test"][2])
    split = "train" if stats_file else split
    mu, sigma, split_features = splits[split]
    source = f"the {split} split at {data_dir}"
    stats = stats_file or Reference(mu, sigma, source, len(data[f"{split}_images"]))
    return dataclasses.replace(stats, features=split_features, features_source=source), training


def balanced_labels(config, num_samples, device):
    """Class labels 0, 1, …, K − 1, 0, … of num_samples images of a conditional model (None: unconditional)."""
    return torch.arange(num_samples, device=device) % config["num_classes"] if config["conditional"] else None


def measure_inception_metrics(sampler, num_samples, seed, features, reference, training, files, verbose):
    """FID (with where a second draw lands), KID, precision/recall, IS and the copy check of num_samples new samples
    (class-balanced when conditional) from one Inception pass; the samples saved as fid_samples_<run>.npz, the nearest
    beside their training images as nearest_training_<run>.png; returns metrics_<run>.json's entries."""
    if num_samples < PAPER_SAMPLES:
        print(f"warning: FID from {num_samples:,} samples reads high against published figures, which use "
              f"{PAPER_SAMPLES:,} (Ho et al. 2020; some use 10,000): compare FIDs of equal sample counts",
              file=sys.stderr)
    config, settings = sampler.config, sampler.settings
    labels = balanced_labels(config, num_samples, sampler.device)
    images = to_uint8(sampler.sample(num_samples, labels, seed, verbose and stderr_is_terminal()))  # (N, H, W, C)
    with atomic_open(files.output("fid_samples")) as f:
        np.savez(f, images=images)
    sample_features, logits = features.pool_features(images, progress=verbose and stderr_is_terminal(),
                                                     keep_logits=True)
    measured = sample_metrics(sample_features, reference, seed)
    score, score_std = inception_score(logits) if features.has_classifier else (None, None)
    images = torch.from_numpy(images).permute(0, 3, 1, 2)                              # (N, C, H, W) uint8
    copies, nearest_rows = copy_check(images, sample_features, training)
    write_nearest_picture(images, training, nearest_rows, files.output("nearest"))
    protocol = {"samples": num_samples, "class_balanced": labels is not None, "seed": seed,
                "sampler": describe_sampling(settings), "reference": reference.source,
                "reference_images": reference.images,
                "network_sha256": features.fingerprint, "official_network": features.official,
                "is_splits": IS_SPLITS, **metrics_protocol(num_samples, reference), **copy_protocol(training),
                "torch_fidelity": torch_fidelity_version()}
    measured = {**measured, "inception_score": score, "inception_score_std": score_std, **copies}
    if verbose:
        print_inception_metrics(measured, protocol, features, files.output("nearest"))
    return {**measured, "fid_samples": num_samples, "fid_sampler": describe_sampling(settings),
            "fid_protocol": protocol}


def print_inception_metrics(measured, protocol, features, picture):
    """The metrics' lines: the figures, the copy check, and the protocol they were read under."""
    figure = lambda name, form: "n/a" if measured[name] is None else format(measured[name], form)
    is_text = (f", IS {measured['inception_score']:.3f} ± {measured['inception_score_std']:.3f}"
               if measured["inception_score"] is not None else
               " (no IS: the network file's classifier layer is not finite)")
    n, images = protocol["samples"], protocol["reference_images"]
    print(f"FID {measured['fid']:.3f} ± {measured['fid_second_draw']:.2f} (where a second draw of {n:,} lands, "
          f"95 %), KID {figure('kid', '.5f')} ± {figure('kid_std', '.5f')}, precision {figure('prc_precision', '.3f')}, "
          f"recall {figure('prc_recall', '.3f')}{is_text}\n"
          f"  copies: {measured['copy_share']:.1%} of the samples are nearer to a training image than "
          f"{1 - COPY_QUANTILE:.0%} of {protocol['copy_held_out_images']:,} test images are "
          f"(pixels: {measured['copy_share_pixels']:.1%}); the nearest beside their training images: {picture}\n"
          f"  from {n:,}{' class-balanced' if protocol['class_balanced'] else ''} samples (seed {protocol['seed']}, "
          f"{protocol['sampler']}) against {protocol['reference']}{f' ({images:,} images)' if images else ''}; "
          f"Inception weights {features.fingerprint[:8]}… ({'the' if features.official else 'not the'} official "
          "file)", flush=True)


def spread(images, labels, count):
    """`count` of the images (and labels, or None), evenly spaced over the split; all, with a note, when fewer."""
    if count > len(images):
        print(f"note: --eval_nll {count}: the test split holds {len(images)} images; using all of them",
              file=sys.stderr)
    chosen = evenly_spread(torch.arange(len(images)), count)
    return images[chosen], None if labels is None else labels[chosen]


def test_split(config, data_dir, dataset, flag):
    """The test split (images (N, C, H, W) uint8, labels) of the data at data_dir, which must be the model's."""
    data = load_dataset(data_dir, dataset)
    require_trained_data(config, data_facts(data), data_dir, flag)
    return data["test_images"], data["test_labels"]


def measure_nll(sampler, images_uint8, labels, variance, seed, files, verbose):
    """The variational bound (eq. 5) of test images (N, C, H, W uint8) in bits/dim with σ_t² `variance` (None: the
    sampler's), with labels or the null label: nll_<run>.json and nll_terms_<run>.png. T evaluations an image."""
    diffusion, config, n = sampler.diffusion, sampler.config, len(images_uint8)
    variance = variance or sampler.settings.variance  # None: the σ_t² the sampler draws with
    x = pad_to_side(to_model_range(images_uint8), config["image_size"])  # (N, C, side, side) in [−1, 1]
    terms, priors, start = [], [], time.perf_counter()
    with seeded_rng(seed, sampler.device), tqdm(total=n * diffusion.timesteps, desc="bits/dim", unit="eval",
                                                leave=False, disable=not (verbose and stderr_is_terminal())) as bar:
        for first in range(0, n, sampler.batch_size):
            batch = slice(first, first + sampler.batch_size)
            batch_terms, prior = diffusion.bound_terms(sampler.denoiser, x[batch].to(sampler.device),
                                                       None if labels is None else labels[batch].to(sampler.device),
                                                       variance, bar=bar)
            terms.append(batch_terms.cpu())
            priors.append(prior.cpu())
    seconds = time.perf_counter() - start
    terms, prior = torch.cat(terms), torch.cat(priors)                     # (N, T), (N,)
    os.makedirs(files.save_dir, exist_ok=True)
    total = terms.sum(1) + prior                                           # (N,)
    result = {"bits_per_dim": total.mean().item(), "std_error": (total.std() / math.sqrt(n)).item() if n > 1 else None,
              "images": n, "labels": nll_labels_text(config, labels), "variance": variance, "clip_denoised": True,
              "prior_L_T": prior.mean().item(), "decoder_L_0": terms[:, 0].mean().item(),
              "terms_L_t": terms.mean(0).tolist(), "seconds": seconds, "seconds_per_image": seconds / n,
              "network_evaluations_per_image": diffusion.timesteps, "device": str(sampler.device),
              "precision": sampler.denoiser.precision, "run_name": files.run_name}
    write_json(result, files.output("nll"))
    plot_bound_terms(result["terms_L_t"], result["prior_L_T"], result["bits_per_dim"], files.output("nll_plot"),
                     files.run_name)
    if verbose:
        error = f" ± {result['std_error']:.4f} (standard error)" if n > 1 else ""
        print(f"bits/dim {result['bits_per_dim']:.4f}{error} on {n} test images ({result['labels']}, σ_t² "
              f"{'β̃_t' if variance == 'posterior' else 'β_t'}): L_T {result['prior_L_T']:.2g}, L_0 "
              f"{result['decoder_L_0']:.4f}; {seconds / n:.2f} s per image ({diffusion.timesteps} network evaluations) "
              f"on {sampler.device}: {files.output('nll')}, plot {files.output('nll_plot')}", flush=True)
    return result


def nll_labels_text(config, labels):
    """How the bound was conditioned, for people."""
    if not config["conditional"]:
        return "unconditional model"
    return "conditioned on each image's class label" if labels is not None else "null label (unconditional)"


def whole_rows(classes):
    """The default --num_samples: GRID_PER_CLASS rows of a column per class, else GRID_UNCONDITIONAL."""
    if classes is None:
        return GRID_UNCONDITIONAL
    return len(classes) * GRID_PER_CLASS if len(classes) <= MAX_CLASS_ROWS else len(classes)


# ------------------------------------------------------------------------------ the jobs of --inference
# Each takes the command line's options, the Sampler of --model_path, the run's RunFiles and --sample_classes as the
# model's class indices (None: not given); ddpm_main.inference prepares them (ddpm_jobs.JOBS names these).

def sample_job(options, sampler, files, classes):
    """--inference: --num_samples images, class-guided with --conditional; a grid, a PNG each and an npz."""
    write_samples(options, sampler, files, guided_classes(options, sampler.config, classes))


def write_samples(options, sampler, files, classes):
    """--num_samples images (default: whole rows) of `classes` (class indices cycled; None: unconditional)."""
    num_samples = options.num_samples or whole_rows(classes)
    labels = class_cycle(classes, num_samples, sampler.device) if classes else None
    start = time.perf_counter()
    with memory_guard(f"sampling {num_samples} images", SAMPLE_REMEDY):
        images = sampler.sample(num_samples, labels, progress=not options.quiet and stderr_is_terminal())
    require_finite(images, "the samples")
    save_samples(sampler, images, labels, files, len(classes) if classes else None, time.perf_counter() - start,
                 not options.quiet)


def guided_classes(options, config, classes):
    """The classes samples are guided by: --sample_classes, else all the model's, with --conditional; else None."""
    return (classes or list(range(config["num_classes"]))) if options.conditional else None


def samples_keep(options, config, settings):
    """What sampling, FID and the bound hold (Job.keeps): the samples asked for (whole rows by default) and FID's."""
    return (options.num_samples or whole_rows(config["classes"] if options.conditional else None)) + options.eval_fid, \
        "--num_samples or --eval_fid"


def sweep_keep(options, config, settings):
    """What a sweep holds (Job.keeps): a row of at most MAX_CLASS_ROWS images per guidance scale."""
    return len(options.guidance_sweep) * MAX_CLASS_ROWS, "--guidance_sweep"


def strip_keep(options, config, settings):
    """What a strip holds (Job.keeps): each sample's x̂_0 at every step, before the columns are picked."""
    return (options.num_samples or STRIP_ROWS) * (settings.for_timesteps(config["timesteps"]).steps + 1), \
        "--num_samples"


def sweep_job(options, sampler, files, classes):
    """--guidance_sweep W,...: one grid, a row per guidance scale (write_guidance_sweep)."""
    write_guidance_sweep(sampler, options.guidance_sweep, classes, options.seed, files, not options.quiet)


def strip_job(options, sampler, files, classes):
    """--denoising_strip: x̂_0 as the sampler goes, a row per sample (--num_samples, else STRIP_ROWS)."""
    write_denoising_strip(sampler, options.num_samples or STRIP_ROWS, guided_classes(options, sampler.config, classes),
                          options.seed, files, not options.quiet)


def bound_job(options, sampler, files, classes):
    """--eval_nll N: the bound of N test images of the model's data (each image's class with --conditional)."""
    config = sampler.config
    images, labels = test_split(config, options.data_dir or config["data_dir"], options.dataset, "--eval_nll")
    images, labels = spread(images, labels if options.conditional else None, options.eval_nll)
    measure_nll(sampler, images, labels, bound_variance(options, sampler.settings), options.seed, files,
                not options.quiet)


def bound_variance(options, settings):
    """σ_t² of the bound: --nll_variance, else the sampler's."""
    return options.nll_variance or settings.variance


def bound_banner(options, settings, config):
    return f"all {config['timesteps']} steps of p_θ, σ_t² {bound_variance(options, settings)}"


def fid_job(options, sampler, files, classes):
    """--eval_fid N: FID, KID, precision/recall, IS and the copy check of N class-balanced samples against the
    reference, made first; with --num_samples, those samples too."""
    start = time.perf_counter()
    features, reference, training = inference_fid_reference(options, sampler)
    reference_s = time.perf_counter() - start
    if "num_samples" in options.given:
        write_samples(options, sampler, files, guided_classes(options, sampler.config, classes))
    start = time.perf_counter()
    os.makedirs(files.save_dir, exist_ok=True)
    measured = measure_inception_metrics(sampler, options.eval_fid, options.seed, features, reference, training,
                                         files, not options.quiet)
    write_json({"run_name": files.run_name, "model_path": options.model_path, **measured,
                "conditional": options.conditional, "fid_s": reference_s + time.perf_counter() - start,
                "device": str(sampler.device), "precision": sampler.denoiser.precision}, files.output("metrics"))


def inference_fid_reference(options, sampler):
    """--eval_fid's network (fetched on first use), Reference (--fid_ref_stats's statistics, else the model's data's)
    and TrainingSet."""
    config, verbose = sampler.config, not options.quiet
    features = InceptionFeatures(options.fid_inception, sampler.device, verbose=verbose)
    grayscale_fid_note(config, verbose)
    stats_file = options.fid_ref_stats and ref_statistics_file(options.fid_ref_stats, trained_data(config))
    data_dir, dataset = model_data(config, options.data_dir, options.dataset)
    data = evaluation_data(data_dir, dataset, trained_data(config))
    return (features, *fid_reference(features, config, data, data_dir, options.fid_ref, stats_file, verbose))


def model_data(config, data_dir, dataset):
    """(data_dir, dataset) of the images a job reads: the flags, else the model's own."""
    data_dir = data_dir or config["data_dir"]
    return data_dir, dataset or (config.get("dataset") if data_dir == config["data_dir"] else None)
