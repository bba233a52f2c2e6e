"""Every setting and every job, declared once: a setting's flag, default, help, check (range or choices), the jobs it
does something in and what a resume may do with it; a job's flag, what it needs and what runs it.

From SETTINGS and JOBS come the command line (ddpm_flags.py: the parser grouped by sections, the job a command asks
for, the checks of the flags, docs/flags.md), the checks of a checkpoint's stored config (ddpm_checkpoint, from each
setting's Value) and the resume rules (FIXED_SETTINGS, ADJUSTABLE_SETTINGS, RUN_SETTINGS, the sampling settings). The
resolved config of a run (training_config) is what every checkpoint carries, each setting once: inference rebuilds
the network and the diffusion from it alone (build_model, build_diffusion).

To add a setting: one Setting below, then its use; a job: one Job and the function it names (docs/contributing.md).
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass

from ddpm_data import DATASETS, model_side
from ddpm_diffusion import (DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLING_STEPS, LOSS_TYPES, PREDICTIONS, SAMPLERS,
                            SCHEDULES, SPACINGS, VARIANCES, Diffusion, SamplerSettings, make_schedule)
from ddpm_fid import IS_SPLITS, REFERENCE_SPLITS
from ddpm_helpers import UserError
from ddpm_jobs import (EDIT_IMAGES, EDITING_STEPS, FLAG_SAMPLED, INFERENCE, JOB, MASK_SHAPES, SAMPLES, SEED_RANGE,
                       image_items, mask_item)
from ddpm_model import ARCHITECTURES, RESBLOCKS, UNetConfig, build_unet
from ddpm_presets import PRESETS
from ddpm_runtime import COMPILE_CHOICES, PRECISIONS

READS, WRITES = "reads", "writes"  # what a flag's path is (Setting.io)
LR_DECAYS = ("none", "cosine")  # after warm-up: constant, or cosine-decayed to 0 (ddpm_train_step.learning_rate)
# What a resume does with a stored setting (Setting.stored):
FIXED = "fixed"            # what the run trains: a resumed run keeps its checkpoint's, a flag that differs is an error
ADJUSTABLE = "adjustable"  # how long and how fast: a resumed run takes a flag given, else its checkpoint's
RUN = "run"                # every run, resumed or not, takes it from its own command line (and torchrun)
SAMPLING = "sampling"      # how to sample (config['sampling'], SamplerSettings): the flag, else the checkpoint's
RESUME_WORDS = {FIXED: "kept (fixed)", ADJUSTABLE: "may change", RUN: "per run", SAMPLING: "may change"}


# the jobs a section's flags do something in, unless a flag says otherwise (Setting.used_in)
SECTION_JOBS = {"training": ("train",), "diffusion": ("train",), "network": ("train",), "data": SAMPLES,
                "files": ("train",), "inference": INFERENCE, "editing": INFERENCE, "sampling": FLAG_SAMPLED,
                "evaluation": SAMPLES, "foreign": ("import",), "machine": SAMPLES}


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
class_list = comma_list(str.strip, "class index or name")  # checked against a checkpoint's classes when it loads


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
    """What a value read back from a file may be (a stored setting, a training state entry, an optimizer's
    hyper-parameter): checked by problem, said by words."""
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
        """What is wrong with `value`, stored under `name` (None: nothing); for a record, its first wrong entry."""
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
    section: str              # its group in --help (ddpm_flags.SECTIONS)
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
    excludes: tuple = None    # flags that cannot be given with it (None: none)
    io: str = None            # READS: names files read (a path, or Items); WRITES: a folder written in. Checked before
                              # anything runs; no output is written over a file read (ddpm_helpers.make_way)

    @property
    def jobs(self):
        return self.used_in or SECTION_JOBS[self.section]

    @property
    def is_path(self):
        """Whether the flag names a file or folder (an empty one is refused)."""
        return (self.metavar or "").split("|")[0] in ("DIR", "PATH", "CKPT", "NPZ")

    @property
    def asks_for(self):
        """The job this flag asks for (None: none)."""
        return next((job for job in JOB.values() if job.flag == self.name), None)

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


AT_LEAST_ONE = Range(1)
POSITIVE = Range(0, open_low=True)
NOT_NEGATIVE = Range(0)
MAX_TIMESTEPS = 100_000  # T: 25 times the most published models use; the schedule's tables then take 18 MB
MAX_JUMP_COUNT = 100  # RePaint's r: ten times Lugmayr et al.'s; the evaluations grow with it, not the results
MAX_RES_BLOCKS = 64  # per stage: published U-Nets use 2 to 4; more would take minutes just to build

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
      used_in=SAMPLES,
      more="At inference: class-guided samples from a conditional model."),
    S("p_uncond", "training", "probability a label is dropped to the null label", 0.1, float, check=Range(0, 1),
      stored=FIXED, metavar="P"),
    S("resume", "training", "continue a last.pt ('auto': this run's) with its settings", metavar="PATH|auto",
      more="'auto' is <models_dir>/<run_name>/last.pt. What a resume may change is the 'on --resume' column."),
    # diffusion
    S("timesteps", "diffusion", "T, the number of diffusion steps", 100, int, check=Range(1, MAX_TIMESTEPS),
      stored=FIXED, metavar="T", more="Published models use 1,000 to 4,000."),
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
    S("norm_eps", "network", "GroupNorm's ε (Ho et al.: 1e-6)", UNetConfig.norm_eps, float,
      check=Range(0, 1, open_low=True), stored=FIXED, metavar="ε"),
    # data
    S("data_dir", "data", "an image-folder tree, or where --dataset downloads to", stored=RUN, what="a folder",
      used_in=("import", *SAMPLES), metavar="DIR",
      more="A folder tree is train/<class>/*.png and test/<class>/*.png. Default: ./data; at inference, the folder "
           "the model was trained on."),
    S("dataset", "data", "what --data_dir holds", choices=DATASETS,
      more="A torchvision dataset (downloaded when missing) or an image folder. Default: folder when --data_dir "
           "holds train/ and test/, else cifar10; at inference, the model's."),
    # files, checkpoints and logs
    S("run_name", "files", "names checkpoints and outputs (default: DDPM)", stored=RUN, what="a name", metavar="NAME",
      used_in=("import", *SAMPLES),
      more="Never a path: letters A-Z a-z, digits, _, - and . (not . or .. alone), at most 217 characters, so that "
           "the longest file made from it fits a file system's 255. At inference: the --model_path folder's name for "
           "a ckpt.pt, last.pt or best.pt, else the file's."),
    S("models_dir", "files", "checkpoints go to <models_dir>/<run_name>/", "models", metavar="DIR",
      used_in=("train", "import", "fit"), io=WRITES),
    S("save_dir", "files", "grids, samples and JSON go here", "outputs", metavar="DIR", used_in=SAMPLES, io=WRITES),
    S("save_model", "files", "also write <models_dir>/<run_name>/ckpt.pt at the end", False, bool),
    S("checkpoint_every", "files", "epochs between last.pt writes", 1, int, check=AT_LEAST_ONE, metavar="N",
      more="The last epoch, interruptions and evaluations always write one."),
    S("checkpoint_minutes", "files", "also write last.pt after this many minutes", 10, float, check=POSITIVE,
      metavar="MIN", more="Mid-epoch included: a killed run loses at most this much."),
    S("eval_every", "files", "epochs between losses, grids and plots", 1, int, check=AT_LEAST_ONE, metavar="N",
      more="The validation and test losses are over the same images of each split every time; the last epoch always "
           "evaluates."),
    S("log_interval", "files", "steps between loss read-outs and NaN checks", 100, int, check=AT_LEAST_ONE,
      metavar="N", more="A progress bar; without a terminal, a log line at a read-out, at most one a minute."),
    S("tensorboard", "files", "also log to TensorBoard in DIR", metavar="DIR", io=WRITES,
      more="Loss and lr at read-outs, img/s, validation/test losses, FID and the per-epoch grids; needs the "
           "tensorboard package (tensorboard --logdir DIR)."),
    # inference
    S("inference", "inference", "sample from --model_path instead of training", False, bool),
    S("model_path", "inference", "the checkpoint to sample from", metavar="CKPT", used_in=(*INFERENCE, "export"),
      io=READS),
    S("num_samples", "inference", "images to generate (default: whole rows)", None, int, check=AT_LEAST_ONE,
      metavar="N",
      more="Default: 8 of each class for a conditional model, else 64; with --eval_fid, only FID's samples."),
    S("sample_classes", "inference", "class indices or names, e.g. 3,5 or cat,dog", parse=class_list, metavar="C,...",
      needs=("conditional", "guidance_sweep"),
      more="Checked against the checkpoint's classes, cycled to --num_samples. Default: all the model's classes (a "
           "sweep: as many as a grid's rows show); the editing jobs: each test image's own (files and seeds need "
           "them)."),
    S("guidance_sweep", "inference", "one grid: a row per guidance scale", None, float_list, check=NOT_NEGATIVE,
      metavar="W,...", more="A column per class, every row from the same noise."),
    S("denoising_strip", "inference", "one grid of x̂_0 as the sampler goes", False, bool,
      more="A row per sample (--num_samples of them, else a few), x̂_0 as the network predicts it at evenly spaced "
           "steps of the sampler, x_T to x_0."),
    S("fit_steps", "inference", "fit N sampling steps to the model: a new checkpoint", None, int, check=Range(2),
      metavar="N", excludes=("sampling_steps", "spacing", "sampling_timesteps"),
      more="Where dpm++ best follows a 100-step teacher from --num_samples noises (256), classes balanced (GITS, "
           "docs/sampling.md); to <models_dir>/<run>_fit<N>/ckpt.pt (or --run_name), which inference then uses."),
    # editing real images
    S("inpaint", "editing", f"RePaint a region: {', '.join(MASK_SHAPES)} or a PNG", parse=mask_item,
      metavar="SHAPE|PNG", io=READS,
      more="centre: the middle square of half the side; left: the left half; strokes: random brush strokes (from "
           "--seed); a PNG of the images' size: white is filled, black kept. RePaint (Lugmayr et al. 2022): ancestral "
           "steps whose known region is the input noised to the same level, re-noised back up at jumps. Grid: the "
           "inputs, the region to fill, the results; and an npz. Only ancestral steps: a deterministic sampler cannot "
           "re-noise (docs/editing.md)."),
    S("jump_length", "editing", "RePaint's jump: levels back up", 5, int, check=AT_LEAST_ONE,
      metavar="J", used_in=("inpaint",), more="Lugmayr et al.'s j (theirs: 10)."),
    S("jump_count", "editing", "RePaint's passes per jump (1: none)", 5, int, check=Range(1, MAX_JUMP_COUNT),
      metavar="R", used_in=("inpaint",), more="Lugmayr et al.'s r (theirs: 10); each adds (R − 1) · J evaluations per "
                                            "jump."),
    S("invert", "editing", "real images to x_T by DDIM and back; their PSNR", False, bool,
      more="DDIM with η = 0 run forwards (Song et al. 2021), then the DDIM sampler from the x_T it finds; w = 1 unless "
           "given. Grid (inputs, x_T, reconstructions), invert_<run>.json (PSNR) and an npz."),
    S("interpolate", "editing", "a strip between two images or seeds: A,B", parse=image_items(ends=True),
      metavar="A,B", excludes=("num_samples",), io=READS,
      more="Each end a test index, an image file or seed:N (that seed's noise); images through their DDIM-inverted "
           "x_T, spherical interpolation (slerp) between the two noises, each frame decoded by DDIM. With "
           "--conditional, each end's class (a test image's own, or --sample_classes C or C1,C2): between two classes "
           "the class blends too."),
    S("frames", "editing", "frames in the --interpolate strip", 8, int, check=Range(2),
      metavar="K", used_in=("interpolate",), more="Its ends included."),
    S("images", "editing", "the images to edit: test indices or image files", parse=image_items(),
      metavar="I|FILE,...", used_in=("inpaint", "invert"), excludes=("num_samples",), io=READS,
      more=f"Comma-separated; an index is into the test split of the model's data (its --data_dir, else the one it "
           f"was trained on). A file must be the model's image size. Default: {EDIT_IMAGES} test images spread over "
           "the split (--num_samples: how many)."),
    # sampling
    S("sampler", "sampling", "dpm++2m (default), dpm++3m, ddim, or ddpm (all T)", choices=tuple(SAMPLERS),
      stored=SAMPLING, more="dpm++2m and dpm++3m: DPM-Solver++(2M) and (3M), second and third order (Lu et al. "
                            "2022); ddim: first order (Song et al. 2021); ddpm: all T ancestral steps (Ho et al. "
                            "2020), slow. dpm++2m at 15 steps reads the FID ddim reads at 25 (docs/sampling.md). A sampler "
                            "other than the checkpoint's starts from its own defaults; the guidance scale and interval "
                            "and the variance stay the checkpoint's."),
    S("sampling_steps", "sampling", f"network evaluations of dpm++ and ddim ({DEFAULT_SAMPLING_STEPS})", None, int,
      check=AT_LEAST_ONE, stored=SAMPLING, optional=True, field="steps", metavar="N", used_in=("import", *SAMPLES),
      more=f"T when T is smaller. --inpaint, --invert and --interpolate: their timesteps ({EDITING_STEPS}). Given, "
           "it drops a checkpoint's fitted timesteps for --spacing's."),
    S("spacing", "sampling", "dpm++'s steps: lambda (default), time or karras", choices=SPACINGS, stored=SAMPLING,
      metavar="RULE", more="lambda: evenly in λ_t = log(√ᾱ_t / √(1−ᾱ_t)); time: in t; karras: σ_t^{1/7} evenly "
                           "from the model's σ_max to σ_min (Karras et al. 2022, ρ = 7). Given, it drops a "
                           "checkpoint's fitted timesteps."),
    S("sampling_timesteps", "sampling", "dpm++'s own timesteps, e.g. 999,500,0", None, int_list, check=NOT_NEGATIVE,
      stored=SAMPLING, optional=True, field="timesteps", metavar="T", excludes=("sampling_steps", "spacing"),
      more="Strictly decreasing, the first T − 1; one network evaluation each. --fit_steps finds them for a model and "
           "stores them in the checkpoint it writes, which the plain inference command then uses."),
    S("guidance_scale", "sampling", f"guidance w: 0 uncond., 1 cond., >1 more ({DEFAULT_GUIDANCE_SCALE})", None,
      float, check=NOT_NEGATIVE, stored=SAMPLING, metavar="W", used_in=("import", *SAMPLES)),
    S("guidance_interval", "sampling", "apply w only at noise levels LO < σ ≤ HI", None, noise_interval,
      stored=SAMPLING, metavar="LO,HI|all", used_in=("import", *SAMPLES),
      stored_as=Value(float, NOT_NEGATIVE, optional=True, many=True, length=2, infinite=True),
      more="σ_t = √(1−ᾱ_t)/√ᾱ_t (EDM's σ); the plain conditional prediction elsewhere, one forward instead of two "
           "(Kynkäänniemi et al. 2024). all: every step, the default."),
    S("eta", "sampling", "DDIM noise: 0 deterministic (default), 1 like DDPM", None, float, check=Range(0, 1),
      stored=SAMPLING, metavar="η"),
    S("variance", "sampling", "σ_t² of ddpm's steps: β̃_t (posterior) or β_t", choices=VARIANCES, stored=SAMPLING,
      more="posterior is the default; beta is Ho et al.'s CIFAR-10 samples and what an imported paper model "
           "carries."),
    S("sample_batch", "sampling", "images generated per forward batch", 1000, int, check=AT_LEAST_ONE, metavar="N",
      used_in=SAMPLES,
      more="A batch the GPU cannot hold is retried at half the size, with one warning line."),
    # evaluation
    S("eval_fid", "evaluation", "FID, KID, precision/recall, IS and copies of N samples (after training, or at "
                                "inference)", 0, int,
      check=Range(IS_SPLITS, zero_is_off=True, words=f"0 (off) or a sample count of at least {IS_SPLITS} (the "
                  "Inception Score's splits)"), metavar="N", used_in=("train", "fid"),
      more="Class-balanced when conditional; one pass of torch-fidelity's Inception-v3; FID with where a second "
           "draw lands, and the samples' nearest training images (docs/evaluation.md); published figures use 50,000."),
    S("fid_inception", "evaluation", "the Inception weights file (default: fetched once)", metavar="PATH",
      used_in=("train", "fid"), needs=("eval_fid",), io=READS,
      more="torch-fidelity's weights file; fetched on first use into $TORCH_HOME/hub/checkpoints and checked by "
           "SHA-256."),
    S("fid_ref", "evaluation", "the split FID compares with (Ho et al.: train)", "train", choices=REFERENCE_SPLITS,
      used_in=("train", "fid"), needs=("eval_fid",)),
    S("fid_ref_stats", "evaluation", "reference statistics (mu, sigma) instead", metavar="NPZ",
      used_in=("train", "fid"), needs=("eval_fid",), excludes=("fid_ref",), io=READS,
      more="An npz with mu (2048,) and sigma (2048, 2048), instead of the --fid_ref split's (docs/evaluation.md)."),
    S("eval_nll", "evaluation", "the bound on N test images, in bits/dim", 0, int,
      check=Range(0, words="0 (off) or an image count"), metavar="N", used_in=("train", "bound"),
      more="After training (null label), or at inference instead of sampling (--conditional: given each image's "
           "label); each term per t to nll_<run>.json and nll_terms_<run>.png; T network evaluations an image "
           "(docs/paper.md)."),
    S("nll_variance", "evaluation", "σ_t² in the bound (default: the sampler's)", choices=VARIANCES,
      used_in=("train", "bound"), needs=("eval_nll",)),
    # foreign weights
    S("import_weights", "foreign", "Ho et al.'s network from a file, or a published name", metavar="PATH|NAME",
      more="pesser/pytorch_diffusion's state dict or a diffusers UNet2DModel folder, or a file fetched by name once; "
           "written to <models_dir>/<run_name>/ckpt.pt and sampled as the paper did (1,000 ancestral steps, σ_t² = "
           "β_t) unless sampling flags are given."),
    S("export_diffusers", "foreign", "write --model_path as a diffusers DDPMPipeline folder", metavar="DIR",
      used_in=("export",), io=WRITES,
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
    S("quiet", "machine", "no progress bars or per-epoch lines", False, bool, used_in=tuple(JOB)),
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


def preset_flags(name):
    """A preset's flags as command-line text, e.g. '--dim 128 --dim_mults 1,2,2,2 …'."""
    return " ".join(f"--{flag} {flag_text(value)}" for flag, value in PRESETS[name][1].items())


# ----------------------------------------------------------------------------------- the config

def training_config(flags, data_facts, saved_config=None, given=()):
    """The resolved config of a training run, saved in every checkpoint and config.json: each stored setting once
    (the network's in 'model'), DERIVED_KEYS and 'sampling' (flags['sampling'], the resolved SamplerSettings)."""
    chosen = resolved_settings(flags, saved_config, given)
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
    """MODEL_SETTINGS of a checkpoint's network, from its model entry (older files: the defaults they were built)."""
    model = UNetConfig.from_dict(saved_config["model"])
    return {key: flag_value(getattr(model, key)) for key in MODEL_SETTINGS}


def stored_settings(config):
    """A config's settings by flag name, the network's read from its model entry."""
    return {**config, **saved_model_settings(config)}


def flag_value(value):
    """A setting as the flags hold it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def resolved_settings(flags, saved_config=None, given=()):
    """The settings a run trains with: the command line's `flags`; resumed, the checkpoint's fixed settings and its
    adjustable ones not `given`. UserError when a fixed setting given differs from the checkpoint's."""
    chosen = {key: flags[key] for key in COMMAND_LINE_SETTINGS}
    if saved_config is None:
        return chosen
    saved = stored_settings(saved_config)
    conflicts = [key for key in FIXED_SETTINGS if key in given and key in saved and chosen[key] != saved[key]]
    if conflicts:
        raise UserError(f"--resume: {', '.join(f'--{key} {flag_text(chosen[key])}' for key in conflicts)} differ from "
                        f"the run being resumed ({', '.join(f'{key} {flag_text(saved[key])}' for key in conflicts)}); "
                        "what the run trains cannot change mid-run: drop them, or start a new run under another "
                        "--run_name")
    kept = FIXED_SETTINGS + tuple(key for key in ADJUSTABLE_SETTINGS if key not in given)
    return {**chosen, **{key: saved.get(key, chosen[key]) for key in kept}}


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
