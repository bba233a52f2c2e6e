"""The hardware a run uses: the machine's memory and what a run needs of it (checked before anything is built),
out-of-memory errors, the precision and compile choices, the Denoiser (how the network is run: autocast,
torch.compile, memory layout), the torchrun helpers, and SIGINT / SIGTERM during a run (SignalFlag)."""
import contextlib
import dataclasses
import os
import signal
import sys
import threading

import torch

from ddpm_helpers import OutOfMemory, StopRequested, UserError
from ddpm_model import build_unet


def format_bytes(n):
    """1234567 → '1.2 MB' (decimal units, as disks and cards are sold); past petabytes, '3.7e+21 B'."""
    if n >= 1e18:
        return f"{n:.1e} B"
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def memory_of(device):
    """(bytes, what) of the memory `device` has: a CUDA card's, else the machine's RAM; (None, what) when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} has"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    except (AttributeError, ValueError, OSError):
        return None, "this machine has"


def check_memory(needs, device, host_needs=()):
    """UserError when a run's lower-bound needs [(bytes, what, flag)] on `device` (host_needs: in the machine's RAM)
    exceed the memory there; the message names the largest need and the flag that lowers it."""
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
    """Running out of memory inside the block (CUDA's, the CPU allocator's, Python's) becomes OutOfMemory: 'out of
    GPU memory while <activity>: <remedy>'."""
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
    """The bf16 instructions this CPU has ('AVX512-BF16', 'AMX'), by torch.cpu's private checks (none without)."""
    checks = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    return [name for name, check in checks.items() if getattr(torch.cpu, check, lambda: False)()]


def choose_precision(requested, device):
    """(precision, why) the U-Net runs in for --precision `requested` on `device`. auto: bf16 where the hardware has
    it (CUDA capability ≥ 8.0, AVX512-BF16 or AMX CPUs), fp16 with a loss scaler on older CUDA devices, else fp32."""
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
    """Whether to torch.compile the U-Net: auto compiles on CUDA only (no faster on a CPU, BENCHMARKS.md)."""
    return requested == "on" or (requested == "auto" and device.type == "cuda")


def device_of(options):
    """The device a command runs on: its rank's CUDA device unless --no_cuda, else the CPU."""
    if torch.cuda.is_available() and not options.no_cuda:
        return torch.device("cuda", getattr(options, "local_rank", 0))
    return torch.device("cpu")


def synchronize(device):
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Denoiser:
    """Calls ε_θ under autocast at the run's precision and through torch.compile when asked, returning float32, the
    input in the model's memory format (channels-last: 20 % faster training, 40 % faster sampling on the 2-core CPU).
    A failed compile warns once and runs eagerly. Exposes the model's num_classes for guidance."""

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
    """Under torchrun: join the process group (NCCL on CUDA with a gloo group beside it for max_over_ranks, gloo on
    CPU); (rank, world_size, local_rank), (0, 1, 0) alone."""
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
    """The element-wise maximum of numbers over ranks, as floats: one all-reduce of a CPU tensor through gloo."""
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


# ------------------------------------------------------------------- what a run needs

def parameter_count(model_config):
    """The U-Net's parameters counted on the meta device, class embedding left out (a lower bound for conditional
    networks); widths no machine could hold count the middle blocks' four 3 × 3 convolutions alone."""
    widest = model_config.dim * model_config.dim_mults[-1]
    lower_bound = 4 * 9 * widest ** 2
    if lower_bound > 2 ** 50:  # 10¹⁵ parameters: more than any machine holds, and past what meta shapes can count
        return lower_bound
    with torch.device("meta"):
        return sum(p.numel() for p in build_unet(dataclasses.replace(model_config, num_classes=None)).parameters())


SCHEDULE_BYTES_PER_STEP = 15 * (8 + 4)  # Diffusion's 15 per-t tables, built in float64 and kept in float32
TRAINING_COPIES = 5                     # weights, their gradients, the EMA and AdamW's two moments, float32 each
ACTIVATION_BYTES = 2                    # the least a stored activation takes (bf16 / fp16 autocast)


def memory_needs(model_config, timesteps, side, sample_batch, kept, training, evaluations=1):
    """A run's lower-bound needs [(bytes, what, flag that lowers it)]: weights (training: gradients, EMA, moments),
    the schedule, one sampling batch of `evaluations` halves, and the images the job keeps, kept = (count, its flag)."""
    params = parameter_count(model_config)
    copies = TRAINING_COPIES if training else 1
    dims = [model_config.dim * m for m in model_config.dim_mults]
    stage_inputs = [model_config.dim] + dims[:-1]                   # channels of each stage's skips (or more)
    skips = model_config.dim * side ** 2 + sum(model_config.num_res_blocks * d * (side // 2 ** i) ** 2
                                               for i, d in enumerate(stage_inputs))
    image = model_config.channels * side ** 2
    count, flag = kept
    return [(params * 4 * copies, f"for {params:,} parameters{' while training' if training else ''}",
             "--dim or --dim_mults"),
            (timesteps * SCHEDULE_BYTES_PER_STEP, f"for the noise schedule of T = {timesteps:,}", "--timesteps"),
            (sample_batch * evaluations * (skips * ACTIVATION_BYTES + 4 * image * 4),
             f"for a sampling batch of {sample_batch:,}", "--sample_batch"),
            (count * image * 4, f"to hold {count:,} images", flag)]


def check_run_memory(device, sample_batch, model_config, timesteps, side, kept, training, evaluations=1):
    """UserError before anything is allocated when memory_needs exceed the device's (and machine's) memory; on CUDA
    only one image of a sampling batch must fit (generate halves batches)."""
    batch = 1 if device.type == "cuda" else min(sample_batch, kept[0])
    needs = memory_needs(model_config, timesteps, side, batch, kept, training, evaluations)
    check_memory(needs[:3], device, needs[3:])


# --------------------------------------------------------------------------------- signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stops():
    """Further SIGINT / SIGTERM change nothing: a stop is under way, or the job is over (Python, shutting down, would
    die of one: exit status −15 instead of the job's)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def stop_raised(signum):
    """What a stop signal raises, later ones ignored: KeyboardInterrupt for SIGINT, StopRequested for SIGTERM."""
    ignore_stops()
    raise KeyboardInterrupt if signum == signal.SIGINT else StopRequested(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals(final=False):
    """Inside the block SIGINT raises KeyboardInterrupt and SIGTERM StopRequested at once (one line, exit 130), the
    first one only; SignalFlag takes over while a run trains. After it the handlers are restored, or with `final` (the
    process ends) stops are ignored. Outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: stop_raised(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if final else handler)


class SignalFlag:
    """SIGINT / SIGTERM during a run: between training steps a flag checked after every step, so ranks stop
    together; elsewhere in a single process StopRequested at once (immediate). A second signal stops at once."""

    def __init__(self, immediate=True):
        self.received, self.previous, self.immediate = None, {}, immediate

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        second = self.received is not None
        self.received = signal.Signals(signum).name
        if self.immediate or second:
            ignore_stops()
            raise StopRequested(self.received)

    @contextlib.contextmanager
    def between_steps(self):
        """While training steps run: a signal only sets the flag, for the caller to check."""
        immediate, self.immediate = self.immediate, False
        try:
            yield
        finally:
            self.immediate = immediate

    @contextlib.contextmanager
    def deferred(self):
        """A block that must finish once begun (a record and its checkpoint): a signal during it stops after it."""
        with self.between_steps():
            yield
        if self.immediate and self.received:
            raise StopRequested(self.received)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
