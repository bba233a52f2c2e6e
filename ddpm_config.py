"""Every setting, declared once: its flag, default, help, check (range or choices) and what a resume may do with it.

From SETTINGS come the command line (ddpm_flags.py: the parser grouped by SECTIONS, the checks of the flags,
docs/flags.md), the checks of a checkpoint's stored config (config_problem) and the resume rules (FIXED_SETTINGS,
ADJUSTABLE_SETTINGS, RUN_SETTINGS, the sampling settings). The resolved config of a run (training_config) is what
every checkpoint carries, each setting once: inference rebuilds the network and the diffusion from it alone
(build_model, build_diffusion).

To add a setting: one Setting below (its section, help, check and `stored` kind), then its use (docs/contributing.md).
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass

from ddpm_data import CIFAR10_CLASSES, DATASETS, DEFAULT_DATA_DIR, model_side
from ddpm_diffusion import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SAMPLING_STEPS,
    LOSS_TYPES,
    PREDICTIONS,
    SAMPLERS,
    SCHEDULES,
    SPACINGS,
    VARIANCES,
    Diffusion,
    SamplerSettings,
    make_schedule,
)
from ddpm_editing import EDIT_IMAGES, EDITING_STEPS, MASK_SHAPES
from ddpm_fid import INCEPTION, IS_SPLITS, REFERENCE_SPLITS
from ddpm_helpers import UserError
from ddpm_interop import PUBLISHED
from ddpm_model import ARCHITECTURES, RESBLOCKS, UNetConfig, build_unet
from ddpm_pictures import MAX_CLASS_ROWS, STRIP_COLUMNS, STRIP_ROWS
from ddpm_presets import PRESETS
from ddpm_runtime import COMPILE_CHOICES, PRECISIONS
from ddpm_train_step import EVAL_IMAGES, LOG_LINE_SECONDS, LR_DECAYS

# What a resume does with a stored setting (Setting.stored):
FIXED = "fixed"            # what the run trains: a resumed run keeps its checkpoint's, a flag that differs is an error
ADJUSTABLE = "adjustable"  # how long and how fast: a resumed run takes a flag given, else its checkpoint's
RUN = "run"                # every run, resumed or not, takes it from its own command line (and torchrun)
SAMPLING = "sampling"      # how to sample (config['sampling'], SamplerSettings): the flag, else the checkpoint's
# What a command does (ddpm_main.job_of); a flag given for a job it does nothing in is refused (Setting.jobs)
TRAIN, INFERENCE, IMPORT, EXPORT = "train", "inference", "import", "export"
JOB_WORDS = {TRAIN: "training", INFERENCE: "--inference", IMPORT: "--import_weights", EXPORT: "--export_diffusers"}
RESUME_WORDS = {FIXED: "kept (fixed)", ADJUSTABLE: "may change", RUN: "per run", SAMPLING: "may change"}


@dataclass(frozen=True)
class Range:
    """The numbers a setting may take: low/high bounds (None: none), each closed unless open_*; zero_is_off lets 0
    through as 'off'; words replace the generated phrase where it would say less."""
    low: float = None
    high: float = None
    open_low: bool = False
    open_high: bool = False
    zero_is_off: bool = False
    words: str = None

    def holds(self, v):
        if self.zero_is_off and v == 0:
            return True
        return ((self.low is None or (v > self.low if self.open_low else v >= self.low))
                and (self.high is None or (v < self.high if self.open_high else v <= self.high)))

    def phrase(self):
        """As a flag's error says it: 'at least 1', 'greater than 0', 'in [0, 1)', '0 or more'."""
        if self.words:
            return self.words
        if self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.open_low:
            return f"greater than {self.low:g}"
        return "0 or more" if self.low == 0 else f"at least {self.low:g}"

    def symbols(self):
        """As a config check says it: '≥ 1', '> 0', 'in [0, 1)'."""
        if self.words or self.high is not None:
            return self.phrase()
        return f"{'>' if self.open_low else '≥'} {self.low:g}"


def flag_text(value):
    """A setting's value as it is written on the command line (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def comma_list(kind, what):
    """An argparse type: comma-separated values of `kind` (`what` names one: 'integer', 'number'), at least one."""
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {what}")
        return values
    return parse


int_list = comma_list(int, "integer")
float_list = comma_list(float, "number")


def noise_interval(text):
    """--guidance_interval: 'LO,HI', two noise levels 0 ≤ LO < HI (HI may be inf), or 'all' (every step)."""
    if text.strip() == "all":
        return (0.0, math.inf)
    try:
        interval = tuple(float(v) for v in text.split(","))
        SamplerSettings(guidance_interval=interval)  # the one check of what an interval may be
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 ≤ LO < HI (HI may be inf), or all; got {text!r}") \
            from None
    return interval


@dataclass(frozen=True)
class Value:
    """What a value read back from a file may be — a setting's in a checkpoint's config (Setting.value), a sampler
    setting, a last.pt's training state, an optimizer's hyper-parameter — checked by one function (problem) and said
    in one phrase (words): its kind, range or choices, whether None stands for 'off', and for a list its items."""
    kind: type                # int, float, bool, str, or dict (a record of `fields`)
    check: Range = None       # for numbers: the range
    choices: tuple = None     # for text: the values it may take
    optional: bool = False    # None allowed
    many: bool = False        # a list (or tuple) of such values
    length: int = None        # a list's exact length; None: any, at least min_items
    min_items: int = 1
    infinite: bool = False    # ±inf allowed (never NaN)
    fields: dict = None       # a record's entries: {key: Value}; keys it lacks are not checked (older files)
    closed: bool = False      # a record that may hold no other keys
    what: str = None          # the words, where the generated ones would say less

    def words(self):
        """'a whole number ≥ 1', 'none or one of l1, l2', 'a list of numbers ≥ 0', 'two numbers in [0, 1)'."""
        if self.what:
            return f"none or {self.what}" if self.optional else self.what
        if self.kind is bool:
            words = "true or false"
        elif self.choices:
            words = f"one of {', '.join(self.choices)}"
        elif self.kind in (int, float):
            words = ("a whole number" if self.kind is int else "a number") + (
                f" {self.check.symbols()}" if self.check else "")
        else:
            words = "text"
        if self.many:
            count = {2: "two"}.get(self.length, "a list of")
            words = f"{count} {words[2:].replace('number', 'numbers')}"
        return f"none or {words}" if self.optional else words

    def problem(self, value, name):
        """What is wrong with `value`, stored under `name` (None: nothing): '<name> is <value>, not <words>', or for
        a record the first entry that is wrong, named '<name>.<key>'."""
        if not self.holds(value):
            return f"{name} is {short_repr(value)}, not {self.words()}"
        if self.fields and value is not None:
            unknown = [key for key in value if key not in self.fields] if self.closed else []
            if unknown:
                return f"{name} holds {', '.join(map(str, unknown))}, not one of {', '.join(self.fields)}"
            return next(filter(None, (entry.problem(value[key], f"{name}.{key}") for key, entry in self.fields.items()
                                      if key in value)), None)
        return None

    def holds(self, value):
        if value is None:
            return self.optional
        if self.many:
            return (isinstance(value, (list, tuple)) and (len(value) == self.length if self.length else
                                                          len(value) >= self.min_items)
                    and all(self._one_holds(v) for v in value))
        return self._one_holds(value)

    def _one_holds(self, v):
        if self.kind is bool:
            return isinstance(v, bool)
        if self.kind is dict:
            return isinstance(v, dict)
        if self.kind is str:
            return isinstance(v, str) and (not self.choices or v in self.choices)
        typed = isinstance(v, int) if self.kind is int else isinstance(v, (int, float))
        return (typed and not isinstance(v, bool) and (math.isfinite(v) or self.infinite and not math.isnan(v))
                and (self.check is None or self.check.holds(v)))


def short_repr(value):
    """A value for a one-line message: its repr cut to 60 characters (a container's without walking all of it)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} entries"
    return f"{value!r:.60}"


@dataclass(frozen=True)
class Setting:
    """One setting: its flag --<name> (in --help under `section`), what it means and may be, and how it is kept."""
    name: str
    section: str
    help: str                 # one line of --help
    default: object = None
    parse: object = str       # argparse's type: int, float, int_list, …; bool for a switch (--flag sets True)
    choices: tuple = None
    check: Range = None       # for numbers (each number of a list): the range; None: any
    stored: str = None        # FIXED, ADJUSTABLE, RUN or SAMPLING: in the checkpoint's config; None: not stored
    optional: bool = False    # the config may hold None for it (off, or 'the default')
    field: str = None         # the SamplerSettings field of a SAMPLING setting (None: the same name)
    metavar: str = None
    what: str = None          # for text: what the config holds, e.g. 'a folder'
    more: str = ""            # docs/flags.md's further words
    flag: bool = True         # False: not a flag (world_size comes from torchrun)
    means: tuple = None       # a synonym kept for older scripts, (flag, value) it stands for: accepted, not in --help
    stored_as: Value = None   # what the config holds, where the flag's parse, check and choices do not say it
    used_in: tuple = None     # the jobs the flag does something in (None: its section's, SECTION_JOBS)
    needs: tuple = None       # flags one of which must be given with it (None: none)

    @property
    def jobs(self):
        return self.used_in or SECTION_JOBS[self.section]

    @property
    def is_path(self):
        """Whether the flag names a file or folder (an empty one is refused)."""
        return (self.metavar or "").split("|")[0] in ("DIR", "PATH", "CKPT", "NPZ")

    @property
    def hidden(self):
        return self.means is not None

    @property
    def value(self):
        """What a checkpoint's config may hold for this setting: the flag's own type, range and choices."""
        if self.stored_as is not None:
            return self.stored_as
        many = self.parse in (int_list, float_list)
        kind = {int_list: int, float_list: float}.get(self.parse, self.parse)
        return Value(kind if kind in (int, float, bool) else str, self.check, self.choices, self.optional, many,
                     what=self.what)

    def entry_words(self):
        """What a checkpoint's config must hold for it, e.g. 'a whole number ≥ 1', 'none or one of l1, l2, huber'."""
        return self.value.words()

    def entry_holds(self, value):
        """Whether a checkpoint's config entry `value` is what this setting may be: its type, choices and range."""
        return self.value.holds(value)


AT_LEAST_ONE = Range(1)
POSITIVE = Range(0, open_low=True)
NOT_NEGATIVE = Range(0)
MAX_RES_BLOCKS = 64  # per stage: published U-Nets use 2 to 4; more would take minutes just to build
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch's generators take (a negative seed is taken modulo 2⁶⁴)

# (title, description) of the groups --help shows, in its order
SECTIONS = {
    "training": ("training", None),
    "diffusion": ("diffusion", None),
    "network": ("network (the U-Net)", None),
    "data": ("data", None),
    "files": ("files, checkpoints and logs", None),
    "inference": ("inference", None),
    "editing": ("editing real images (inference, instead of sampling)", None),
    "sampling": ("sampling (inference, the per-epoch grids and FID)",
                 "A checkpoint carries its sampling settings; these flags override them."),
    "evaluation": ("evaluation: FID, Inception Score and the bound", None),
    "foreign": ("foreign weights (docs/paper.md)", None),
    "machine": ("machine", None),
}

# the jobs a section's flags do something in, unless a flag says otherwise (Setting.used_in)
ALL_JOBS, SAMPLING_JOBS = (TRAIN, INFERENCE, IMPORT, EXPORT), (TRAIN, INFERENCE)
SECTION_JOBS = {"training": (TRAIN,), "diffusion": (TRAIN,), "network": (TRAIN,), "data": SAMPLING_JOBS,
                "files": (TRAIN,), "inference": (INFERENCE,), "editing": (INFERENCE,),
                "sampling": (TRAIN, INFERENCE, IMPORT),
                "evaluation": SAMPLING_JOBS, "foreign": (IMPORT,), "machine": SAMPLING_JOBS}

S = Setting
SETTINGS = (
    # training
    S("preset", "training", "a named recipe for a new run; flags given beside it win", choices=tuple(PRESETS),
      more="Each preset's flags are listed under 'Presets' below."),
    S("lr", "training", "AdamW learning rate (after warm-up)", 0.003, float, check=POSITIVE, stored=ADJUSTABLE),
    S("lr_decay", "training", "after warm-up: constant, or cosine to 0 by the end", "none", choices=LR_DECAYS,
      stored=ADJUSTABLE, more="The end is --epochs, or what --time_budget_min leaves for training."),
    S("warmup_steps", "training", "linear learning-rate warm-up, in steps", 200, int, check=NOT_NEGATIVE,
      stored=ADJUSTABLE, metavar="N", more="Ho et al. warm up over 5,000; 0 is the seed's behaviour."),
    S("weight_decay", "training", "AdamW's decoupled weight decay (0: Adam)", 0.01, float, check=NOT_NEGATIVE,
      stored=ADJUSTABLE, metavar="X", more="The paper's is Adam."),
    S("epochs", "training", "passes over the training split (45,000 for CIFAR-10)", 5, int, check=AT_LEAST_ONE,
      stored=ADJUSTABLE, metavar="N", more="The training split is 90 % of the training images; the rest validates."),
    S("batch_size", "training", "images per forward pass (per rank under torchrun)", 64, int, check=AT_LEAST_ONE,
      stored=FIXED, metavar="N"),
    S("grad_accum", "training", "micro-batches of --batch_size summed per optimizer step", 1, int,
      check=AT_LEAST_ONE, stored=FIXED, metavar="K",
      more="A step's batch is K × --batch_size (× ranks) in the memory of one --batch_size; the lr schedule, EMA, "
           "--log_interval, the time budget, checkpoints and resume count optimizer steps."),
    S("time_budget_min", "training", "the whole run's minutes; training stops in time", None, float,
      check=POSITIVE, stored=ADJUSTABLE, optional=True, metavar="MIN",
      more="Evaluation, pictures, checkpoints, --eval_fid and --eval_nll included (a resumed run counts what it "
           "used before): training stops when what is left covers only the end-of-run work, estimated from the "
           "measured speed. Default: no limit."),
    S("ema_decay", "training", "EMA decay of the weights sampled from; 0: off", 0.999, float,
      check=Range(0, 1, open_high=True), stored=FIXED, metavar="X",
      more="The EMA weights are used for evaluation, grids, FID and inference; warm-up: min(decay, (1+n)/(10+n))."),
    S("conditional", "training", "class-conditional (classifier-free guidance)", False, bool, stored=FIXED,
      used_in=SAMPLING_JOBS,
      more="At inference: class-guided samples from a conditional model."),
    S("p_uncond", "training", "probability a label is dropped to the null label", 0.1, float, check=Range(0, 1),
      stored=FIXED, metavar="P"),
    S("resume", "training", "continue a last.pt ('auto': this run's) with its settings", metavar="PATH|auto",
      more="'auto' is <models_dir>/<run_name>/last.pt. What a resume may change is the 'on --resume' column."),
    # diffusion
    S("timesteps", "diffusion", "T, the number of diffusion steps", 100, int, check=AT_LEAST_ONE, stored=FIXED,
      metavar="T"),
    S("schedule", "diffusion", "noise schedule β_t", "cosine", choices=SCHEDULES, stored=FIXED,
      more="cosine: Nichol & Dhariwal 2021; linear and sigmoid: Ho et al.'s range 1e-4 … 0.02 scaled by 1000/T."),
    S("prediction", "diffusion", "the network predicts ε or v = √ᾱ ε − √(1−ᾱ) x_0", "eps", choices=PREDICTIONS,
      stored=FIXED, more="ε: Ho et al.; v: Salimans & Ho 2022."),
    S("loss_type", "diffusion", "norm of ε − ε_θ (or v − v_θ)", "l2", choices=LOSS_TYPES, stored=FIXED),
    S("min_snr_gamma", "diffusion", "Min-SNR-γ loss weighting, e.g. 5 (default: uniform)", None, float,
      check=POSITIVE, stored=FIXED, optional=True, metavar="γ", more="Hang et al. 2023."),
    # network
    S("architecture", "network", "compact (this tool's) or ddpm (Ho et al.'s)", UNetConfig.architecture,
      choices=tuple(ARCHITECTURES),
      stored=FIXED,
      more="compact: channels change in the resampling convolutions, one attention per stage. ddpm: channels change "
           "in a stage's first block, attention after every block, one block more per up-stage, 3 × 3 strided "
           "down-sampling."),
    S("dim", "network", "base channels, a multiple of --groups", UNetConfig.dim, int, check=AT_LEAST_ONE,
      stored=FIXED, metavar="C"),
    S("dim_mults", "network", "channel multipliers, one per stage", flag_text(list(UNetConfig.dim_mults)), int_list,
      check=AT_LEAST_ONE, stored=FIXED, metavar="M,...",
      more="Each stage after the first halves the image, which is padded when its sides do not halve that often "
           "(docs/datasets.md)."),
    S("num_res_blocks", "network", "ResNet blocks per stage (ddpm: +1 going up)", UNetConfig.num_res_blocks, int,
      check=Range(1, MAX_RES_BLOCKS), stored=FIXED, metavar="N"),
    S("attn_resolutions", "network", "image sides with self-attention, e.g. 16", None, int_list, check=AT_LEAST_ONE,
      stored=FIXED, optional=True, metavar="SIDE,...",
      more="Default: every stage after the first; a side no stage has is refused."),
    S("dropout", "network", "dropout in each ResNet block", UNetConfig.dropout, float,
      check=Range(0, 1, open_high=True), stored=FIXED, metavar="P",
      more="Before the block's second convolution (the paper: 0.1)."),
    S("resblock", "network", "how the time embedding enters a block", UNetConfig.resblock, choices=RESBLOCKS,
      stored=FIXED,
      more="film: a scale and shift after the block's second GroupNorm; add: added after its first convolution "
           "(Ho et al.)."),
    S("groups", "network", "GroupNorm groups", UNetConfig.groups, int, check=AT_LEAST_ONE, stored=FIXED,
      metavar="G", more="The paper: 32; --dim must be a multiple."),
    S("norm_eps", "network", "GroupNorm's ε (Ho et al.: 1e-6)", UNetConfig.norm_eps, float, check=POSITIVE,
      stored=FIXED, metavar="ε"),
    # data
    S("data_dir", "data", "an image-folder tree, or where --dataset downloads to", stored=RUN, what="a folder",
      used_in=(TRAIN, INFERENCE, IMPORT),
      metavar="DIR",
      more="A folder tree is train/<class>/*.png and test/<class>/*.png. Default: ./data; at inference, the folder "
           "the model was trained on."),
    S("dataset", "data", "what --data_dir holds", choices=DATASETS,
      more="A torchvision dataset (downloaded when missing) or an image folder. Default: folder when --data_dir "
           "holds train/ and test/, else cifar10; at inference, the model's."),
    # files, checkpoints and logs
    S("run_name", "files", "names checkpoints and outputs (default: DDPM)", stored=RUN, what="a name", metavar="NAME",
      used_in=(TRAIN, INFERENCE, IMPORT),
      more="Never a path: letters A-Z a-z, digits, _, - and . (not . or .. alone), at most 217 characters, so that "
           "the longest file made from it fits a file system's 255. At inference: the --model_path folder's name for "
           "a ckpt.pt, last.pt or best.pt, else the file's."),
    S("models_dir", "files", "checkpoints go to <models_dir>/<run_name>/", "models", metavar="DIR",
      used_in=(TRAIN, IMPORT)),
    S("save_dir", "files", "grids, samples and JSON go here", "outputs", metavar="DIR", used_in=SAMPLING_JOBS),
    S("save_model", "files", "also write <models_dir>/<run_name>/ckpt.pt at the end", False, bool),
    S("checkpoint_every", "files", "epochs between last.pt writes", 1, int, check=AT_LEAST_ONE, metavar="N",
      more="The last epoch, interruptions and evaluations always write one."),
    S("checkpoint_minutes", "files", "also write last.pt after this many minutes", 10, float, check=POSITIVE,
      metavar="MIN", more="Mid-epoch included: a killed run loses at most this much."),
    S("eval_every", "files", "epochs between losses, grids and plots", 1, int, check=AT_LEAST_ONE, metavar="N",
      more=f"The validation and test losses are over {EVAL_IMAGES:,} images of each split; the last epoch always "
           "evaluates."),
    S("log_interval", "files", "steps between loss read-outs and NaN checks", 100, int, check=AT_LEAST_ONE,
      metavar="N", more=f"A progress bar; without a terminal, a log line at a read-out once {LOG_LINE_SECONDS} s have "
                          "passed."),
    S("tensorboard", "files", "also log to TensorBoard in DIR", metavar="DIR",
      more="Loss and lr at read-outs, img/s, validation/test losses, FID and the per-epoch grids; needs the "
           "tensorboard package (tensorboard --logdir DIR)."),
    # inference
    S("inference", "inference", "sample from --model_path instead of training", False, bool),
    S("model_path", "inference", "the checkpoint to sample from", metavar="CKPT", used_in=(INFERENCE, EXPORT)),
    S("num_samples", "inference", "images to generate (default: whole rows)", None, int, check=AT_LEAST_ONE,
      metavar="N",
      more="Default: 8 of each class for a conditional model, else 64; with --eval_fid, only FID's samples."),
    S("sample_classes", "inference", "class indices or names, e.g. 3,5 or cat,dog", metavar="C,...",
      more=f"With --conditional (or --guidance_sweep); checked against the checkpoint's classes, cycled to "
           f"--num_samples. Default: all the model's classes; a sweep's first {MAX_CLASS_ROWS}; the editing jobs: "
           "each test image's own (files and seeds need them)."),
    S("guidance_sweep", "inference", "one grid: a row per guidance scale", None, float_list, check=NOT_NEGATIVE,
      metavar="W,...", more="A column per class, every row from the same noise."),
    S("denoising_strip", "inference", "one grid of x̂_0 as the sampler goes", False, bool,
      more=f"A row per sample ({STRIP_ROWS}, or --num_samples), x̂_0 as the network predicts it at {STRIP_COLUMNS} "
           "evenly spaced steps of the sampler, x_T to x_0."),
    # editing real images
    S("inpaint", "editing", f"RePaint a region: {', '.join(MASK_SHAPES)} or a PNG", metavar="SHAPE|PNG",
      more="centre: the middle square of half the side; left: the left half; strokes: random brush strokes (from "
           "--seed); a PNG of the images' size: white is filled, black kept. RePaint (Lugmayr et al. 2022): ancestral "
           "steps whose known region is the input noised to the same level, re-noised back up at jumps. Grid: the "
           "inputs, the region to fill, the results; and an npz. Only ancestral steps: a deterministic sampler cannot "
           "re-noise (docs/editing.md)."),
    S("jump_length", "editing", "RePaint's jump: levels back up", 5, int, check=AT_LEAST_ONE,
      metavar="J", needs=("inpaint",), more="Lugmayr et al.'s j (theirs: 10)."),
    S("jump_count", "editing", "RePaint's passes per jump (1: none)", 5, int, check=AT_LEAST_ONE,
      metavar="R", needs=("inpaint",), more="Lugmayr et al.'s r (theirs: 10); each adds (R − 1) · J evaluations per "
                                            "jump."),
    S("invert", "editing", "real images to x_T by DDIM and back; their PSNR", False, bool,
      more="DDIM with η = 0 run forwards (Song et al. 2021), then the DDIM sampler from the x_T it finds; w = 1 unless "
           "--guidance_scale is given. Grid (inputs, x_T, reconstructions), invert_<run>.json (PSNR) and an npz."),
    S("interpolate", "editing", "a strip between two images or seeds: A,B", metavar="A,B",
      more="Each end a test index, an image file or seed:N (that seed's noise); images through their DDIM-inverted "
           "x_T, spherical interpolation (slerp) between the two noises, each frame decoded by DDIM. With "
           "--conditional, each end's class (a test image's own, or --sample_classes C or C1,C2): between two classes "
           "the class blends too."),
    S("frames", "editing", "frames in the --interpolate strip", 8, int, check=Range(2),
      metavar="K", needs=("interpolate",), more="Its ends included."),
    S("images", "editing", "the images to edit: test indices or image files", metavar="I|FILE,...",
      needs=("inpaint", "invert"),
      more=f"Comma-separated; an index is into the test split of the model's data (its --data_dir, else the one it "
           f"was trained on). A file must be the model's image size. Default: {EDIT_IMAGES} test images spread over "
           "the split (--num_samples: how many)."),
    # sampling
    S("sampler", "sampling", "dpm++2m (default), ddim, or ddpm (all T steps)", choices=tuple(SAMPLERS), stored=SAMPLING,
      more="dpm++2m: DPM-Solver++(2M), second order (Lu et al. 2022); ddim: first order (Song et al. 2021); ddpm: "
           "all T ancestral steps (Ho et al. 2020), slow. dpm++2m at 15 steps reads the FID ddim reads at 25 "
           "(docs/sampling.md). A sampler other than the checkpoint's starts from its own "
           "defaults; the guidance scale and interval and the variance stay the checkpoint's."),
    S("sampling_steps", "sampling", f"network evaluations of dpm++2m and ddim ({DEFAULT_SAMPLING_STEPS})", None, int,
      check=AT_LEAST_ONE, stored=SAMPLING, optional=True, field="steps", metavar="N",
      more=f"T when T is smaller. --inpaint, --invert and --interpolate: their timesteps ({EDITING_STEPS})."),
    S("spacing", "sampling", "dpm++2m's steps evenly in λ (default) or in t", choices=SPACINGS, stored=SAMPLING,
      more="λ_t = log(√ᾱ_t / √(1−ᾱ_t)); lambda reads the better FID (BENCHMARKS.md)."),
    S("guidance_scale", "sampling", f"guidance w: 0 uncond., 1 cond., >1 more ({DEFAULT_GUIDANCE_SCALE})", None,
      float, check=NOT_NEGATIVE, stored=SAMPLING, metavar="W"),
    S("guidance_interval", "sampling", "apply w only at noise levels LO < σ ≤ HI", None, noise_interval,
      stored=SAMPLING, metavar="LO,HI|all",
      stored_as=Value(float, NOT_NEGATIVE, optional=True, many=True, length=2, infinite=True),
      more="σ_t = √(1−ᾱ_t)/√ᾱ_t (EDM's σ); the plain conditional prediction elsewhere, one forward instead of two "
           "(Kynkäänniemi et al. 2024). all: every step, the default."),
    S("eta", "sampling", "DDIM noise: 0 deterministic (default), 1 like DDPM", None, float, check=Range(0, 1),
      stored=SAMPLING, metavar="η"),
    S("variance", "sampling", "σ_t² of ddpm's steps: β̃_t (posterior) or β_t", choices=VARIANCES, stored=SAMPLING,
      more="posterior is the default; beta is Ho et al.'s CIFAR-10 samples and what an imported paper model "
           "carries."),
    S("sample_batch", "sampling", "images generated per forward batch", 1000, int, check=AT_LEAST_ONE, metavar="N",
      used_in=SAMPLING_JOBS,
      more="A batch the GPU cannot hold is retried at half the size, with one warning line."),
    # evaluation
    S("eval_fid", "evaluation", "FID and IS of N samples (after training, or at inference)", 0, int,
      check=Range(IS_SPLITS, zero_is_off=True, words=f"0 (off) or a sample count of at least {IS_SPLITS} (the "
                  "Inception Score's splits)"), metavar="N",
      more="Class-balanced when conditional; one pass of torch-fidelity's Inception-v3; published figures use "
           "50,000."),
    S("fid_inception", "evaluation", "the Inception weights file (default: fetched once)", metavar="PATH",
      more=f"torch-fidelity's {INCEPTION.file_name}; fetched on first use into $TORCH_HOME/hub/checkpoints and "
           "checked by SHA-256."),
    S("fid_ref", "evaluation", "the split FID compares with (Ho et al.: train)", "train", choices=REFERENCE_SPLITS),
    S("fid_ref_stats", "evaluation", "reference statistics (mu, sigma) instead", metavar="NPZ",
      more="An npz with mu (2048,) and sigma (2048, 2048), instead of the --fid_ref split's (docs/evaluation.md)."),
    S("eval_nll", "evaluation", "the bound on N test images, in bits/dim", 0, int,
      check=Range(0, words="0 (off) or an image count"), metavar="N",
      more="After training (null label), or at inference instead of sampling (--conditional: given each image's "
           "label); each term per t to nll_<run>.json and nll_terms_<run>.png; T network evaluations an image "
           "(docs/paper.md)."),
    S("nll_variance", "evaluation", "σ_t² in the bound (default: the sampler's)", choices=VARIANCES),
    # foreign weights
    S("import_weights", "foreign", f"Ho et al.'s network from a file, or {', '.join(PUBLISHED)}",
      metavar="PATH|NAME",
      more="pesser/pytorch_diffusion's state dict or a diffusers UNet2DModel folder, or a file fetched by name once; "
           "written to <models_dir>/<run_name>/ckpt.pt and sampled as the paper did (1,000 ancestral steps, σ_t² = "
           "β_t) unless sampling flags are given."),
    S("export_diffusers", "foreign", "write --model_path as a diffusers DDPMPipeline folder", metavar="DIR",
      used_in=(EXPORT,),
      more="The architecture ddpm; its EMA weights. DDPMPipeline.from_pretrained(DIR) loads it."),
    # machine
    S("seed", "machine", "random seed (same seed, same results on CPU)", 0, int, metavar="N",
      check=Range(*SEED_RANGE, words=f"in {SEED_RANGE[0]} … {SEED_RANGE[1]}, the random generator's range"),
      stored=FIXED),
    S("precision", "machine", "what the U-Net computes in", "auto", choices=PRECISIONS, stored=ADJUSTABLE,
      more="Weights, EMA, optimizer and checkpoints stay float32. auto: bf16 autocast where the hardware has bf16 "
           "(CUDA compute capability ≥ 8.0, CPUs with AVX512-BF16 or AMX), fp16 with a loss scaler on older GPUs, "
           "else fp32 (A100, H100 and RTX 30xx/40xx: bf16; T4, V100: fp16). The banner warns where a precision asked "
           "for is emulated. Resolved anew on each run's hardware (docs/speed.md)."),
    S("compile", "machine", "torch.compile the U-Net: auto is on CUDA only", "auto", choices=COMPILE_CHOICES,
      more="on: the CPU too (inductor: minutes of compiling, no faster on a 2-core CPU); off: eager. A failed compile "
           "warns once and runs eager."),
    S("no_compile", "machine", "the same as --compile off", False, bool, means=("compile", "off")),
    S("no_bf16", "machine", "the same as --precision fp32", False, bool, means=("precision", "fp32")),
    S("no_cuda", "machine", "run on the CPU even when CUDA is available", False, bool),
    S("quiet", "machine", "no progress bars or per-epoch lines", False, bool, used_in=ALL_JOBS),
    S("world_size", "machine", "ranks under torchrun", 1, int, check=AT_LEAST_ONE, stored=RUN, flag=False),
)
del S

BY_NAME = {setting.name: setting for setting in SETTINGS}
FLAGS = tuple(setting for setting in SETTINGS if setting.flag)
SYNONYMS = {setting.name: setting.means for setting in SETTINGS if setting.means}  # old switch: (flag, value)


def _stored(kind):
    return tuple(setting.name for setting in SETTINGS if setting.stored == kind)


# The config's keys, in five kinds (a test checks that every key is in exactly one). The network's settings are also
# the config's model entry (UNetConfig); a resume takes them from there.
MODEL_SETTINGS = tuple(name for name in _stored(FIXED) if name in UNetConfig.__dataclass_fields__)
FIXED_SETTINGS = _stored(FIXED)
ADJUSTABLE_SETTINGS = _stored(ADJUSTABLE)
RUN_SETTINGS = _stored(RUN)
SAMPLING_SETTINGS = ("sampling",)  # the SAMPLING settings, as one SamplerSettings dict
SAMPLING_FLAGS = {setting.name: setting.field or setting.name for setting in SETTINGS if setting.stored == SAMPLING}
COMMAND_LINE_SETTINGS = FIXED_SETTINGS + ADJUSTABLE_SETTINGS + RUN_SETTINGS  # what training_config takes from flags
# Derived from the settings and the data (data_facts): what the data is, its class names, channels and image size
# [H, W], and the side of the square the model works on (image_size: data_size padded to fit the stages).
DERIVED_KEYS = ("model", "num_classes", "dataset", "classes", "channels", "data_size", "image_size", "num_train",
                "num_val", "num_test", "global_batch_size")


# ----------------------------------------------------------------------------------- presets

def preset_flags(name):
    """A preset's flags as command-line text, e.g. '--dim 128 --dim_mults 1,2,2,2 …'."""
    return " ".join(f"--{flag} {flag_text(value)}" for flag, value in PRESETS[name][1].items())


def preset_network(name, image_size=32, channels=3, num_classes=None):
    """The UNetConfig of a preset's network for images of image_size: its flags over UNetConfig's defaults (which
    are the flags' defaults)."""
    flags = PRESETS[name][1]
    fields = {key: flags[key] for key in UNetConfig.__dataclass_fields__ if key in flags}
    return UNetConfig.from_dict({**fields, "image_size": image_size, "channels": channels, "num_classes": num_classes})


# ----------------------------------------------------------------------------------- the config

def training_config(flags, data_facts, saved_config=None, given=()):
    """The resolved config of a training run, saved in every checkpoint and in config.json: each stored setting once
    under its flag's name (the network's in the 'model' entry, UNetConfig's fields), DERIVED_KEYS and 'sampling'.

    flags: the command line's values by config key (every setting above), and 'sampling': the resolved
    SamplerSettings; data_facts: ddpm_data.data_facts and num_train, num_val, num_test. saved_config: the checkpoint's
    config when resuming, whose fixed settings win over the flags, and whose adjustable ones win over flags not
    `given` on the command line (a key it lacks, from an older version, falls back to the flag)."""
    chosen = {key: flags[key] for key in COMMAND_LINE_SETTINGS}
    if saved_config is not None:
        kept = FIXED_SETTINGS + tuple(key for key in ADJUSTABLE_SETTINGS if key not in given)
        saved = stored_settings(saved_config)
        chosen.update({key: saved.get(key, chosen[key]) for key in kept})
    classes = list(data_facts["classes"])
    side = model_side(data_facts["data_size"], len(chosen["dim_mults"]))
    model = UNetConfig.from_dict({**{key: chosen[key] for key in MODEL_SETTINGS}, "channels": data_facts["channels"],
                                  "num_classes": len(classes) if chosen["conditional"] else None, "image_size": side})
    check_attention_sides(model)
    model = dataclasses.replace(model, attn_resolutions=model.attention_sides())
    derived = {"model": model.to_dict(), "num_classes": model.num_classes, "dataset": data_facts["dataset"],
               "classes": classes, "channels": data_facts["channels"], "data_size": list(data_facts["data_size"]),
               "image_size": side, "num_train": data_facts["num_train"], "num_val": data_facts["num_val"],
               "num_test": data_facts["num_test"],
               "global_batch_size": chosen["batch_size"] * chosen["grad_accum"] * chosen["world_size"]}
    settings = {key: chosen[key] for key in COMMAND_LINE_SETTINGS if key not in MODEL_SETTINGS}  # the network's: once
    return {**derived, **settings, "sampling": dataclasses.asdict(flags["sampling"])}


def check_attention_sides(model):
    """UserError when --attn_resolutions names a side that no stage of the U-Net has."""
    sides = model.stage_sides()
    wrong = [side for side in model.attn_resolutions or () if side not in sides]
    if wrong:
        raise UserError(f"--attn_resolutions {flag_text(list(model.attn_resolutions))}: no stage works at "
                        f"{flag_text(wrong)} pixels a side; the stages of these {model.image_size}×{model.image_size} "
                        f"images work at {flag_text(sides)}")


def saved_model_settings(saved_config):
    """The model settings (MODEL_SETTINGS) of a checkpoint's network, from its model entry: those older checkpoints
    lack are the defaults they were built with."""
    model = UNetConfig.from_dict(saved_config["model"])
    return {key: flag_value(getattr(model, key)) for key in MODEL_SETTINGS}


def stored_settings(config):
    """A config's settings by flag name, the network's read from its model entry (where older configs also kept a
    copy at the top level)."""
    return {**config, **saved_model_settings(config)}


def flag_value(value):
    """A setting as the flags hold it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def fixed_setting_conflicts(saved_config, flags, given):
    """The fixed settings given on a resume's command line with values other than the checkpoint's:
    {key: (checkpoint's value, flag's value)}."""
    saved = stored_settings(saved_config)
    return {key: (saved[key], flags[key]) for key in FIXED_SETTINGS
            if key in given and key in saved and flags[key] != saved[key]}


def check_fixed_settings(saved_config, flags, given):
    """UserError naming the fixed settings a resume's command line gives other values than the checkpoint's."""
    conflicts = fixed_setting_conflicts(saved_config, flags, given)
    if conflicts:
        asked = ", ".join(f"--{key} {flag_text(value)}" for key, (_, value) in conflicts.items())
        kept = ", ".join(f"{key} {flag_text(saved_value)}" for key, (saved_value, _) in conflicts.items())
        raise UserError(f"--resume: {asked} differ from the run being resumed ({kept}); what the run trains cannot "
                        "change mid-run: drop them, or start a new run under another --run_name")


def trained_data(config):
    """The data facts (ddpm_data.data_facts) of what a config's model was trained on. Checkpoints from before they
    were stored held square colour images: CIFAR-10 when the class names are CIFAR-10's, else a folder."""
    classes, side = config.get("classes") or [], config["image_size"]
    return {"dataset": config.get("dataset") or ("cifar10" if classes == CIFAR10_CLASSES else "folder"),
            "classes": classes, "channels": config["model"].get("channels", 3),
            "data_size": config.get("data_size") or [side, side]}


def data_conflicts(saved_config, facts):
    """How the data a resumed run reads differs from what its checkpoint was trained on: {what: (checkpoint's,
    data's)} over the class names, the channels and the image size."""
    saved = trained_data(saved_config)
    return {key: (saved[key], facts[key]) for key in ("classes", "channels", "data_size") if saved[key] != facts[key]}


def resume_changes(saved_config, config):
    """The adjustable and sampling settings a resumed run changes: {key: (checkpoint's value, new value)}."""
    return {key: (saved_config.get(key), config[key]) for key in ADJUSTABLE_SETTINGS + SAMPLING_SETTINGS
            if saved_config.get(key) != config[key]}


def saved_sampler_settings(config):
    """The SamplerSettings a checkpoint's config carries; None for checkpoints written before they did."""
    return SamplerSettings(**config["sampling"]) if "sampling" in config else None


def build_model(config):
    """The U-Net the config describes, with freshly initialised weights."""
    return build_unet(UNetConfig.from_dict(config["model"]))


def build_diffusion(config, device):
    """The diffusion process the config describes: T, the β schedule, the prediction target, Min-SNR-γ."""
    return Diffusion(config["timesteps"], lambda T: make_schedule(config["schedule"], T), device,
                     prediction=config.get("prediction", "eps"), min_snr_gamma=config.get("min_snr_gamma"))


CIFAR10_TRAINED = {"dataset": "cifar10", "classes": CIFAR10_CLASSES, "channels": 3, "data_size": [32, 32],
                   "num_train": 50_000, "num_val": 0, "num_test": 10_000}  # what Ho et al. trained on: all 50,000


def imported_config(flags, imported, settings):
    """The config of an imported network: --preset ddpm_cifar10's recipe (what the paper trained it with) over the
    command line's values `flags` (by config key), the network and diffusion the file holds, CIFAR-10's data, and the
    sampling settings."""
    recipe = {key: value for key, value in PRESETS["ddpm_cifar10"][1].items() if key in COMMAND_LINE_SETTINGS}
    chosen = {**{key: flags[key] for key in COMMAND_LINE_SETTINGS}, **recipe,
              **{key: flag_value(getattr(imported.network, key)) for key in MODEL_SETTINGS},
              "timesteps": imported.timesteps, "schedule": imported.schedule, "prediction": imported.prediction,
              "conditional": False, "data_dir": flags["data_dir"] or DEFAULT_DATA_DIR, "sampling": settings}
    return training_config(chosen, CIFAR10_TRAINED)


# ------------------------------------------------------------- what a checkpoint's config must hold

ANY_SIZE = Value(int, AT_LEAST_ONE)
# What each config entry a checkpoint may hold must be: the stored settings' from their own declarations (what their
# flags are checked by), the derived entries' here. SAMPLING_NEEDS and RESUME_NEEDS name those that must be there.
SAMPLING_ENTRIES = {setting.field or setting.name: setting.value for setting in SETTINGS if setting.stored == SAMPLING}
MODEL_ENTRIES = {
    **{key: BY_NAME[key].value for key in MODEL_SETTINGS}, "channels": ANY_SIZE, "class_emb_dim": ANY_SIZE,
    "attn_heads": ANY_SIZE, "attn_dim_head": ANY_SIZE, "num_classes": Value(int, AT_LEAST_ONE, optional=True),
    "image_size": Value(int, AT_LEAST_ONE, optional=True)}
CONFIG_ENTRIES = {
    **{setting.name: setting.value for setting in SETTINGS if setting.stored in (FIXED, ADJUSTABLE, RUN)},
    "model": Value(dict, fields=MODEL_ENTRIES, what="the U-Net's settings (a dict)"),
    "image_size": ANY_SIZE, "num_classes": Value(int, AT_LEAST_ONE, optional=True),
    "classes": Value(str, many=True, min_items=0, what="a list of class names"), "channels": ANY_SIZE,
    "data_size": Value(int, AT_LEAST_ONE, many=True, length=2, what="[height, width]"),
    "dataset": Value(str, what="a name"),
    "sampling": Value(dict, fields=SAMPLING_ENTRIES, closed=True, what="sampler settings"),
}
SAMPLING_NEEDS = ("model", "timesteps", "schedule", "image_size")
RESUME_NEEDS = SAMPLING_NEEDS + ("run_name", "data_dir", "conditional", "num_classes", "loss_type", "batch_size",
                                 "grad_accum", "p_uncond", "ema_decay", "seed", "lr", "lr_decay", "warmup_steps",
                                 "epochs")
MAX_NESTING = 32  # the deepest a checkpoint's entries go (an optimizer's moments: 4)


def entries_problem(entries, needed, values, where):
    """What is wrong with a dict of stored values (None: nothing): an entry of `needed` missing, or one that is not
    what its Value in `values` says ('<where>'s <key> is …, not …'); entries without a Value are not checked."""
    missing = [key for key in needed if key not in entries]
    if missing:
        return f"{where} lacks {', '.join(missing)}"
    return next(filter(None, (value.problem(entries[key], f"{where}'s {key}") for key, value in values.items()
                              if key in entries)), None)


def nesting_problem(obj, where, limit=MAX_NESTING):
    """What is wrong with how deep the containers of `obj` go (None: nothing): an entry nested more than `limit`
    deep, found without recursion, so that no later walk (repr, JSON, a copy) runs out of stack."""
    stack = [(obj, 0, where)]
    while stack:
        value, depth, name = stack.pop()
        if depth > limit:
            return f"{name} is nested more than {limit} deep"
        if isinstance(value, dict):
            stack += [(v, depth + 1, name if depth else f"{where}'s {k}") for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [(v, depth + 1, name) for v in value]
    return None


def config_problem(config, needed=SAMPLING_NEEDS):
    """What makes a checkpoint's config unusable (None: nothing): an entry in `needed` missing, an entry that is not
    what it must be (CONFIG_ENTRIES: the settings' own declarations, MODEL_ENTRIES, SAMPLING_ENTRIES), or settings
    that contradict each other."""
    if not isinstance(config, dict):
        return "its config is not a dict"
    problem = (nesting_problem(config, "the config") or entries_problem(config, needed, CONFIG_ENTRIES, "the config")
               or entries_problem(config["model"], ("dim", "dim_mults"), MODEL_ENTRIES, "the model")
               or sampling_problem(config.get("sampling")))
    if problem:
        return problem
    model, classes = UNetConfig.from_dict(config["model"]), config.get("classes")
    if model.num_classes and classes is None:
        return f"the config lacks classes (the names of its model's {model.num_classes} classes)"
    if (model.dim % model.groups or model.num_classes != config.get("num_classes", model.num_classes)
            or (model.num_classes and classes is not None and len(classes) != model.num_classes)
            or (model.attn_resolutions is not None and model.image_size is None)):
        return ("the config's settings contradict each other (dim and groups, num_classes and classes, "
                "attn_resolutions without image_size)")
    return image_size_problem(config, model)


def sampling_problem(sampling):
    """What SamplerSettings refuses in a config's sampling entry whose values each passed their checks (a guidance
    interval whose ends are in the wrong order); None: nothing, or no entry."""
    try:
        SamplerSettings(**sampling) if sampling is not None else None
    except (TypeError, ValueError) as e:
        return f"the config's sampling is not sampler settings ({e})"
    return None


def image_size_problem(config, model):
    """What is wrong with the side the network works on (None: nothing): the config's and its model's differ, or
    it cannot be halved once per stage after the first."""
    side, unit = config["image_size"], 2 ** (len(model.dim_mults) - 1)
    if model.image_size is not None and model.image_size != side:
        return f"the config's image_size ({side}) and its model's ({model.image_size}) differ"
    if side % unit:
        return (f"the config's image_size is {side}, and its {len(model.dim_mults)} stages need at least {unit} pixels "
                f"a side, a multiple of {unit}")
    return None
