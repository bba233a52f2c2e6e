"""Train a DDPM on CIFAR-10 (unconditional, or class-conditional with classifier-free guidance), or on CIFAR-100,
MNIST, Fashion-MNIST or any folder of images, and sample from a saved checkpoint.

    python ddpm_main.py --epochs 30 --save_model --run_name DDPM_30epochs
    python ddpm_main.py --conditional --epochs 30 --p_uncond 0.1 --save_model --run_name DDPM_cond
    python ddpm_main.py --inference --model_path models/DDPM_30epochs/ckpt.pt --num_samples 64
"""
import os
import signal
import sys


def stopped_while_starting(signum, frame):
    """Ctrl-C or SIGTERM while the command starts (importing torch takes seconds): one line, exit status 130."""
    line = f"ddpm_main.py: stopped by {signal.Signals(signum).name} while starting; nothing was written\n"
    os.write(2, line.encode())
    os._exit(130)


if __name__ == "__main__":  # before the imports below
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, stopped_while_starting)

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from ddpm_checkpoint import (TOOL_VERSION, imported_checkpoint, inference_run_name, load_resumable, load_sampling_model,
                             save_checkpoint, stored_run_name, write_config_json)
from ddpm_config import (COMMAND_LINE_SETTINGS, check_fixed_settings, imported_config, saved_sampler_settings,
                         trained_data)
from ddpm_data import (DEFAULT_DATA_DIR, check_stage_count, evenly_spread, image_size_of, model_side,
                       require_image_folder)
from ddpm_diffusion import SamplerSettings
from ddpm_editing import (EDIT_IMAGES, EDITING_JOBS, Item, check_item_files, describe_editing, editing_settings,
                          fill_masks, gather_inputs, mask_problem, parse_items, write_inpainting, write_interpolation,
                          write_inversion)
from ddpm_fid import InceptionFeatures, ref_statistics_file
from ddpm_flags import (Command, build_parser, check_flags_apply, check_numbers, flags_given, parse_command_line,
                        resolve_synonyms, sampler_settings)
from ddpm_helpers import (STOPPING_ERRORS, NonFiniteError, RunFiles, TrainingError, UserError, WriteError,
                          check_run_name, check_writable_folder, exit_status, failure_text, input_file_problem,
                          make_way, require_finite, sanitized_run_name, stderr_is_terminal, write_folder, write_json)
from ddpm_interop import (FORMAT_NAMES, PUBLISHED, diffusers_folder_files, export_problem, foreign_weights_path,
                          import_weights, read_foreign)
from ddpm_model import UNetConfig
from ddpm_pictures import GRID_UNCONDITIONAL, MAX_CLASS_ROWS, STRIP_ROWS
from ddpm_runtime import SignalFlag, StopRequested, check_run_memory, init_distributed, memory_guard, stop_on_signals
from ddpm_sample import (class_cycle, class_indices, fid_reference, grayscale_fid_note, measure_fid_and_is, measure_nll,
                         nll_test_images, parse_classes, prepare_sampler, save_samples, test_split, whole_rows,
                         write_denoising_strip, write_guidance_sweep)
from ddpm_train import SAMPLE_REMEDY, diverged_message, finish, stop_on_signal, train_epochs, write_failed_message
from ddpm_train_setup import TrainingOptions, set_up_run, start_or_resume
from ddpm_train_step import WALL_PARTS


def check_args(args, parser):
    """Reject bad input before anything is read or written (one line, exit status 2): the numbers, which flags go
    together, then the files and folders they name."""
    try:
        check_numbers(args)
        if args.sample_classes is not None:
            args.sample_classes = parse_classes(args.sample_classes)
        if args.images is not None:
            args.images = parse_items(args.images, "--images")
        if args.interpolate is not None:
            args.interpolate = parse_items(args.interpolate, "--interpolate", seeds=True)
        check_flag_combinations(args)
        check_paths(args)
    except UserError as e:
        parser.error(str(e))


def check_flag_combinations(args):
    """Flags that need others, or that belong to another job (training, inference, import or export)."""
    check_foreign_weights_flags(args)
    if args.inference and not args.model_path:
        raise UserError("--inference needs --model_path (a checkpoint written by training with this tool)")
    if args.resume is not None and args.inference:
        raise UserError("--resume continues training; for sampling use --inference --model_path")
    if args.job == "train" and args.resume is None:  # a new run's model is known: check its sampling flags now
        sampler_settings(args, None, args.timesteps)
    if args.sample_classes is not None and not (args.inference and (args.conditional or args.guidance_sweep)):
        raise UserError("--sample_classes picks the classes of class-guided samples: it goes with --inference "
                        "--conditional (or --guidance_sweep)")
    if args.guidance_sweep is not None and not args.inference:
        raise UserError("--guidance_sweep goes with --inference (it samples from a trained model)")
    if args.denoising_strip and not args.inference:
        raise UserError("--denoising_strip goes with --inference (it samples from a trained model)")
    jobs = [flag for flag, asked in (("--guidance_sweep", args.guidance_sweep is not None),
                                     ("--denoising_strip", args.denoising_strip), ("--eval_nll", args.eval_nll),
                                     ("--eval_fid", args.eval_fid)) if asked]
    jobs += [f"--{job}" for job in editing_jobs(args)]
    if args.inference and len(jobs) > 1:
        raise UserError(f"{' and '.join(jobs)} are separate jobs at inference: give one per command")
    check_editing_flags(args)
    if "nll_variance" in args.given and not args.eval_nll:
        raise UserError("--nll_variance chooses σ_t² in the bound of --eval_nll N; give --eval_nll too")
    args.given = resolve_synonyms(args, args.given)
    fid_flags = [f"--{name}" for name in ("fid_inception", "fid_ref", "fid_ref_stats") if name in args.given]
    if fid_flags and not args.eval_fid:
        raise UserError(f"{' and '.join(fid_flags)} {'set' if len(fid_flags) > 1 else 'sets'} up the FID of "
                        "--eval_fid N; give --eval_fid too")
    if "fid_ref" in args.given and args.fid_ref_stats:
        raise UserError("--fid_ref picks the split whose statistics are computed, --fid_ref_stats gives statistics "
                        "instead: give one of them")
    if args.tensorboard is not None:
        if args.inference:
            raise UserError("--tensorboard logs training; --inference writes its samples and metrics to --save_dir")
        if importlib.util.find_spec("tensorboard") is None:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    check_flags_apply(args, args.given, args.job)


def check_editing_flags(args):
    """--inpaint, --invert and --interpolate run their own sampler (ddpm_editing.editing_settings), and what they
    edit is --images, else --num_samples test images (--interpolate: its own two ends)."""
    job = editing_job(args)
    if job is None or not args.inference:
        return
    fixed = [f"--{name}" for name in ("sampler", "eta", "spacing", "variance") if name in args.given]
    if fixed:
        runs = "RePaint's ancestral steps" if job == "inpaint" else "DDIM with η = 0, both ways"
        raise UserError(f"--{job} always runs {runs}: drop {' and '.join(fixed)} (--sampling_steps sets the steps)")
    if "num_samples" in args.given and (args.images is not None or job == "interpolate"):
        raise UserError("--num_samples is how many test images to edit when --images is not given; "
                        + ("give one of them" if job != "interpolate" else "--frames sets the strip's length"))


def editing_jobs(args):
    """The editing jobs the command asks for, of 'inpaint', 'invert' and 'interpolate'."""
    return [job for job in EDITING_JOBS if getattr(args, job) not in (None, False)]


def editing_job(args):
    """The editing job the command asks for (once checked, at most one), or None."""
    return next(iter(editing_jobs(args)), None)


def check_paths(args):
    """The run name is a name, the files the flags name exist, the folders they name can be written, and a new run's
    images can be halved once per U-Net stage and its model, schedule and samples fit in memory (from the first
    image's header: nothing else is read)."""
    if args.run_name is not None:
        check_run_name(args.run_name)
    for flag, path in (("--fid_inception", args.fid_inception), ("--fid_ref_stats", args.fid_ref_stats)):
        if path is not None and input_file_problem(path):
            raise UserError(f"{flag} {path!r} {input_file_problem(path)}")
    for flag, items in (("--images", args.images), ("--interpolate", args.interpolate)):
        check_item_files(items or [], flag)
    problem = mask_problem(args.inpaint) if args.inpaint is not None else None
    if problem:
        raise UserError(f"--inpaint {problem}")
    folders = {"--save_dir": args.save_dir, "--export_diffusers": args.export_diffusers}
    if args.job in ("train", "import"):
        folders.update({"--models_dir": args.models_dir, "--tensorboard": args.tensorboard})
    for flag, folder in folders.items():
        if folder is not None:
            check_writable_folder(folder, flag)
    if args.job == "train" and args.resume is None:
        data_dir = args.data_dir or DEFAULT_DATA_DIR
        if args.dataset == "folder":
            require_image_folder(data_dir)
        image_size = image_size_of(data_dir, args.dataset)
        check_stage_count(args.dim_mults, image_size)
        # a lower bound: one channel, no classes (the data is not read yet), no attention, the unconditional grid
        model = UNetConfig(dim=args.dim, dim_mults=tuple(args.dim_mults), channels=1, architecture=args.architecture,
                           num_res_blocks=args.num_res_blocks, attn_resolutions=(), groups=args.groups)
        check_run_memory(pick_device(args), args.sample_batch, model, args.timesteps,
                         model_side(image_size or (1, 1), len(args.dim_mults)), max(GRID_UNCONDITIONAL, args.eval_fid),
                         training=True, guided=False)


def check_foreign_weights_flags(args):
    """--import_weights and --export_diffusers are jobs of their own; export needs --model_path and a new folder."""
    others = [flag for flag, given in (("--inference", args.inference), ("--resume", args.resume is not None),
                                       ("--preset", args.preset is not None),
                                       ("--export_diffusers", args.export_diffusers is not None)) if given]
    if args.import_weights is not None and others:
        raise UserError(f"--import_weights is a job of its own: drop {' and '.join(others)} (sample the imported "
                        "model with --inference --model_path <models_dir>/<run_name>/ckpt.pt)")
    if args.export_diffusers is not None:
        if not args.model_path or args.inference or args.resume is not None:
            raise UserError("--export_diffusers DIR writes the network of --model_path CKPT: give --model_path, "
                            "without --inference or --resume")
        if os.path.exists(args.export_diffusers) and not (os.path.isdir(args.export_diffusers)
                                                          and not os.listdir(args.export_diffusers)):
            raise UserError(f"--export_diffusers {args.export_diffusers!r} exists and is not an empty folder; "
                            "name a new one")


def job_of(args):
    """What the command does: 'import', 'export', 'inference' or 'train'."""
    if args.import_weights is not None:
        return "import"
    if args.export_diffusers is not None:
        return "export"
    return "inference" if args.inference else "train"


# ------------------------------------------------------------------- shared by training and inference

def run_files(args, run_name):
    """Where this command's files go: RunFiles of --models_dir, --save_dir and the (checked) run name."""
    return RunFiles(args.models_dir, args.save_dir, run_name)


def pick_device(args):
    if torch.cuda.is_available() and not args.no_cuda:
        return torch.device("cuda", getattr(args, "local_rank", 0))
    return torch.device("cpu")


# ----------------------------------------------------------------------------------- train

def train(args):
    """Train: set up the run, start or resume it, train epoch after epoch until --epochs, a signal (saved; exit
    130) or the time budget stops it (ddpm_train.train_epochs), then finish: the final checkpoint, metrics and FID. NaN
    or infinity stops it (exit 1) before anything is written from them."""
    saved, run_name, resume = resumed_checkpoint(args)
    make_way(run_files(args, run_name), {"--fid_ref_stats": args.fid_ref_stats, "--fid_inception": args.fid_inception})
    settings = {**command_line_settings(args, saved), "run_name": run_name}
    run = set_up_run(settings, args.given, training_options(args, run_name, resume), saved)
    with run.report:
        state = start_or_resume(run, saved)
        with SignalFlag(immediate=run.world_size == 1) as run.signals:
            try:
                train_epochs(run, state, run.clock)
                finish(run, state, run.clock)
            except StopRequested as e:
                stop_on_signal(run, state, str(e))
            except NonFiniteError as e:
                raise TrainingError(diverged_message(run, e)) from None
            except WriteError as e:
                raise TrainingError(write_failed_message(run, e)) from None


def resumed_checkpoint(args):
    """(the checkpoint --resume names, the run's name, the last.pt's path) once the command line is checked against
    it; (None, the run's name, None) for a new run. The name is --run_name, else the checkpoint's when --resume names a
    path, else DDPM."""
    if not args.resume:
        return None, args.run_name or "DDPM", None
    path, saved = load_resumable(args.resume, args.models_dir, args.run_name or "DDPM")
    run_name = args.run_name or stored_run_name(saved["config"], path)
    config = saved["config"]
    check_run_memory(pick_device(args), args.sample_batch, UNetConfig.from_dict(config["model"]), config["timesteps"],
                     config["image_size"], max(GRID_UNCONDITIONAL, args.eval_fid), training=True, guided=False)
    check_fixed_settings(config, vars(args), args.given)
    check_budget_left(saved, args)
    return saved, run_name, path


def check_budget_left(saved, args):
    """UserError, saying how to give more time, when a resumed run's time budget is spent: the time budget stopped it
    and the budget is not raised, or the budget is no more than the wall time the run has used."""
    budget = args.time_budget_min if "time_budget_min" in args.given else saved["config"]["time_budget_min"]
    if not budget:
        return
    timing = {key: value for key, value in saved["timing"].items() if isinstance(value, (int, float))}
    used_min = (timing.get("wall_s") or sum(timing.get(key, 0.0) for key in WALL_PARTS)) / 60
    stopped = saved.get("budget_spent") is True and budget <= (saved["config"]["time_budget_min"] or 0)
    if stopped or used_min >= budget:
        raise UserError(f"--resume: the time budget is spent ({used_min:.1f} min used of --time_budget_min "
                        f"{budget:g}, which counts the whole run); to train on, give a larger total, e.g. "
                        f"--time_budget_min {math.ceil(used_min + budget):g}")


def command_line_settings(args, saved):
    """The config's settings as the command line gives them (ddpm_checkpoint.training_config resolves them against a
    resumed run's checkpoint `saved`), the sampling settings resolved for the run's T."""
    sampling = (sampler_settings(args, saved_sampler_settings(saved["config"]), saved["config"]["timesteps"])
                if saved else sampler_settings(args, None, args.timesteps))
    return {**{key: getattr(args, key) for key in COMMAND_LINE_SETTINGS}, "sampling": sampling}


def training_options(args, run_name, resume):
    """How the run goes about its training (ddpm_train_setup.TrainingOptions): its files, device and command line, the
    last.pt it resumes (None: none), and the flags of the options' names."""
    named = {field.name for field in dataclasses.fields(TrainingOptions)} - {"files", "device", "command_line",
                                                                             "resume"}
    return TrainingOptions(run_files(args, run_name), pick_device(args), tuple(args.argv), resume=resume,
                           **{name: getattr(args, name) for name in named})


# ------------------------------------------------------------------------------- inference

def inference(args):
    """Sample from a checkpoint: a grid, a PNG per image and an npz, then FID with --eval_fid; or instead one labelled
    grid (--guidance_sweep, --denoising_strip), or the bound in bits/dim of test images (--eval_nll)."""
    device = pick_device(args)
    ckpt, model = load_sampling_model(args.model_path)
    config = ckpt["config"]
    run_name = args.run_name or inference_run_name(args.model_path, config)
    files, verbose = run_files(args, run_name), not args.quiet
    make_way(files, {"--model_path": args.model_path, "--fid_ref_stats": args.fid_ref_stats,
                     "--fid_inception": args.fid_inception})
    settings, job, nll_variance = inference_plan(args, config)
    asked_classes = check_against_model(args, config, settings)
    sampler = prepare_sampler(model, config, settings, device, args.precision, args.compile, args.sample_batch, verbose,
                              job)
    torch.manual_seed(args.seed)
    if editing_job(args):
        return edit_images(args, sampler, editing_job(args), asked_classes, files)
    if args.guidance_sweep:
        return write_guidance_sweep(sampler, args.guidance_sweep, asked_classes, args.seed, files, verbose)
    classes = (asked_classes or list(range(config["num_classes"]))) if args.conditional else None
    if args.denoising_strip:
        rows = args.num_samples if "num_samples" in args.given else STRIP_ROWS
        return write_denoising_strip(sampler, rows, classes, args.seed, files, verbose)
    if args.eval_nll:
        images, labels = nll_test_images(config, args.data_dir or config["data_dir"], args.dataset, args.eval_nll,
                                         args.conditional)
        return measure_nll(sampler, images, labels, nll_variance, args.seed, files, verbose)
    start = time.perf_counter()
    if args.eval_fid:  # the reference first: one of another dataset stops before anything is written
        features, reference = inference_fid_reference(args, config, device)
    reference_s = time.perf_counter() - start
    if "num_samples" in args.given or not args.eval_fid:  # --eval_fid alone writes FID's samples only
        num_samples = args.num_samples or whole_rows(classes)
        labels = class_cycle(classes, num_samples, device) if classes else None
        start = time.perf_counter()
        with memory_guard(f"sampling {num_samples} images", SAMPLE_REMEDY):
            images = sampler.sample(num_samples, labels, progress=verbose and stderr_is_terminal())
        require_finite(images, "the samples")
        save_samples(sampler, images, labels, files, len(classes) if classes else None, time.perf_counter() - start,
                     verbose)
    if args.eval_fid:
        start = time.perf_counter()
        os.makedirs(files.save_dir, exist_ok=True)
        measured = measure_fid_and_is(sampler, args.eval_fid, args.seed, features, reference,
                                      files.output("fid_samples"), verbose)
        write_json({"run_name": run_name, "model_path": args.model_path, **measured,
                    "conditional": args.conditional, "fid_s": reference_s + time.perf_counter() - start,
                    "device": str(device), "precision": sampler.denoiser.precision}, files.output("metrics"))


EDITING_WORDS = {"inpaint": "inpainting", "invert": "inverting", "interpolate": "interpolating"}


def inference_plan(args, config):
    """How this inference samples the checkpoint's model (its config): (SamplerSettings, what its banner says it does
    and how, the σ_t² of --eval_nll's bound: the sampler's unless --nll_variance is given)."""
    saved, editing = saved_sampler_settings(config), editing_job(args)
    if editing:
        settings = editing_settings(editing, saved, config["timesteps"], args.sampling_steps, args.guidance_scale)
        words = describe_editing(editing, settings, args.conditional, args.jump_length, args.jump_count)
        return settings, (EDITING_WORDS[editing], words), None
    settings = sampler_settings(args, saved, config["timesteps"])
    nll_variance = args.nll_variance or settings.variance
    if args.eval_nll:
        return settings, ("computing the bound", f"all {config['timesteps']} steps of p_θ, σ_t² {nll_variance}"), \
            nll_variance
    return settings, ("sampling", settings.describe(guided=args.conditional)), nll_variance


def edit_images(args, sampler, job, classes, files):
    """--inpaint, --invert or --interpolate (ddpm_editing): the images --images or --interpolate names (default:
    --num_samples test images spread over the split), class-guided with --conditional, edited and written."""
    config, verbose = sampler.config, not args.quiet
    data_dir, dataset = model_data(args, config)

    def load_split():  # only when a test image is asked for
        try:
            return test_split(config, data_dir, dataset, f"--{job}")
        except UserError as e:
            instead = "--images a.png,b.png" if job != "interpolate" else "--interpolate a.png,b.png"
            raise UserError(f"--{job} edits test images of the model's data, and {e}; "
                            f"{'point --data_dir at it' if args.data_dir else 'give --data_dir'} (or image files: "
                            f"{instead})") from None
    items, split = args.interpolate if job == "interpolate" else args.images, load_split
    if items is None:
        split = load_split()
        items = [Item("test", i) for i in evenly_spread(torch.arange(len(split[0])), args.num_samples or EDIT_IMAGES)
                 .tolist()]
    inputs = gather_inputs(items, split, trained_data(config), classes, args.conditional, f"--{job}")
    if job == "inpaint":
        fill = fill_masks(args.inpaint, len(items), trained_data(config)["data_size"], args.seed)
        return write_inpainting(sampler, inputs, fill, args.jump_length, args.jump_count, args.seed, files, verbose)
    if job == "invert":
        return write_inversion(sampler, inputs, files, verbose)
    return write_interpolation(sampler, inputs, args.frames, files, verbose)


def check_against_model(args, config, settings):
    """Inference flags that the checkpoint's config can contradict, and what they ask of memory for this model sampled
    with these settings (exit status 2, nothing written); returns --sample_classes as the model's class indices (None
    when not given)."""
    kept = len(args.guidance_sweep) * MAX_CLASS_ROWS if args.guidance_sweep else \
        (args.num_samples or whole_rows(config["classes"] if args.conditional else None)) + args.eval_fid
    check_run_memory(pick_device(args), args.sample_batch, UNetConfig.from_dict(config["model"]), config["timesteps"],
                     config["image_size"], kept, training=False,
                     guided=args.conditional and settings.guidance_scale not in (0, 1))
    num_classes = config.get("num_classes")
    if args.conditional and num_classes is None:
        raise UserError(f"--conditional was given but {args.model_path!r} is an unconditional model; "
                        "drop --conditional or use a checkpoint trained with --conditional")
    if args.guidance_sweep and num_classes is None:
        raise UserError(f"--guidance_sweep needs a conditional model; {args.model_path!r} is unconditional")
    asked = class_indices(args.sample_classes, config["classes"]) if args.sample_classes else None  # a conditional
    if num_classes is not None and not args.conditional:
        print("note: conditional checkpoint without --conditional: the bound of its unconditional model (null label); "
              "add --conditional for the bound given each image's class" if args.eval_nll else
              "note: conditional checkpoint without --conditional: editing with its unconditional model (null label); "
              "add --conditional to guide each image by its class" if editing_job(args) else
              "note: conditional checkpoint sampled without --conditional: drawing unconditional samples "
              "(null label); add --conditional for class-guided samples", file=sys.stderr)
    return asked


def inference_fid_reference(args, config, device):
    """--eval_fid's network (InceptionFeatures, fetched on first use) and Reference: --fid_ref_stats, else the
    statistics of the --fid_ref split at --data_dir (default: where the model was trained) of --dataset (default: the
    model's, there)."""
    features = InceptionFeatures(args.fid_inception, device, verbose=not args.quiet)
    grayscale_fid_note(config, not args.quiet)
    if args.fid_ref_stats:
        return features, ref_statistics_file(args.fid_ref_stats, trained_data(config))
    data_dir, dataset = model_data(args, config)
    return features, fid_reference(features, config, None, data_dir, dataset, args.fid_ref, not args.quiet)


def model_data(args, config):
    """(data_dir, dataset) of the images inference reads: --data_dir, else the folder the model was trained on, and
    --dataset, else the model's own where it is the model's folder (None: found from the folder)."""
    data_dir = args.data_dir or config["data_dir"]
    return data_dir, args.dataset or (config.get("dataset") if data_dir == config["data_dir"] else None)


# ------------------------------------------------------------------------- foreign weights

def import_job(args):
    """--import_weights: a foreign file of Ho et al.'s network (fetched first when named) → <models_dir>/<run>/ckpt.pt
    and config.json, sampled as the paper did unless sampling flags say otherwise."""
    verbose = not args.quiet
    path = foreign_weights_path(args.import_weights, verbose)
    foreign = read_foreign(path)
    imported = import_weights(foreign)
    run_name = args.run_name or sanitized_run_name(
        args.import_weights if args.import_weights in PUBLISHED else
        os.path.splitext(os.path.basename(os.path.normpath(path)))[0], fallback="imported")
    files = run_files(args, run_name)
    target = files.checkpoint("ckpt.pt")
    if os.path.exists(target):
        raise UserError(f"{target} exists: give another --run_name (or remove that run first)")
    settings = sampler_settings(args, SamplerSettings("ddpm", variance=imported.variance), imported.timesteps)
    config = imported_config({**vars(args), "run_name": run_name}, imported, settings)
    os.makedirs(files.ckpt_dir, exist_ok=True)
    save_checkpoint(imported_checkpoint(config, imported.weights, foreign.source), target)
    write_config_json(config, files.checkpoint("config.json"))
    if verbose:
        count = sum(w.numel() for w in imported.weights.values())
        print(f"imported Ho et al.'s network ({count:,} parameters) from {foreign.source} "
              f"({FORMAT_NAMES[foreign.style]}) into {target}; it samples with "
              f"{settings.describe(guided=False)}. Sample it: python ddpm_main.py --inference --model_path {target}"
              f"{FAST_SAMPLING if settings.sampler == 'ddpm' else ''}",
              file=sys.stderr)


FAST_SAMPLING = " (add --sampler dpm++2m --sampling_steps 15 for 15 network evaluations an image instead of 1,000)"


def export_job(args):
    """--export_diffusers DIR: --model_path's network and EMA weights as a diffusers DDPMPipeline folder."""
    ckpt, _ = load_sampling_model(args.model_path)
    config = ckpt["config"]
    network = UNetConfig.from_dict(config["model"])
    problem = export_problem(config, network)
    if problem:
        raise UserError(f"--export_diffusers: {args.model_path!r} {problem}")
    write_folder(diffusers_folder_files(config, network, ckpt.get("ema") or ckpt["model"]), args.export_diffusers)
    if not args.quiet:
        print(f"wrote {args.export_diffusers}: {args.model_path}'s network as a diffusers DDPMPipeline (UNet2DModel "
              f"and DDPMScheduler); load it with diffusers.DDPMPipeline.from_pretrained({args.export_diffusers!r})",
              file=sys.stderr)


def main(argv=None):
    started = time.perf_counter()  # the time budget's wall clock starts here
    parser = build_parser(__doc__, f"{TOOL_VERSION} (ddpm-cifar10), torch {torch.__version__}")
    args = parse_command_line(parser, argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.started = started
    args.given = flags_given(parser, args, args.argv)
    args.job = job_of(args)
    check_args(args, parser)  # the last change: synonyms resolved, class lists parsed
    rank, world_size, local_rank = init_distributed(torch.cuda.is_available() and not args.no_cuda) \
        if args.job == "train" else (0, 1, 0)
    args = Command(**vars(args), rank=rank, world_size=world_size, local_rank=local_rank)  # read once: frozen now
    try:
        with stop_on_signals(), memory_guard("training" if args.job == "train" else args.job,
                                             "lower --sample_batch, --batch_size or --dim"):
            JOBS[args.job](args)
    except STOPPING_ERRORS as e:
        if args.rank == 0:
            print(f"{parser.prog}: {failure_text(e)}", file=sys.stderr)
        sys.exit(exit_status(e))
    finally:
        if args.world_size > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


JOBS = {"train": train, "inference": inference, "import": import_job, "export": export_job}

if __name__ == "__main__":
    main()
