"""Small shared pieces: the error types, crash-safe writes that refuse NaN, the run name and every path a run writes,
pixel ranges, images and plots, the machine's memory and out-of-memory errors, the precision and compile choices, the
Denoiser (how the network is run: autocast, torch.compile, memory layout) and the torchrun helpers."""
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch
from PIL import Image


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class NonFiniteError(Exception):
    """Numbers about to be written (weights, losses, images) are NaN or infinite: nothing was written."""


class WriteError(Exception):
    """A file could not be written (no space left, permission lost, quota): the file it was to replace is untouched
    and no temporary file is left. Reported as one line, exit status 1."""


class OutOfMemory(Exception):
    """Memory ran out: reported as one line saying what ran out and which flag lowers the need, exit status 1."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss diverged): reported as one line, exit status 1."""


class Interrupted(Exception):
    """SIGINT / SIGTERM during training: state saved, reported with how to resume; exit status 130."""


# what stops a command with a message (failure_text) and an exit status (exit_status) instead of a traceback
STOPPING_ERRORS = (UserError, TrainingError, NonFiniteError, WriteError, OutOfMemory, Interrupted, KeyboardInterrupt,
                   OSError)


def failure_text(e):
    """How a command reports one of the STOPPING_ERRORS it stops on: one line (the resume command on a second)."""
    if isinstance(e, Interrupted):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C); files already written stay, nothing is half-written"
    if isinstance(e, NonFiniteError):
        return f"error: {e}; nothing was written from them"
    if isinstance(e, OSError):
        return f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    return f"error: {e}"


def exit_status(e):
    """2 for bad input, 130 for an interruption, else 1."""
    return 2 if isinstance(e, UserError) else 130 if isinstance(e, (Interrupted, KeyboardInterrupt)) else 1


def require_finite(tensor, what):
    """Raise NonFiniteError unless every value of `tensor` is finite; `what` names it in the message."""
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"{what} hold NaN or infinite values")


# ------------------------------------------------------------------------------------ files

@contextlib.contextmanager
def atomic_open(path):
    """A binary file that appears at `path` only once the block has written all of it and it is on the disk
    (temporary file, fsync, rename): a crash, Ctrl-C or error never leaves a half-written file, and the file it
    replaces stays as it was until then. A write that fails (no space left, permission lost, quota) is a
    WriteError naming the file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"could not write {path} ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


class _WriteErrorRecorder:
    """A file whose failing write keeps its OSError: torch.save turns it into a RuntimeError that no longer says why
    ('unexpected pos 64 vs 0')."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_torch_save(obj, path):
    with atomic_open(path) as f:
        recorder = _WriteErrorRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise recorder.error from None


def atomic_write_text(text, path):
    with atomic_open(path) as f:
        f.write(text.encode())


def write_folder(files, path):
    """A new folder of files ({name: bytes}) that appears at `path` only once all of them are written (a temporary
    sibling folder, then a rename); `path` may exist as an empty folder. A failed write is a WriteError that leaves
    nothing behind."""
    tmp = f"{os.path.normpath(path)}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp)
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if os.path.isdir(path):
            os.rmdir(path)  # empty: anything else was refused before
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"could not write {path} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(obj, path):
    """Indented JSON, written atomically; NaN or infinity (which JSON cannot hold) raise NonFiniteError."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        raise NonFiniteError(f"values for {path} are NaN or infinite") from None
    atomic_write_text(text + "\n", path)


def check_writable_folder(path, flag):
    """UserError unless `path` is a folder this process can write in, or one it can create; creates nothing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path!r} cannot be a folder: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path!r} is not writable: {e.strerror} in {existing}") from None


# ------------------------------------------------------------------------------ run names and paths

NAME_MAX = 255  # the longest file name most file systems take (ext4, XFS, APFS, NTFS), in bytes
RUN_NAME_CHARACTERS = "letters A-Z a-z, digits, '_', '-' and '.'"  # POSIX's portable file name characters
# What a run writes to --save_dir, by what it holds ({run}: the run name); RunFiles builds every path from these.
OUTPUT_NAMES = {
    "forward_strip": "forward_process_{run}.png", "loss_history": "loss_history_{run}.json",
    "loss_curves": "loss_curves_{run}.png", "epoch_grid": "samples_{run}_epoch{epoch:03d}.png",
    "metrics": "metrics_{run}.json", "fid_samples": "fid_samples_{run}.npz", "samples_grid": "samples_{run}.png",
    "samples_folder": "samples_{run}", "samples_npz": "samples_{run}.npz",
    "guidance_sweep": "guidance_sweep_{run}.png", "denoising_strip": "denoising_strip_{run}.png",
    "nll": "nll_{run}.json", "nll_plot": "nll_terms_{run}.png",
}
CHECKPOINT_NAMES = ("last.pt", "best.pt", "ckpt.pt", "config.json")  # what a run writes to <models_dir>/<run>/
# the most a name gains: the longest output name (epochs up to 10⁹) and atomic_open's '.tmp<pid>' (pid < 2²²)
LONGEST_DECORATION = (max(len(name.format(run="", epoch=999_999_999)) for name in OUTPUT_NAMES.values())
                      + len(f".tmp{2 ** 22}"))
MAX_RUN_NAME = NAME_MAX - LONGEST_DECORATION


def run_name_problem(name):
    """What is wrong with `name` as a run name (None: nothing). A run name becomes part of file and folder names,
    never a path: POSIX's portable characters only, not '.' or '..', and short enough for every name made from it."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}, which names a folder, not a run"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return f"may hold only {RUN_NAME_CHARACTERS} (no path separators, spaces or other characters)"
    if len(name) > MAX_RUN_NAME:
        return (f"is {len(name)} characters long; at most {MAX_RUN_NAME} leave room for the longest file name made "
                f"from it ({NAME_MAX} characters)")
    return None


def check_run_name(name):
    """UserError unless `name` is a valid run name (run_name_problem)."""
    problem = run_name_problem(name)
    if problem:
        raise UserError(f"--run_name {name!r} {problem}: it names files, not a place")


def sanitized_run_name(name, fallback="DDPM"):
    """A valid run name made from any text (an older or foreign checkpoint's): every run of other characters becomes
    '_', leading '.', '_' and '-' go ('../../x y' → 'x_y'), cut to MAX_RUN_NAME; `fallback` when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name or "")).lstrip("._-")[:MAX_RUN_NAME]
    return name or fallback


@dataclass(frozen=True)
class RunFiles:
    """Every path a run writes, built here alone from the two folders and the run name, which is checked first
    (check_run_name): checkpoints and config.json in <models_dir>/<run>/, outputs as <save_dir>/OUTPUT_NAMES."""
    models_dir: str
    save_dir: str
    run_name: str

    def __post_init__(self):
        check_run_name(self.run_name)

    @property
    def ckpt_dir(self):
        return os.path.join(self.models_dir, self.run_name)

    def checkpoint(self, name):
        """<models_dir>/<run>/<name>, name one of CHECKPOINT_NAMES."""
        if name not in CHECKPOINT_NAMES:
            raise ValueError(f"unknown checkpoint file {name!r}")
        return os.path.join(self.ckpt_dir, name)

    def output(self, kind, **fields):
        """<save_dir>/<OUTPUT_NAMES[kind] for this run>, e.g. output('epoch_grid', epoch=3)."""
        return os.path.join(self.save_dir, OUTPUT_NAMES[kind].format(run=self.run_name, **fields))


def stderr_is_terminal():
    return sys.stderr.isatty()


# ------------------------------------------------------------------------------ images and plots

def to_model_range(images_uint8):
    """uint8 [0, 255] → float [−1, 1]."""
    return images_uint8.float() / 127.5 - 1


def to_uint8(images):
    """float [−1, 1] (N, C, H, W) → uint8 numpy (N, H, W, C); non-finite images raise NonFiniteError."""
    require_finite(images, "the images")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow):
    """Save images in [−1, 1] (N, C, H, W) as one PNG grid with nrow images per row: RGB, or mode L when C = 1."""
    from torchvision.utils import make_grid
    require_finite(images, "the images")
    grid = make_grid(images.float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)  # (3, H', W')
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # as save_image rounds
    with atomic_open(path) as f:
        Image.fromarray(pixels[..., 0] if images.shape[1] == 1 else pixels).save(f, format="png")


def file_name_part(text):
    """A class name as it can stand in a file name: every run of characters other than letters, digits and '_'
    becomes one '_' ('T-shirt/top' → 'T_shirt_top', '0 - zero' → '0_zero')."""
    return re.sub(r"\W+", "_", text).strip("_") or "_"


def save_individual_pngs(images, folder, labels=None, classes=None):
    """One PNG per image (mode L for 1-channel images, else RGB): NNNNN.png, or NNNNN_<class>.png when labels are
    given. They are written to a temporary folder beside `folder` and moved in only once all are written, so a write
    that fails leaves the earlier images as they were; then an earlier, larger batch's extra images are removed."""
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
    from torchvision.utils import make_grid

    require_finite(images, "the images")
    rows, cols = len(row_labels), len(col_labels)
    height, width = images.shape[-2:]
    grid = make_grid(images.float().cpu(), nrow=cols, normalize=True, value_range=(-1, 1), padding=2)
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
    """The variational bound's terms against the paper's t (1 … T), bits/dim on a log scale: the decoder L_0 at t = 1,
    the KL terms L_{t−1} after it, the prior L_T as a line; the total in the legend."""
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


# ------------------------------------------------------------------------------------ memory

def format_bytes(n):
    """1234567 → '1.2 MB' (decimal units, as disks and cards are sold); past petabytes, '3.7e+21 B'."""
    if n >= 1e18:
        return f"{n:.1e} B"
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def memory_of(device):
    """(bytes, what) of memory `device` has in all: a CUDA card's, else the machine's RAM; (None, what) where the
    system does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} has"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    except (AttributeError, ValueError, OSError):
        return None, "this machine has"


def check_memory(needs, device, host_needs=()):
    """UserError when what a run needs before it starts is more than the memory there is: needs [(bytes, what, flag)]
    on `device`, host_needs the same in the machine's RAM (the samples kept, on a CUDA run). Lower bounds only, so
    nothing that could run is refused; the message names the largest need and the flag that lowers it."""
    places = {device: list(needs)}
    places.setdefault(torch.device("cpu"), []).extend(host_needs)  # on a CPU run, the same memory
    for place, parts in places.items():
        have, owner = memory_of(place)
        total = sum(n for n, _, _ in parts)
        if have is None or total <= have:
            continue
        parts = sorted(parts, key=lambda part: -part[0])
        listed = ", ".join(f"{format_bytes(n)} {what}" for n, what, _ in parts if n >= total / 100)
        raise UserError(f"this would need at least {format_bytes(total)} of memory ({listed}) and {owner} "
                        f"{format_bytes(have)}: lower {parts[0][2]}")


ALLOCATION_FAILURES = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


@contextlib.contextmanager
def memory_guard(activity, remedy):
    """Turns running out of memory inside the block (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError,
    Python's MemoryError) into OutOfMemory: 'out of GPU memory while <activity>: <remedy>'."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        text = str(e).lower()
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and not any(a in text for a in ALLOCATION_FAILURES):
            raise
        where = "GPU memory" if isinstance(e, torch.OutOfMemoryError) or "cuda" in text else "memory"
        raise OutOfMemory(f"out of {where} while {activity}: {remedy}") from None


# ------------------------------------------------------------------------------------ runtime

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
COMPILE_CHOICES = ("auto", "on", "off")


def cpu_bf16_instructions():
    """The bf16 instructions this CPU has ('AVX512-BF16', 'AMX'); torch.cpu's checks are private, so a torch without
    them finds none."""
    checks = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    return [name for name, check in checks.items() if getattr(torch.cpu, check, lambda: False)()]


def choose_precision(requested, device):
    """(precision, why): what the U-Net runs in ('bf16', 'fp16' or 'fp32') for --precision `requested` on `device`,
    and why, for the banner. auto: bf16 where the hardware has it natively (CUDA compute capability ≥ 8.0, CPUs with
    AVX512-BF16 or AMX), fp16 with a dynamic loss scaler on older CUDA devices (no bf16 tensor cores), else float32.
    Weights, EMA, optimizer state and checkpoints stay float32 whatever runs."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = major >= 8
        hardware = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has " + (
            "native bf16" if native else "no bf16 tensor cores")
    else:
        found = cpu_bf16_instructions() if device.type == "cpu" else []
        native = bool(found)
        hardware = f"the CPU has {' and '.join(found)}" if native else "the CPU has neither AVX512-BF16 nor AMX"
    if requested == "auto":
        if native:
            return "bf16", hardware
        if device.type == "cuda":
            return "fp16", f"{hardware}: fp16 with a dynamic loss scaler"
        return "fp32", f"{hardware}: bf16 would be emulated"
    if requested == "bf16" and not native:
        return "bf16", f"--precision bf16, though {hardware}: emulated, expect it slower than float32"
    if requested == "fp16" and device.type != "cuda":
        return "fp16", "--precision fp16: emulated on the CPU, expect it much slower than float32"
    return requested, f"--precision {requested}"


def describe_precision(precision):
    return {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "fp32": "float32"}[precision]


def choose_compile(requested, device):
    """Whether to torch.compile the U-Net for --compile `requested`: auto compiles on CUDA only (on a CPU it measured
    no faster, after minutes of compiling: BENCHMARKS.md)."""
    return requested == "on" or (requested == "auto" and device.type == "cuda")


def synchronize(device):
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Denoiser:
    """Calls ε_θ under autocast at the run's precision ('bf16', 'fp16' or 'fp32': none) and through torch.compile
    when asked, always returning float32, with the input in the model's memory format (channels-last models — what
    ddpm_run and ddpm_sample build — train 20 % and sample 40 % faster on the 2-core CPU, and it is the layout bf16
    convolutions want on NVIDIA GPUs).

    If compilation fails (no compiler, unsupported op), it warns once and continues eagerly:
    the same function, only slower. Exposes the model's num_classes for classifier-free guidance.
    """

    def __init__(self, model, compile=False, precision="fp32"):
        self.model = model
        self.num_classes = getattr(model, "module", model).num_classes  # through a DistributedDataParallel
        self.precision = precision
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.device_type = next(model.parameters()).device.type
        conv_weight = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)  # (O, I, k, k)
        self.memory_format = torch.contiguous_format if conv_weight.is_contiguous() else torch.channels_last
        self.forward = torch.compile(model) if compile else model
        self.compiled = compile

    def __call__(self, x, t, class_labels=None):
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            x = x.contiguous(memory_format=self.memory_format)
            try:
                out = self.forward(x, t, class_labels)
            except torch.OutOfMemoryError:
                raise  # not a compilation problem: eager would run out of memory too
            except Exception as e:
                if not self.compiled:
                    raise
                print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "continuing without compilation (--compile off silences this)", file=sys.stderr)
                self.forward, self.compiled = self.model, False
                out = self.model(x, t, class_labels)
        return out.float()


# ------------------------------------------------------------------------------- distributed

CONTROL_GROUP = None  # under NCCL, the gloo group whose all-reduces of host numbers never wait for the GPU


def init_distributed(use_cuda):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU), with a gloo group beside
    NCCL for the ranks' decisions (max_over_ranks), and return (rank, world_size, local_rank); otherwise (0, 1, 0)
    and nothing changes."""
    global CONTROL_GROUP
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    CONTROL_GROUP = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None
    return dist.get_rank(), dist.get_world_size(), local_rank


def all_ranks_mean(value, world_size):
    """The mean of a device scalar over ranks (itself when single-process)."""
    if world_size == 1:
        return value
    import torch.distributed as dist
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size


def max_over_ranks(values, world_size):
    """The element-wise maximum of a list of numbers (or booleans) over ranks, as floats, so that every
    rank takes the same decision: one all-reduce of a CPU tensor (through gloo, never waiting for a GPU)."""
    if world_size == 1:
        return [float(v) for v in values]
    import torch.distributed as dist
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=CONTROL_GROUP)
    return t.tolist()


def barrier(world_size):
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()
