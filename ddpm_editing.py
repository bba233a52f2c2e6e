"""Editing real images with a trained model: inpainting (RePaint, Lugmayr et al. 2022), inversion to noise and back
(DDIM with η = 0 run forwards, Song et al. 2021) and interpolation between two images or two seeds (slerp of their
noises) — the images they take (test images by index, image files), the masks, the sampler settings they run with,
and the grids, npz and JSON they write. The maths is below (repaint, ddim_invert, slerp) and ddpm_diffusion's
(ClassMix, the DDIM step).
"""
import functools
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ddpm_data import evenly_spread, open_image, pad_to_side, padding, trained_data
from ddpm_diffusion import ClassMix
from ddpm_helpers import UserError, atomic_open, stderr_is_terminal, write_json
from ddpm_jobs import EDIT_IMAGES, Item
from ddpm_pictures import save_labelled_grid, to_model_range, to_uint8
from ddpm_sample import describe_sampling, model_data, seeded_rng, test_split

NOISE_SHOWN = 3     # x_T is drawn divided by this (|ε| < 3 for 99.7 % of a Gaussian's values)


# ------------------------------------------------------------------------------- what to edit

@dataclass
class Inputs:
    """The images an editing job works on, their class indices for class-guided editing, and their names."""
    images: list           # (C, H, W) uint8 tensors at the data's size; None where a seed stands for an image
    labels: torch.Tensor   # (N,) class indices, or None: unconditional (a conditional model's null label)
    names: list            # a label per image for the grids: 'test 17', the file's name, 'seed 3'
    seeds: list            # the seed of each noise end, None for an image


def gather_inputs(items, test_split, data, classes, conditional, flag):
    """The Inputs `items` name: test images (test_split: a function returning (images, labels), called if needed),
    image files read as the model's `data`, seeds; labels when `conditional`: `classes` cycled, else the images' own."""
    needs_split = any(item.kind == "test" for item in items)
    split_images, split_labels = test_split() if needs_split else (None, None)
    images = []
    for item in items:
        if item.kind == "test":
            if item.value >= len(split_images):
                raise UserError(f"{flag}: test index {item.value} is past the test split's {len(split_images)} images "
                                f"(0-{len(split_images) - 1})")
            images.append(split_images[item.value])
        else:
            images.append(read_image_file(item.value, data, flag) if item.kind == "file" else None)
    labels = None
    if conditional:
        if classes:
            labels = torch.tensor(classes * math.ceil(len(items) / len(classes)))[:len(items)]
        elif any(item.kind != "test" for item in items):
            names = ", ".join(item.name for item in items if item.kind != "test")
            raise UserError(f"{flag} with --conditional: {names} {'has' if ', ' not in names else 'have'} no class; "
                            "give the classes with --sample_classes")
        else:
            labels = torch.stack([split_labels[item.value] for item in items]).long()
    return Inputs(images, labels, [item.name for item in items],
                  [item.value if item.kind == "seed" else None for item in items])


def read_image_file(path, data, flag):
    """An image file as the model's `data`: (C, H, W) uint8 in its channels, of exactly its size."""
    height, width = data["data_size"]
    try:
        with open_image(path) as im:
            if (im.height, im.width) != (height, width):
                raise UserError(f"{flag}: {path!r} is {im.width}×{im.height} pixels; this model's images are "
                                f"{width}×{height}: resize or crop it first")
            pixels = np.asarray(im.convert("L" if data["channels"] == 1 else "RGB"))
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: cannot read the image {path!r} ({type(e).__name__}: {e})") from None
    return torch.from_numpy(pixels.copy()).reshape(height, width, -1).permute(2, 0, 1)


# ------------------------------------------------------------------------------------- masks

def fill_masks(spec, count, data_size, seed):
    """Where RePaint draws: (count, 1, H, W) float, 1 to fill. spec: 'centre' (the middle square of half the side),
    'left' (the left half), 'strokes' (random brush strokes from seed), or a mask PNG of the data's size."""
    height, width = data_size
    masks = torch.zeros(count, 1, height, width)
    if spec == "centre":
        side = min(height, width) // 2
        top, left = (height - side) // 2, (width - side) // 2
        masks[..., top:top + side, left:left + side] = 1
    elif spec == "left":
        masks[..., :width // 2] = 1
    elif spec == "strokes":
        rng = np.random.default_rng(seed % 2 ** 64)
        masks = torch.stack([brush_strokes(rng, height, width) for _ in range(count)])
    else:
        masks[:] = read_mask(spec, data_size)
    return masks


def brush_strokes(rng, height, width, strokes=4):
    """(1, H, W) float: `strokes` random walks of 4 segments drawn with a brush an eighth of the side wide."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    brush = max(1, min(height, width) // 8)
    for _ in range(strokes):
        points = [tuple(rng.uniform(0, (width, height)))]
        for _ in range(4):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.35) * min(height, width)
            points.append((points[-1][0] + length * math.cos(angle), points[-1][1] + length * math.sin(angle)))
        draw.line(points, fill=255, width=brush, joint="curve")
    return torch.from_numpy(np.asarray(canvas) >= 128).float()[None]


def read_mask(path, data_size):
    """A mask PNG as (H, W) float, 1 where white (≥ 128); UserError when unreadable, of another size, or marking
    nothing to fill or nothing to keep."""
    height, width = data_size
    try:
        with open_image(path) as im:
            if (im.height, im.width) != (height, width):
                raise UserError(f"--inpaint: the mask {path!r} is {im.width}×{im.height} pixels; it must be the "
                                f"model's image size, {width}×{height} (white: fill, black: keep)")
            fill = torch.from_numpy(np.asarray(im.convert("L")) >= 128).float()
    except (OSError, ValueError) as e:
        raise UserError(f"--inpaint: cannot read the mask {path!r} ({type(e).__name__}: {e})") from None
    if not fill.any() or fill.all():
        raise UserError(f"--inpaint: the mask {path!r} is all {'black' if not fill.any() else 'white'}: nothing "
                        f"{'to fill' if not fill.any() else 'is kept'} (white pixels are filled, black ones kept)")
    return fill


# --------------------------------------------------------------------------------- the jobs
# ddpm_jobs.JOBS names these: each takes the command line's options, the Sampler of --model_path (settings: the job's
# own sampler, ddpm_sample.sampler_settings), the run's RunFiles and --sample_classes as class indices (None: not given)

def inpaint_job(options, sampler, files, classes):
    """--inpaint SHAPE|PNG: RePaint the region in the images edit_inputs finds (write_inpainting)."""
    inputs = edit_inputs(options, sampler, classes, "--inpaint", options.images, "--images")
    fill = fill_masks(options.inpaint.value, len(inputs.names), trained_data(sampler.config)["data_size"], options.seed)
    write_inpainting(sampler, inputs, fill, options.jump_length, options.jump_count, options.seed, files,
                     not options.quiet)


def invert_job(options, sampler, files, classes):
    """--invert: the images edit_inputs finds to x_T by DDIM and back (write_inversion)."""
    inputs = edit_inputs(options, sampler, classes, "--invert", options.images, "--images")
    write_inversion(sampler, inputs, files, not options.quiet)


def interpolate_job(options, sampler, files, classes):
    """--interpolate A,B: a strip from A to B (write_interpolation)."""
    inputs = edit_inputs(options, sampler, classes, "--interpolate", options.interpolate, "--interpolate")
    write_interpolation(sampler, inputs, options.frames, files, not options.quiet)


def edit_inputs(options, sampler, classes, job_flag, items, items_flag):
    """The Inputs a job edits: `items` (named by items_flag), else --num_samples (EDIT_IMAGES) test images spread
    over the model's data; class-guided with --conditional."""
    config = sampler.config
    data_dir, dataset = model_data(config, options.data_dir, options.dataset)

    @functools.cache
    def load_split():  # only when a test image is asked for, once
        try:
            return test_split(config, data_dir, dataset, job_flag)
        except UserError as e:
            raise UserError(f"{job_flag} edits test images of the model's data, and {e}; "
                            f"{'point --data_dir at it' if options.data_dir else 'give --data_dir'} (or image files: "
                            f"{items_flag} a.png,b.png)") from None
    if items is None:
        chosen = evenly_spread(torch.arange(len(load_split()[0])), options.num_samples or EDIT_IMAGES)
        items = [Item("test", i) for i in chosen.tolist()]
    return gather_inputs(items, load_split, trained_data(config), classes, options.conditional, job_flag)


def edits_keep(options, config, settings):
    """What --inpaint and --invert hold (Job.keeps): each image four times (input, mask or x_T, output, npz)."""
    return 4 * (len(options.images) if options.images else options.num_samples or EDIT_IMAGES), \
        "--images or --num_samples"


def frames_keep(options, config, settings):
    """What --interpolate holds (Job.keeps): each frame's noise and image, and the npz's copies of them."""
    return 4 * options.frames, "--frames"


def repaint_banner(options, settings, config):
    """What --inpaint runs, for its banner: RePaint's jumps on its ancestral steps (DDIM with η = 1)."""
    return (f"RePaint, jumps of {options.jump_length} levels made {options.jump_count} "
            f"time{'s' if options.jump_count > 1 else ''}, on {describe_sampling(settings, options.conditional)}")


def model_images(sampler, images_uint8):
    """uint8 images (N, C, H, W) at the data's size → [−1, 1] at the model's side (edges repeated), on its device."""
    return pad_to_side(to_model_range(images_uint8), sampler.config["image_size"]).to(sampler.device)


def diffusion_schedule(sampler):
    """The sampler's timesteps (T−1 first) and the guidance scale at each."""
    steps = sampler.diffusion.sampler_timesteps(sampler.settings)
    return steps, sampler.diffusion.guidance_scales(sampler.settings, steps)


def labels_on(sampler, labels, batch):
    """A batch's class labels (a slice of labels (N,) or of a ClassMix) on the sampler's device; None stays None."""
    return None if labels is None else labels[batch].to(sampler.device)


def inpaint(sampler, images_uint8, fill, labels, jump_length, jump_count, seed, progress=False):
    """RePaint on images (N, C, H, W) uint8 where fill (N, 1, H, W) is 1: (N, C, H, W) in [−1, 1] at the data's size."""
    steps, scales = diffusion_schedule(sampler)
    side = sampler.config["image_size"]
    fill = F.pad(fill, padding(fill.shape[-2:], side))                 # the padding is kept, never drawn
    with seeded_rng(seed, sampler.device):
        outputs = [repaint(
            sampler.diffusion, sampler.denoiser, model_images(sampler, images_uint8[batch]),
            fill[batch].to(sampler.device), steps, labels_on(sampler, labels, batch), scales, jump_length, jump_count,
            progress=progress).cpu()
            for batch in batches(len(images_uint8), sampler.batch_size)]
    return sampler.to_data_size(torch.cat(outputs).clamp(-1, 1))


def invert(sampler, images_uint8, labels, progress=False):
    """DDIM inversion of images (N, C, H, W) uint8: their x_T (N, C, S, S) at the model's side, float32 on the CPU."""
    steps, scales = diffusion_schedule(sampler)
    return torch.cat([ddim_invert(
        sampler.diffusion, sampler.denoiser, model_images(sampler, images_uint8[batch]), steps,
        labels_on(sampler, labels, batch), scales, progress).cpu()
        for batch in batches(len(images_uint8), sampler.batch_size)])


def decode(sampler, noises, labels, progress=False):
    """The DDIM sampler (η = 0) from noises (N, C, S, S) → (N, C, H, W) in [−1, 1]; labels (N,), a ClassMix or None."""
    steps, scales = diffusion_schedule(sampler)
    return sampler.to_data_size(torch.cat([sampler.diffusion.ddim(
        sampler.denoiser, noises[batch].to(sampler.device), steps, labels_on(sampler, labels, batch), scales,
        progress=progress).clamp(-1, 1).cpu() for batch in batches(len(noises), sampler.batch_size)]))


def batches(count, batch_size):
    """Slices of count items, batch_size at a time (--sample_batch)."""
    return [slice(first, first + batch_size) for first in range(0, count, batch_size)]


def psnr(originals_uint8, images):
    """PSNR in dB of images in [−1, 1] against uint8 originals on the 8-bit pixels a PNG holds: 10 log10(255² / MSE)
    per image (N,), inf where identical."""
    error = to_uint8(images).astype(np.float64) - originals_uint8.permute(0, 2, 3, 1).numpy()
    mse = (error ** 2).reshape(len(error), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


def db_text(value):
    return "identical" if math.isinf(value) else f"{value:.1f} dB"


def write_inpainting(sampler, inputs, fill, jump_length, jump_count, seed, files, verbose):
    """inpaint_<run>.png (the inputs, the region to fill in grey, the completions) and inpaint_<run>.npz."""
    images = torch.stack(inputs.images)
    start = time.perf_counter()
    outputs = inpaint(sampler, images, fill, inputs.labels, jump_length, jump_count, seed,
                      verbose and stderr_is_terminal())
    seconds = time.perf_counter() - start
    originals = to_model_range(images)
    masked = originals * (1 - fill)                                    # the region to fill, grey (0 in [−1, 1])
    os.makedirs(files.save_dir, exist_ok=True)
    save_labelled_grid(torch.cat([originals, masked, outputs]), files.output("inpainting"),
                       ["input", "to fill", "inpainted"], column_names(sampler, inputs))
    with atomic_open(files.output("inpainting_npz")) as f:
        np.savez(f, inputs=to_uint8(originals), fill=fill[:, 0].bool().numpy(), outputs=to_uint8(outputs))
    if verbose:
        share = fill.mean().item()
        print(f"inpainted {len(images)} images ({share:.0%} of the pixels filled) in {seconds:.1f} s on "
              f"{sampler.device}: {files.output('inpainting')}, arrays {files.output('inpainting_npz')}", flush=True)


def write_inversion(sampler, inputs, files, verbose):
    """invert_<run>.png (the inputs, their x_T, the reconstructions, PSNRs), invert_<run>.npz and invert_<run>.json."""
    images, progress = torch.stack(inputs.images), verbose and stderr_is_terminal()
    start = time.perf_counter()
    noises = invert(sampler, images, inputs.labels, progress)
    reconstructions = decode(sampler, noises, inputs.labels, progress)
    seconds = time.perf_counter() - start
    scores = psnr(images, reconstructions)
    finite = scores[np.isfinite(scores)]
    os.makedirs(files.save_dir, exist_ok=True)
    shown = sampler.to_data_size((noises / NOISE_SHOWN).clamp(-1, 1))
    save_labelled_grid(torch.cat([to_model_range(images), shown, reconstructions]), files.output("inversion"),
                       ["input", f"x_T / {NOISE_SHOWN}", "reconstructed"],
                       [f"{name}: {db_text(value)}" for name, value in zip(column_names(sampler, inputs), scores)])
    with atomic_open(files.output("inversion_npz")) as f:
        np.savez(f, inputs=to_uint8(to_model_range(images)), noises=noises.numpy(),
                 reconstructions=to_uint8(reconstructions), psnr_db=scores)
    result = {"psnr_db_mean": float(finite.mean()) if len(finite) else None,  # identical images (inf) left out
              "psnr_db": [float(v) if math.isfinite(v) else None for v in scores],  # None: identical
              "identical": len(scores) - len(finite), "images": inputs.names,
              "sampler": describe_sampling(sampler.settings, inputs.labels is not None),
              "network_evaluations_per_image": 2 * sampler.settings.steps, "seconds": seconds,
              "device": str(sampler.device), "precision": sampler.denoiser.precision, "run_name": files.run_name}
    write_json(result, files.output("inversion_json"))
    if verbose:
        mean = f"PSNR {result['psnr_db_mean']:.2f} dB on average" if len(finite) else "every image identical"
        print(f"inverted {len(images)} images to x_T and back ({sampler.settings.steps} DDIM steps each way): {mean} "
              f"in {seconds:.1f} s on {sampler.device}: {files.output('inversion')}, "
              f"{files.output('inversion_json')}", flush=True)
    return result


def interpolation_noises(sampler, inputs, frames):
    """The two ends' x_T (an image's by DDIM inversion, a seed's drawn) and `frames` noises slerped between them:
    (frames, C, S, S), and the weights (frames,)."""
    config = sampler.config
    shape = (config["model"]["channels"], config["image_size"], config["image_size"])
    ends = [None, None]
    shown = [i for i, image in enumerate(inputs.images) if image is not None]
    if shown:
        labels = None if inputs.labels is None else inputs.labels[shown]
        ends_inverted = invert(sampler, torch.stack([inputs.images[i] for i in shown]), labels)
        for i, noise in zip(shown, ends_inverted):
            ends[i] = noise
    for i, seed in enumerate(inputs.seeds):
        if seed is not None:
            with seeded_rng(seed, torch.device("cpu")):
                ends[i] = torch.randn(shape)
    weights = torch.linspace(0, 1, frames, dtype=torch.float64)
    return torch.stack([slerp(ends[0], ends[1], w.item()) for w in weights]), weights


def write_interpolation(sampler, inputs, frames, files, verbose):
    """interpolate_<run>.png: the `frames` images decoded from the slerped noises, input images at its ends, the class
    blending between two (ClassMix); interpolate_<run>.npz: the frames, weights and noises."""
    start = time.perf_counter()
    noises, weights = interpolation_noises(sampler, inputs, frames)
    labels = inputs.labels
    if labels is not None:  # one class: its own label; two: blended from the first to the second
        labels = labels[0].repeat(frames) if labels[0] == labels[1] else \
            ClassMix(labels[0].repeat(frames), labels[1].repeat(frames), weights.float())
    images = decode(sampler, noises, labels, verbose and stderr_is_terminal())
    seconds = time.perf_counter() - start
    ends = [to_model_range(image[None]) if image is not None else None for image in inputs.images]
    row = torch.cat([e for e in (ends[0], images, ends[1]) if e is not None])
    names = column_names(sampler, inputs)
    columns = ([names[0]] if ends[0] is not None else []) + [f"{w:.2f}" for w in weights.tolist()] + \
        ([names[1]] if ends[1] is not None else [])
    os.makedirs(files.save_dir, exist_ok=True)
    classes = sampler.config.get("classes") or []
    row_label = ("" if inputs.labels is None else classes[int(inputs.labels[0])] if inputs.labels[0] == inputs.labels[1]
                 else f"{classes[int(inputs.labels[0])]} → {classes[int(inputs.labels[1])]}")
    save_labelled_grid(row, files.output("interpolation"), [row_label], columns,
                       f"slerp between the x_T of {inputs.names[0]} and {inputs.names[1]}, decoded by DDIM")
    with atomic_open(files.output("interpolation_npz")) as f:
        np.savez(f, frames=to_uint8(images), weights=weights.numpy(), noises=noises.numpy())
    if verbose:
        print(f"interpolated {inputs.names[0]} → {inputs.names[1]} in {frames} frames in {seconds:.1f} s on "
              f"{sampler.device}: {files.output('interpolation')}", flush=True)


def column_names(sampler, inputs):
    """Each input's label for a grid: its class when class-guided, else its name ('test 17', the file's)."""
    if inputs.labels is None:
        return list(inputs.names)
    return [sampler.config["classes"][int(c)] for c in inputs.labels]


# The maths of editing: RePaint, DDIM inversion, slerp ---------------------------------------------------

def level_alpha_bars(diffusion, steps):
    """ᾱ at each level of a sampler's timesteps `steps` (T−1 first), on the host: level 0 is x_0 (ᾱ = 1), level k
    the timestep steps[−k]."""
    return [1.0] + diffusion.alphas_cumprod[list(reversed(steps))].tolist()


@torch.no_grad()
def repaint(diffusion, model, x_known, fill, steps, class_labels, guidance_scales, jump_length=10,
            jump_count=10, noise=None, progress=False):
    """RePaint (Lugmayr et al. 2022, Algorithm 1): images x_known (N, C, H, W) in [−1, 1] with the region where
    `fill` (N, 1, H, W) is 1 drawn by the model, the rest kept. On the way down, each ancestral step (DDIM with
    η = 1: Ho et al.'s posterior on the timesteps `steps`, T−1 first) draws the unknown region, and the known
    region is x_known noised to the same level, q(x_t | x_0) (eq. 4); at the jumps (repaint_levels) x goes back
    up, q(x_t | x_{t−1}) re-noising it, so the model harmonises the two regions. Returns x_0, the kept region
    equal to x_known."""
    keep = 1 - fill
    x = torch.randn_like(x_known) if noise is None else noise
    path, alpha_bars = repaint_levels(len(steps), jump_length, jump_count), level_alpha_bars(diffusion, steps)
    for here, there in tqdm(list(zip(path, path[1:])), desc="inpainting (RePaint)", leave=False,
                            disable=not progress):
        if there > here:                                           # back up: x_there ~ q(x_there | x_here)
            ratio = alpha_bars[there] / alpha_bars[here]
            x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * torch.randn_like(x)
            continue
        i = len(steps) - here                                      # steps[i]: the timestep of level `here`
        t = torch.full((len(x),), steps[i], device=x.device, dtype=torch.long)
        unknown = diffusion.ddim_step(model, x, t, steps[i + 1] if there else -1, class_labels,
                                      guidance_scales[i], eta=1.0)
        alpha_bar = alpha_bars[there]                              # the known region at the same level: eq. 4
        known = math.sqrt(alpha_bar) * x_known + math.sqrt(1 - alpha_bar) * torch.randn_like(x) if there \
            else x_known
        x = keep * known + fill * unknown
    return x


@torch.no_grad()
def ddim_invert(diffusion, model, x_zero, steps, class_labels, guidance_scales, progress=False):
    """DDIM inversion: images x_0 (N, C, H, W) to the x_T that the DDIM sampler (η = 0) of `diffusion` on the
    timesteps `steps` (T−1 first) takes back to them, its deterministic step (eq. 12) run forwards. Each step s → t (t the higher
    noise level) takes ε̂ from the network at the point it has, x_s, and t: x_t = √ᾱ_t x̂_0 + √(1 − ᾱ_t) ε̂ with
    x̂_0 = (x_s − √(1 − ᾱ_s) ε̂) / √ᾱ_s — exact where ε̂ barely changes over a step, hence better with more steps.
    guidance_scales[i] is the w at steps[i], as the sampler takes it."""
    x, alpha_bars = x_zero, level_alpha_bars(diffusion, steps)
    for level in tqdm(range(1, len(steps) + 1), desc="inverting (ddim)", leave=False, disable=not progress):
        i = len(steps) - level                                     # steps[i]: the timestep of this level
        t = torch.full((len(x),), steps[i], device=x.device, dtype=torch.long)
        eps, _ = diffusion.model_predictions(model, x, t, class_labels, guidance_scales[i])
        alpha_bar_s, alpha_bar_t = alpha_bars[level - 1], alpha_bars[level]
        x_zero_hat = (x - math.sqrt(1 - alpha_bar_s) * eps) / math.sqrt(alpha_bar_s)
        x = math.sqrt(alpha_bar_t) * x_zero_hat + math.sqrt(1 - alpha_bar_t) * eps
    return x



def repaint_levels(levels, jump_length, jump_count):
    """The levels RePaint visits, from `levels` (x_T) down to 0 (x_0), one level at a time: down, except that on
    reaching a multiple of jump_length (0 included, below levels − jump_length) it goes back up jump_length levels,
    jump_count − 1 times, before going on down (Lugmayr et al. 2022's jump schedule, their j and r). Evaluations:
    levels + (⌈levels / jump_length⌉ − 1) (jump_count − 1) jump_length."""
    jumps = {level: jump_count - 1 for level in range(0, levels - jump_length, jump_length)}
    path = [levels]
    while path[-1] > 0:
        path.append(path[-1] - 1)
        if jumps.get(path[-1], 0) > 0:
            jumps[path[-1]] -= 1
            path += range(path[-1] + 1, path[-1] + jump_length + 1)
    return path


def slerp(a, b, weight):
    """Spherical interpolation of noises a, b (C, H, W) at weight in [0, 1], in float64: sin((1−w)θ)/sin θ · a +
    sin(wθ)/sin θ · b, θ the angle between them (Shoemake 1985); a at 0 and b at 1 exactly. Keeps a Gaussian noise's
    norm where a straight line would shrink it."""
    a64, b64 = a.double(), b.double()
    theta = torch.arccos((a64.flatten() @ b64.flatten() / (a64.norm() * b64.norm())).clamp(-1, 1))
    if theta < 1e-6:                                                   # the same direction: the line is the arc
        return torch.lerp(a64, b64, weight).to(a.dtype)
    return ((torch.sin((1 - weight) * theta) * a64 + torch.sin(weight * theta) * b64) / torch.sin(theta)).to(a.dtype)
