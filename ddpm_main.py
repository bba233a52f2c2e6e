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

import time  # noqa: E402

import torch  # noqa: E402

from ddpm_checkpoint import TOOL_VERSION, inference_run_name, load_sampling_model  # noqa: E402
from ddpm_config import saved_sampler_settings  # noqa: E402
from ddpm_flags import Command, build_parser, check_command, files_read, flags_given, parse_command_line  # noqa: E402
from ddpm_helpers import STOPPING_ERRORS, RunFiles, UserError, exit_status, failure_text, make_way  # noqa: E402
from ddpm_jobs import function_named  # noqa: E402
from ddpm_model import UNetConfig  # noqa: E402
from ddpm_runtime import (check_run_memory, device_of, ignore_stops, init_distributed, memory_guard,  # noqa: E402
                          stop_on_signals)
from ddpm_sample import (asked_sampling, class_indices, describe_sampling, prepare_sampler,  # noqa: E402
                         sampler_settings)


def inference(options, job):
    """A job of a trained model (ddpm_jobs: sampling, the sweep, the strip, the bound, FID, the editing jobs): load
    --model_path, resolve how the job samples it, check that against the model, then run the job on its Sampler."""
    ckpt, model = load_sampling_model(options.model_path)
    config = ckpt["config"]
    files = RunFiles(options.models_dir, options.save_dir,
                     options.run_name or inference_run_name(options.model_path, config))
    make_way(files, files_read(options, job))
    settings = sampler_settings(asked_sampling(options), saved_sampler_settings(config), config["timesteps"],
                                job.sampler, options.given)
    classes = check_against_model(options, job, config, settings)
    details = function_named(job.banner)(options, settings, config) if job.banner else \
        describe_sampling(settings, guided=options.conditional)
    sampler = prepare_sampler(model, config, settings, device_of(options), options.precision, options.compile,
                              options.sample_batch, not options.quiet, (job.doing, details))
    torch.manual_seed(options.seed)
    function_named(job.run)(options, sampler, files, classes)


def check_against_model(options, job, config, settings):
    """What the checkpoint's config can contradict in the command (exit status 2, nothing written): its classes, and
    the memory this model sampled with these settings needs. Returns --sample_classes as the model's class indices
    (None when not given)."""
    kept = function_named(job.keeps)(options, config, settings)  # (images, the flag that lowers them)
    check_run_memory(device_of(options), options.sample_batch, UNetConfig.from_dict(config["model"]),
                     config["timesteps"], config["image_size"], kept, training=False,
                     evaluations=settings.evaluations_per_step(options.conditional))
    num_classes = config.get("num_classes")
    if num_classes is None and options.conditional:
        raise UserError(f"--conditional was given but {options.model_path!r} is an unconditional model; "
                        "drop --conditional or use a checkpoint trained with --conditional")
    if num_classes is None and job.classes:
        raise UserError(f"{job.words} needs a conditional model; {options.model_path!r} is unconditional")
    if num_classes is not None and not options.conditional:
        print(f"note: conditional checkpoint without --conditional: {job.doing} with its unconditional model (the "
              "null label); add --conditional to use its classes", file=sys.stderr)
    return class_indices(options.sample_classes, config["classes"]) if options.sample_classes else None


def main(argv=None):
    started = time.perf_counter()  # the time budget's wall clock starts here
    parser = build_parser(__doc__, f"{TOOL_VERSION} (ddpm-cifar10), torch {torch.__version__}")
    args = parse_command_line(parser, argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.started = started
    args.given = flags_given(parser, args, args.argv)
    job = check_command(parser, args)  # the last change: synonyms resolved in args.given
    rank, world_size, local_rank = init_distributed(torch.cuda.is_available() and not args.no_cuda) \
        if job.name == "train" else (0, 1, 0)
    options = Command(**vars(args), job=job.name, rank=rank, world_size=world_size, local_rank=local_rank)
    with stop_on_signals(final=argv is None):  # the command: once the job is over, stops change nothing
        try:
            with memory_guard(job.doing, "lower --sample_batch, --batch_size or --dim"):
                inference(options, job) if job.inference else function_named(job.run)(options)
        except STOPPING_ERRORS as e:
            ignore_stops()  # the line below is the last word
            if options.rank == 0:
                print(f"{parser.prog}: {failure_text(e)}", file=sys.stderr)
            sys.exit(exit_status(e))
        finally:
            if options.world_size > 1:
                import torch.distributed as dist
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
