"""The jobs a command can do, declared once (like ddpm_diffusion.SAMPLERS): each one's flag, what it needs, how its
banner says it and the function that does it, named as 'module.function' and imported only when it runs (so that the
first picture never imports torch-fidelity or diffusers). ddpm_flags picks a command's job from the flags given and
derives the rules of the flags from it (a job of --inference goes with it, one per command; a flag that does nothing
in the job asked is refused); ddpm_main runs it. Also what the editing jobs' flags name (Item) and their defaults.

To add a job: one Job below and the function it names; its flag is a Setting in ddpm_config (docs/contributing.md).
"""
import argparse
import importlib
import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """One thing a command does: the flag that asks for it, what it needs, how its banner says it and the function
    that does it. ddpm_flags.job_asked picks a command's job; a flag given for a job it does nothing in (its Setting's
    jobs) is refused."""
    name: str                # how Setting.used_in names it
    flag: str                # the setting that asks for it; None: training, what a command asking for none does
    run: str                 # 'module.function' that does it, imported only then (torch-fidelity, diffusers: lazily)
    doing: str               # what its banner and messages say it does, e.g. 'inpainting'
    under: str = None        # the flag it goes with: a job of --inference is one of its jobs, one per command
    model: bool = False      # it reads --model_path (a job under another reads what that one reads)
    classes: bool = False    # it needs a conditional model
    sampler: dict = None     # the sampler it always runs (SamplerSettings fields; steps: the default, at most T);
                             # None: the sampling flags over the checkpoint's settings
    banner: str = None       # 'module.function' (options, settings, config) → what it runs, for the banner; None:
                             # the sampler settings
    check: str = None        # 'module.function' (options) checking what only it reads, before anything is read
    keeps: str = "ddpm_sample.samples_keep"  # a job of a model: 'module.function' (options, config, settings) →
                             # (the images it holds at once, the flag that lowers them), for the memory check

    @property
    def words(self):
        """How messages name it: 'training', '--inpaint'."""
        return f"--{self.flag}" if self.flag else "training"

    @property
    def inference(self):
        """Whether it samples a trained model (--inference and its jobs): prepared by ddpm_main.inference."""
        return self.under == "inference" or self.flag == "inference"


def function_named(path):
    """The function 'module.function' names, its module imported now."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


EDITING_STEPS = 50  # the timesteps of RePaint's ancestral steps and of DDIM's inversion and interpolation, by default
REPAINT = {"sampler": "ddim", "eta": 1.0, "steps": EDITING_STEPS}  # Ho et al.'s ancestral step on the respaced steps
DDIM_BOTH_WAYS = {"sampler": "ddim", "eta": 0.0, "steps": EDITING_STEPS, "guidance_scale": 1.0}  # run both ways, w = 1
OF_A_MODEL = {"under": "inference"}  # a job of --inference, on the model --model_path names
JOBS = (
    Job("train", None, "ddpm_train.train", "training", check="ddpm_train.check_training"),
    Job("sample", "inference", "ddpm_sample.sample_job", "sampling", model=True),
    Job("sweep", "guidance_sweep", "ddpm_sample.sweep_job", "sampling", classes=True, keeps="ddpm_sample.sweep_keep",
        **OF_A_MODEL),
    Job("strip", "denoising_strip", "ddpm_sample.strip_job", "sampling", keeps="ddpm_sample.strip_keep",
        **OF_A_MODEL),
    Job("bound", "eval_nll", "ddpm_sample.bound_job", "computing the bound", banner="ddpm_sample.bound_banner",
        **OF_A_MODEL),
    Job("fid", "eval_fid", "ddpm_sample.fid_job", "sampling", **OF_A_MODEL),
    Job("inpaint", "inpaint", "ddpm_editing.inpaint_job", "inpainting", sampler=REPAINT,
        banner="ddpm_editing.repaint_banner", keeps="ddpm_editing.edits_keep", **OF_A_MODEL),
    Job("invert", "invert", "ddpm_editing.invert_job", "inverting", sampler=DDIM_BOTH_WAYS,
        keeps="ddpm_editing.edits_keep", **OF_A_MODEL),
    Job("interpolate", "interpolate", "ddpm_editing.interpolate_job", "interpolating", sampler=DDIM_BOTH_WAYS,
        keeps="ddpm_editing.frames_keep", **OF_A_MODEL),
    Job("fit", "fit_steps", "ddpm_fit_steps.fit_job", "fitting steps", banner="ddpm_fit_steps.fit_banner",
        keeps="ddpm_fit_steps.fit_keep", **OF_A_MODEL),
    Job("import", "import_weights", "ddpm_interop.import_job", "importing"),
    Job("export", "export_diffusers", "ddpm_interop.export_job", "exporting", model=True,
        check="ddpm_interop.check_export"),
)
JOB = {job.name: job for job in JOBS}
# families of jobs, as the settings' sections name them (ddpm_config.SECTION_JOBS)
INFERENCE = tuple(job.name for job in JOBS if job.inference)
SAMPLES = ("train", *INFERENCE)                                   # training's grids, FID and the bound; inference
FLAG_SAMPLED = ("train", "import", *(job for job in INFERENCE if JOB[job].sampler is None))  # --sampler and its options


@dataclass(frozen=True)
class Item:
    """What an editing flag names: an image as --images or --interpolate names it, an index into the test split
    ('test'), an image file ('file') or, for --interpolate, the noise of a seed ('seed'); --inpaint's region, one of
    MASK_SHAPES ('shape') or a mask file ('file')."""
    kind: str
    value: object  # int for 'test' and 'seed', a path for 'file', a name for 'shape'

    @property
    def name(self):
        """A column label: 'test 17', the file's name, 'seed 3'."""
        return os.path.basename(self.value) if self.kind == "file" else f"{self.kind} {self.value}"


def image_items(ends=False):
    """An argparse type: images to edit as Items, comma-separated — ASCII digits a test index, anything else an image
    file (checked with every file a flag reads: ddpm_flags.check_paths) and, for the two ends of an interpolation
    (ends), seed:N a seed in SEED_RANGE."""
    def parse(text):
        items = []
        for part in (p.strip() for p in text.split(",")):
            seed = re.fullmatch(r"seed:(-?[0-9]{1,20})", part)
            if not part:
                raise argparse.ArgumentTypeError(f"{text!r} has an empty item: give test indices or image files, "
                                                 "comma-separated")
            if seed and ends and not SEED_RANGE[0] <= int(seed.group(1)) <= SEED_RANGE[1]:
                raise argparse.ArgumentTypeError(f"{part} is past the random generator's range, {SEED_RANGE[0]} … "
                                                 f"{SEED_RANGE[1]}")
            items.append(Item("test", int(part)) if re.fullmatch(r"[0-9]{1,9}", part) else
                         Item("seed", int(seed.group(1))) if seed and ends else Item("file", part))
        if ends and len(items) != 2:
            raise argparse.ArgumentTypeError(f"takes two ends, A,B (test indices, image files or seed:N), got "
                                             f"{len(items)}")
        return items
    return parse


SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch's generators take (a negative seed is taken modulo 2⁶⁴)
MASK_SHAPES = ("centre", "left", "strokes")  # what --inpaint draws besides a mask file


def mask_item(text):
    """An argparse type: --inpaint's region as an Item, one of MASK_SHAPES ('shape') or a mask file ('file')."""
    return Item("shape" if text in MASK_SHAPES else "file", text)
EDIT_IMAGES = 8  # test images the editing jobs take when --images is not given, spread over the split
