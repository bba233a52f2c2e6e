"""Pictures: pixel ranges, sample grids and PNGs, labelled grids and plots, and the layout of the grids the tool
draws. Every file is written atomically (ddpm_helpers.atomic_open); images that hold NaN are refused."""
import math
import os
import re
import shutil

import torch
from PIL import Image

from ddpm_helpers import WriteError, atomic_open, require_finite

GRID_SEED = 4321          # fixed noise for the per-epoch sample grid, so epochs can be compared
GRID_PER_CLASS = 8        # columns of the per-epoch grid of a conditional model (one row per class)
GRID_UNCONDITIONAL = 64   # images in the per-epoch grid of an unconditional model
MAX_CLASS_ROWS = 16       # with more classes, grids show one image per class (or, sweeps, the first this many)
STRIP_ROWS = 8            # samples in the denoising strip unless --num_samples says otherwise
STRIP_COLUMNS = 10        # x̂_0 at this many evenly spaced network evaluations, the first to the last


def grid_layout(num_classes):
    """The per-epoch grid for num_classes classes (None: unconditional): (labels (N,) or None, N, columns):
    GRID_PER_CLASS a class, a row each (more than MAX_CLASS_ROWS classes: one each); else GRID_UNCONDITIONAL."""
    if num_classes is None:
        return None, GRID_UNCONDITIONAL, GRID_PER_CLASS
    if num_classes > MAX_CLASS_ROWS:
        return torch.arange(num_classes), num_classes, math.isqrt(num_classes - 1) + 1  # ⌈√K⌉ columns
    return torch.arange(num_classes).repeat_interleave(GRID_PER_CLASS), num_classes * GRID_PER_CLASS, GRID_PER_CLASS


def to_model_range(images_uint8):
    """uint8 [0, 255] → float [−1, 1]."""
    return images_uint8.float() / 127.5 - 1


def to_uint8(images):
    """float [−1, 1] (N, C, H, W) → uint8 numpy (N, H, W, C); non-finite images raise NonFiniteError."""
    require_finite(images, "the images")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def tile(images, nrow, padding=2):
    """Images in [−1, 1] (N, C, H, W) as one grid (3, H', W') in [0, 1]: torchvision's make_grid(normalize=True,
    value_range=(−1, 1)) written out (tests check they agree), so that a grid does not import torchvision."""
    images = images.float().cpu().clamp(-1, 1).add(1).div(2)
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images   # grey: the same in every channel
    if len(images) == 1:
        return images[0]
    columns = min(nrow, len(images))
    rows = math.ceil(len(images) / columns)
    height, width = images.shape[2] + padding, images.shape[3] + padding
    grid = images.new_zeros(3, height * rows + padding, width * columns + padding)
    for k, image in enumerate(images):
        top, left = (k // columns) * height + padding, (k % columns) * width + padding
        grid[:, top:top + height - padding, left:left + width - padding] = image
    return grid


def save_grid(images, path, nrow):
    """Save images in [−1, 1] (N, C, H, W) as one PNG grid with nrow images per row: RGB, or mode L when C = 1."""
    require_finite(images, "the images")
    grid = tile(images, nrow)                                                                      # (3, H', W')
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # as save_image rounds
    with atomic_open(path) as f:
        Image.fromarray(pixels[..., 0] if images.shape[1] == 1 else pixels).save(f, format="png")


CLASS_NAME_BYTES = 100  # the most of a class name a file name takes: 'NNNNN_' + 100 bytes + '.png' fits in 255


def file_name_part(text):
    """A class name as part of a file name: runs of other characters than letters, digits and '_' become '_'
    ('T-shirt/top' → 'T_shirt_top'), cut to CLASS_NAME_BYTES of UTF-8."""
    part = re.sub(r"\W+", "_", text).strip("_").encode()[:CLASS_NAME_BYTES].decode(errors="ignore")
    return part or "_"


def save_forward_strip(diffusion, image_uint8, path, count=10):
    """One training image (C, H, W) noised by q(x_t | x_0) at `count` evenly spaced t, t = 0 to T−1."""
    x0 = to_model_range(image_uint8.to(diffusion.betas.device)).expand(count, -1, -1, -1)
    t = torch.linspace(0, diffusion.timesteps - 1, count).round().long().to(x0.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(GRID_SEED)).to(x0.device)
    save_grid(diffusion.q_sample(x0, t, noise), path, nrow=count)


def save_individual_pngs(images, folder, labels=None, classes=None):
    """One PNG per image: NNNNN.png, or NNNNN_<class>.png with labels; all written into a temporary folder first, so a
    failed write leaves the earlier images; an earlier, larger batch's extra images are removed."""
    arrays = to_uint8(images)  # (N, H, W, C); checked finite before anything is touched
    names = [f"{i:05d}{f'_{file_name_part(classes[int(labels[i])])}' if labels is not None else ''}.png"
             for i in range(len(arrays))]
    staging = f"{folder}.tmp{os.getpid()}"
    try:
        os.makedirs(staging, exist_ok=True)
        for name, array in zip(names, arrays):
            with open(os.path.join(staging, name), "wb") as f:
                Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(f, format="png")
        os.makedirs(folder, exist_ok=True)
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
        for name in set(os.listdir(folder)) - set(names):
            if re.fullmatch(r"\d{5}(_.+)?\.png", name):
                os.remove(os.path.join(folder, name))
    except OSError as e:
        raise WriteError(f"could not write the sample PNGs in {folder} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [os.path.join(folder, name) for name in names]


def save_labelled_grid(images, path, row_labels, col_labels, title=None):
    """A grid of images in [−1, 1] with a label beside each row and above each column, and an optional title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    require_finite(images, "the images")
    rows, cols = len(row_labels), len(col_labels)
    height, width = images.shape[-2:]
    grid = tile(images, cols)
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * cols, 0.6 + 0.75 * rows + 0.3 * bool(title)), dpi=100)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    centres = lambda n, size: [2 + (size + 2) * i + size / 2 for i in range(n)]
    ax.set_yticks(centres(rows, height), row_labels)
    ax.set_xticks(centres(cols, width), col_labels, rotation=45, ha="left")
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    if title:
        ax.set_xlabel(title)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def plot_loss_history(history, path, title=""):
    """Train / validation / test loss per epoch as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test")):
        ax.plot(history["epochs"], history[key], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def plot_bound_terms(terms, prior, total, path, title=""):
    """The bound's terms against the paper's t (1 … T) in bits/dim, log scale: L_0 at t = 1, the KL terms after it,
    L_T as a line, the total in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    steps = list(range(1, len(terms) + 1))
    ax.semilogy(steps[1:], terms[1:], lw=1, label="$L_{t-1}$: KL(q(x$_{t-1}$|x$_t$,x$_0$) ‖ p$_θ$(x$_{t-1}$|x$_t$))")
    ax.semilogy(steps[:1], terms[:1], "o", color="C3", label=f"$L_0$: decoder −log p$_θ$(x$_0$|x$_1$) = {terms[0]:.3f}")
    ax.axhline(max(prior, 1e-12), color="C2", ls="--", lw=1, label=f"$L_T$: prior KL = {prior:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("t (the paper's steps, 1 … T)")
    ax.set_ylabel("bits / dim")
    ax.set_title(f"{title}: bound {total:.3f} bits/dim" if title else f"bound {total:.3f} bits/dim")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
