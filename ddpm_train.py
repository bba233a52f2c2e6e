"""A training run: what it checks before anything is read, its set-up (the data on the device, the networks, the
samplers, the resolved config, FID's reference), a fresh start or a checkpoint put back, epoch after epoch of training
steps with evaluations (losses, grids, plots) and checkpoint saves until --epochs, a signal or the time budget stops
it, and the end (final checkpoint, FID, the bound, metrics).

train() is the story. What a run trains is its config alone (a resumed run's from its checkpoint); how it goes about
it (files, intervals, reporting, FID) is the command line's options (ddpm_flags.Command). The step, the clock and the
reports are ddpm_train_step's, which bench/bench.py times without this module.
"""
import copy
import dataclasses
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ddpm_checkpoint import (TrainingState, build_checkpoint, load_resumable, require_finite_weights,
                             restore_training, save_checkpoint, stored_run_name, write_config_json)
from ddpm_config import (build_diffusion, build_model, resolved_settings, resume_changes, saved_sampler_settings,
                         training_config)
from ddpm_data import (DEFAULT_DATA_DIR, DeviceLoader, check_stage_count, data_facts, evenly_spread, image_size_of,
                       load_dataset, model_side, require_image_folder, require_trained_data, train_val_split)
from ddpm_diffusion import Diffusion, SamplerSettings
from ddpm_fid import InceptionFeatures, Reference, ref_statistics_file
from ddpm_flags import files_read
from ddpm_helpers import (Interrupted, NonFiniteError, RunFiles, StopRequested, TrainingError, UserError, WriteError,
                          make_way, run_lock, write_json)
from ddpm_memorisation import TrainingSet
from ddpm_jobs import JOB
from ddpm_model import UNetConfig
from ddpm_pictures import (GRID_SEED, GRID_UNCONDITIONAL, grid_layout, plot_loss_history, save_forward_strip,
                           save_grid)
from ddpm_runtime import (Denoiser, SignalFlag, all_ranks_mean, barrier, check_run_memory, choose_compile,
                          choose_precision, device_of, max_over_ranks, memory_guard)
from ddpm_sample import (SAMPLE_REMEDY, Sampler, asked_sampling, fid_reference, grayscale_fid_note,
                         measure_inception_metrics, measure_nll, sampler_settings, spread)
from ddpm_train_step import (EVAL_IMAGES, Reporter, TrainingClock, TrainingStep, build_loss_scaler, build_optimizer,
                             evaluate_loss, learning_rate)

BATCH_REMEDY = "lower --batch_size (--grad_accum K keeps K × --batch_size images a step)"
CPU_GRID_STEPS = 50  # on a CPU, a grid whose sampler takes more steps (ddpm's T) uses dpm++2m's default instead
CPU_GRID_SAMPLER = {"sampler": "dpm++2m"}
# what --eval_fid logs to TensorBoard (as in metrics_<run>.json)
LOGGED_METRICS = ("fid", "fid_second_draw", "kid", "prc_precision", "prc_recall", "inception_score", "copy_share")


def check_training(options):
    """What training checks before anything is read (Job.check): --tensorboard's package; for a new run its sampling
    flags, and from the first image's header that its stages and memory fit."""
    if options.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if options.resume is not None:
        return
    sampler_settings(asked_sampling(options), None, options.timesteps, given=options.given)
    data_dir = options.data_dir or DEFAULT_DATA_DIR
    if options.dataset == "folder":
        require_image_folder(data_dir)
    image_size = image_size_of(data_dir, options.dataset)
    check_stage_count(options.dim_mults, image_size)
    # a lower bound: one channel, no classes (the data is not read yet), no attention, the unconditional grid
    model = UNetConfig(dim=options.dim, dim_mults=tuple(options.dim_mults), channels=1,
                       architecture=options.architecture, num_res_blocks=options.num_res_blocks, attn_resolutions=(),
                       groups=options.groups)
    check_training_memory(options, model, options.timesteps, model_side(image_size or (1, 1), len(options.dim_mults)))


def check_training_memory(options, model, timesteps, side):
    """UserError when this network (UNetConfig), T and side cannot fit in memory with the run's samples."""
    check_run_memory(device_of(options), options.sample_batch, model, timesteps, side,
                     (max(GRID_UNCONDITIONAL, options.eval_fid), "--eval_fid"), training=True)


def train(options):
    """Train: check --resume's checkpoint, set the run up, train epochs until --epochs, a signal (saved; exit 130) or
    the time budget stops them, then finish. NaN or a failed write stops it (exit 1), the last good checkpoint kept."""
    saved, run_name, resumed_from = resumed_checkpoint(options)
    files = RunFiles(options.models_dir, options.save_dir, run_name)
    with run_lock(files, held=options.rank == 0):
        make_way(files, files_read(options, JOB["train"]))
        run = set_up_run(options, files, saved, resumed_from)
        with run.report, run.signals:
            try:
                train_epochs(run, run.state, run.clock)
                finish(run, run.state, run.clock)
            except StopRequested as e:
                stop_on_signal(run, run.state, str(e))
            except NonFiniteError as e:
                raise TrainingError(diverged_message(run, e)) from None
            except WriteError as e:
                raise TrainingError(write_failed_message(run, e)) from None


def resumed_checkpoint(options):
    """(the checkpoint --resume names, the run's name, its path), checked against the command line, memory and the
    time budget; (None, the run's name, None) for a new run."""
    if not options.resume:
        return None, options.run_name or "DDPM", None
    path, saved = load_resumable(options.resume, options.models_dir, options.run_name or "DDPM")
    config = saved["config"]
    check_training_memory(options, UNetConfig.from_dict(config["model"]), config["timesteps"], config["image_size"])
    check_budget_left(saved, resolved_settings(vars(options), config, options.given)["time_budget_min"])
    return saved, options.run_name or stored_run_name(config, path), path


def check_budget_left(saved, budget):
    """UserError, saying how to give more time, when a resumed run's (resolved) time budget is spent."""
    if not budget:
        return
    used_min = TrainingClock.wall_used(saved["timing"]) / 60
    stopped = saved.get("budget_spent") is True and budget <= (saved["config"]["time_budget_min"] or 0)
    if stopped or used_min >= budget:
        raise UserError(f"--resume: the time budget is spent ({used_min:.1f} min used of --time_budget_min "
                        f"{budget:g}, which counts the whole run); to train on, give a larger total, e.g. "
                        f"--time_budget_min {math.ceil(used_min + budget):g}")


# ------------------------------------------------------------------------------------ the set-up

@dataclass(eq=False)
class Run:
    """A training run, built once and complete (set_up_run). What it trains is `config` alone; `options` (the command
    line) says how it goes about it: intervals, saves, reporting, FID and the bound."""
    options: object                # ddpm_flags.Command
    config: dict
    files: RunFiles                # where checkpoints and outputs go, under the run's (checked) name
    device: torch.device
    resumed_from: str              # the last.pt the run continues (None: a new run)
    train_loader: DeviceLoader
    eval_loaders: dict             # 'val' and 'test': the validation and test splits
    model: nn.Module
    ema_model: nn.Module
    optimizer: torch.optim.Optimizer
    diffusion: Diffusion
    train_step: TrainingStep
    sampler: Sampler               # the EMA weights with the config's settings: FID, the bound
    grid_sampler: Sampler          # the same weights with the grids' settings (grid_settings)
    precision_why: str             # why the U-Net computes in run.precision (choose_precision), for the banner
    report: Reporter
    state: TrainingState           # where training stands
    clock: TrainingClock           # the run's wall clock and time budget
    signals: SignalFlag            # SIGINT / SIGTERM, while the run trains and finishes
    test_images: torch.Tensor      # the test split (N, C, H, W) uint8 on the CPU: --eval_nll's images
    fid_features: InceptionFeatures = None  # --eval_fid's network, loaded and tried on one image before training
    fid_reference: Reference = None  # what --eval_fid compares with, read or computed before training
    fid_training: TrainingSet = None  # the training images and features the copy check compares with
    last_saved: tuple = None       # (path, where training stood) of the last good last.pt; None: none yet

    @property
    def is_main(self):  # only rank 0 writes files and prints
        return self.options.rank == 0

    @property
    def world_size(self):
        return self.options.world_size

    @property
    def ema_denoiser(self):  # evaluation, grids and FID use the EMA weights
        return self.sampler.denoiser

    @property
    def precision(self):  # what the U-Net computes in: config["precision"] resolved for the device
        return self.train_step.denoiser.precision

    @property
    def num_params(self):
        return sum(p.numel() for p in self.model.parameters())

    def checkpoint(self, state):
        return build_checkpoint(self.config, self.model, self.ema_model, self.optimizer, state,
                                self.device.type == "cuda", self.train_step.scaler)


def set_up_run(options, files, saved, resumed_from):
    """Read the data, resolve the config (a resumed run's from its checkpoint `saved`), build loaders and networks on
    the device, and start afresh or from the checkpoint: the complete Run."""
    device, is_main = device_of(options), options.rank == 0
    data_dir = options.data_dir or (saved["config"]["data_dir"] if saved else DEFAULT_DATA_DIR)
    dataset = options.dataset or (saved["config"].get("dataset") if saved and not options.data_dir else None)
    # FID's network is fetched (once) and runs on one image now: a bad file costs seconds, not the run
    fid_features = InceptionFeatures(options.fid_inception, device, verbose=not options.quiet) \
        if options.eval_fid and is_main else None
    start = time.perf_counter()
    data = load_dataset(data_dir, dataset)
    train_idx, val_idx = train_val_split(len(data["train_images"]))
    decode_s = time.perf_counter() - start
    facts = data_facts(data)
    if saved:  # UserError: nothing has been written yet
        require_trained_data(saved["config"], facts, data_dir, "--resume")
    fid_ref_stats = ref_statistics_file(options.fid_ref_stats, facts) if options.eval_fid and options.fid_ref_stats \
        else None
    if data["mode_note"] and is_main:
        print(f"warning: {data['mode_note']}", file=sys.stderr)
    sampling = sampler_settings(asked_sampling(options), saved and saved_sampler_settings(saved["config"]),
                                saved["config"]["timesteps"] if saved else options.timesteps, given=options.given)
    config = training_config({**vars(options), "run_name": files.run_name, "data_dir": data_dir, "sampling": sampling},
                             {**facts, "num_train": len(train_idx), "num_val": len(val_idx),
                              "num_test": len(data["test_images"])}, saved and saved["config"], options.given)
    fid_ref, fid_training = fid_reference_of_run(options, fid_features, fid_ref_stats, config, data, data_dir)
    if is_main:
        os.makedirs(files.save_dir, exist_ok=True)
        os.makedirs(files.ckpt_dir, exist_ok=True)
    train_loader, eval_loaders = device_loaders(data, train_idx, val_idx, config, options, device)
    networks = build_networks(config, options, device)
    state, last_saved = start_or_resume(networks, config, device, saved, resumed_from, decode_s)
    run = Run(options=options, config=config, files=files, device=device, resumed_from=resumed_from,
              train_loader=train_loader, eval_loaders=eval_loaders, **networks,
              report=Reporter(options.quiet, options.tensorboard, is_main), state=state,
              clock=TrainingClock(state.timing, config["time_budget_min"], networks["train_step"].denoiser.compiled,
                                  device, options.started),
              signals=SignalFlag(immediate=options.world_size == 1), test_images=data["test_images"],
              fid_features=fid_features, fid_reference=fid_ref, fid_training=fid_training,
              last_saved=last_saved)
    introduce(run, saved)
    return run


def fid_reference_of_run(options, fid_features, fid_ref_stats, config, data, data_dir):
    """What --eval_fid compares with, made before training (ddpm_sample.fid_reference): (Reference, TrainingSet);
    (None, None) without FID's network."""
    if fid_features is None:
        return None, None
    return fid_reference(fid_features, config, data, data_dir, options.fid_ref, fid_ref_stats, not options.quiet)


def device_loaders(data, train_idx, val_idx, config, options, device):
    """The training split's loader (shuffled, flipped) and {'val', 'test'}: EVAL_IMAGES of each split, the same
    every evaluation; uint8 on the device, a batch an optimizer step's micro-batches."""
    batch_size, side = config["batch_size"] * config["grad_accum"], config["image_size"]  # smaller images are padded
    shards = {"device": device, "rank": options.rank, "world_size": options.world_size, "side": side}
    train_loader = DeviceLoader(data["train_images"][train_idx], data["train_labels"][train_idx], batch_size,
                                shuffle=True, flip=True, seed=config["seed"], **shards)
    test_idx = torch.arange(len(data["test_images"]))
    eval_loaders = {name: DeviceLoader(images[chosen], labels[chosen], batch_size, shuffle=False, flip=False, **shards)
                    for name, images, labels, chosen in (
                        ("val", data["train_images"], data["train_labels"], evenly_spread(val_idx, EVAL_IMAGES)),
                        ("test", data["test_images"], data["test_labels"], evenly_spread(test_idx, EVAL_IMAGES)))}
    return train_loader, eval_loaders


def build_networks(config, options, device):
    """The U-Net (seeded by the config), its EMA, AdamW, the diffusion, the training step (DDP under torchrun) and
    the EMA's Samplers: the Run's fields of those names."""
    torch.manual_seed(config["seed"])
    model = build_model(config).to(device, memory_format=torch.channels_last)  # faster convolutions, GPU and CPU
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # no dropout where the EMA samples
    optimizer = build_optimizer(model, config["lr"], config["weight_decay"])
    diffusion = build_diffusion(config, device)
    precision, precision_why = choose_precision(config["precision"], device)
    compile_model = choose_compile(options.compile, device)
    trained_model = model
    if options.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        trained_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_step = TrainingStep(model, ema_model, optimizer, diffusion, Denoiser(trained_model, compile_model, precision),
                              config["p_uncond"], config["loss_type"], config["ema_decay"], options.rank,
                              options.world_size, config["grad_accum"], build_loss_scaler(precision, device))
    settings = SamplerSettings(**config["sampling"]).for_timesteps(config["timesteps"])
    sampler = Sampler(diffusion, Denoiser(ema_model, compile_model, precision), settings, config, options.sample_batch)
    grid_sampler = dataclasses.replace(sampler, settings=grid_settings(settings, config["timesteps"], device))
    return {"model": model, "ema_model": ema_model, "optimizer": optimizer, "diffusion": diffusion,
            "train_step": train_step, "sampler": sampler, "grid_sampler": grid_sampler, "precision_why": precision_why}


def grid_settings(settings, timesteps, device):
    """A run's grid sampler: the config's, except on a CPU past CPU_GRID_STEPS evaluations, where dpm++2m stands in."""
    if device.type == "cuda" or settings.steps <= CPU_GRID_STEPS:
        return settings
    return sampler_settings({}, settings, timesteps, CPU_GRID_SAMPLER)


def start_or_resume(networks, config, device, saved, resumed_from, decode_s):
    """(TrainingState, (the last good last.pt, where it stood)): fresh, or the checkpoint's put back."""
    if not saved:
        state = TrainingState()
        state.timing["decode_s"] = decode_s
        return state, None
    state = restore_training(saved, networks["model"], networks["ema_model"], networks["optimizer"],
                             device.type == "cuda", networks["train_step"].scaler)
    for group in networks["optimizer"].param_groups:  # the state's own is the checkpoint's: an adjustable setting
        group["weight_decay"] = config["weight_decay"]
    return state, (resumed_from, training_position(state))


def introduce(run, saved):
    """config.json, a new run's forward-process picture, and the banner."""
    config = run.config
    if run.is_main:
        write_config_json(config, run.files.checkpoint("config.json"))
        if not saved:
            save_forward_strip(run.diffusion, run.train_loader.images[:1], run.files.output("forward_strip"))
    run.report.introduce(run, resume_changes(saved["config"], config) if saved else {})


def training_position(state):
    """Where training stands, for people: 'step 140: epoch 3, batch 5' (mid-epoch) or 'step 140: epoch 2 done'."""
    if state.batch_in_epoch:
        return f"step {state.step}: epoch {state.epoch + 1}, batch {state.batch_in_epoch}"
    return f"step {state.step}: epoch {state.epoch} done"


# ------------------------------------------------------------------------------------ the epochs

def train_epochs(run, state, clock):
    """Epoch after epoch until the config's epochs, a signal or the time budget; evaluated every --eval_every epochs
    and at the end, last.pt every --checkpoint_every. An epoch the budget cuts short is resumed from its batch."""
    config, report, options = run.config, run.report, run.options
    for epoch in report.epochs(state.epoch, config["epochs"]):
        with memory_guard(f"training on batches of {config['batch_size']}", BATCH_REMEDY):
            images_per_s = train_one_epoch(run, state, clock, epoch)
        interrupted, budget_spent = (bool(v) for v in max_over_ranks(
            [run.signals.received is not None, clock.out_of_time()], run.world_size))
        if interrupted:
            stop_on_signal(run, state, run.signals.received)
        whole = state.batch_in_epoch == len(run.train_loader)
        if budget_spent:
            state.budget_spent = True
            report.say(budget_stop_line(run, state, clock))
        evaluated = epoch == config["epochs"] or budget_spent or epoch % options.eval_every == 0
        train_loss = state.epoch_loss_sum / max(1, state.batch_in_epoch)
        losses = evaluation_losses(run, clock, epoch) if evaluated else None  # (NaN stops before the checkpoint)
        with run.signals.deferred():  # the epoch's record and checkpoints: all of them or, on a signal, none
            is_best = losses is not None and record_evaluation(run, state, epoch, train_loss, losses)
            if whole:
                state.finish_epoch(epoch)
            if evaluated or epoch % options.checkpoint_every == 0:
                save_epoch_checkpoints(run, state, is_best)
        if evaluated and run.is_main:  # the grid after the checkpoint: a picture never delays it
            write_epoch_grid(run, state, clock, epoch)
        with run.signals.deferred():
            report.epoch_done(epoch, state.step, train_loss, losses, images_per_s,
                              None if whole else f"{state.batch_in_epoch} of {len(run.train_loader)} batches")
        if budget_spent:
            break


def budget_stop_line(run, state, clock):
    """What to say when the time budget stops training: where, the time used, and what is left for."""
    return (f"time budget: training stopped at {training_position(state)} of {len(run.train_loader)}, "
            f"{clock.used_s() / 60:.1f} of {run.config['time_budget_min']:g} min used; the rest is for "
            f"{end_of_run_work_text(run)} (about {clock.reserve_s / 60:.1f} min)")


def end_of_run_work_text(run):
    """The end-of-run work, for people: 'the losses, the grid and the checkpoints' (and FID, the bound)."""
    parts = ["the losses", "the grid", "the checkpoints"] + \
        [what for what, asked in (("FID", run.options.eval_fid), ("the bound", run.options.eval_nll)) if asked]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def end_of_run_seconds(run, clock):
    """The end-of-run work's seconds at the speeds the clock measured: the last evaluation, FID, the bound and the
    checkpoint writes."""
    options, forward_s = run.options, clock.forward_s_per_image()
    forwards = sum(loader.num_local for loader in run.eval_loaders.values())
    if run.is_main:
        forwards += grid_layout(run.config["num_classes"])[1] * network_evaluations(run.grid_sampler)
        forwards += options.eval_fid * network_evaluations(run.sampler) + options.eval_nll * run.config["timesteps"]
    inception_s = options.eval_fid * run.fid_features.seconds_per_image if options.eval_fid and run.is_main else 0.0
    return forwards * forward_s + inception_s + (3 + options.save_model) * clock.save_s


def network_evaluations(sampler):
    """Forward passes of one image a sample costs (guidance counted at every step: an upper bound)."""
    return sampler.settings.steps * sampler.settings.evaluations_per_step(sampler.config["conditional"])


def train_one_epoch(run, state, clock, epoch):
    """The epoch's steps from where it stands, until its end, a signal or the time budget; losses stay on the device
    until a read-out (every --log_interval steps). Returns training images per second."""
    config, world_size, steps_per_epoch = run.config, run.world_size, len(run.train_loader)
    run.model.train()
    loss_sum = torch.tensor(state.epoch_loss_sum, device=run.device)
    skipped = torch.zeros((), device=run.device)  # fp16 steps the loss scaler skipped in this epoch
    batches = run.report.batches(run.train_loader.batches(epoch, state.batch_in_epoch), steps_per_epoch,
                                 state.batch_in_epoch, epoch)
    clock.start_epoch()
    interval_start, interval_images, epoch_images = clock.epoch_start, 0, 0
    with run.signals.between_steps():
        for x, y in batches:  # x (B, 3, H, W) in [−1, 1], y (B,)
            with clock.step(len(x)):
                # how far along, for the lr decay: by training time under a budget (as the ranks last agreed), else
                # by steps
                progress = (clock.agreed_progress if config["time_budget_min"]
                            else state.step / (config["epochs"] * steps_per_epoch))
                lr = learning_rate(config, state.step, progress)
                loss, step_skipped = run.train_step(x, y, state.step, lr)
                loss_sum += loss
                skipped += step_skipped
                state.step += 1
                state.batch_in_epoch += 1
            interval_images += len(x)
            epoch_images += len(x)
            if state.step % run.options.log_interval == 0:
                running = (all_ranks_mean(loss_sum, world_size) / state.batch_in_epoch).item()
                check_finite(running, f"the training loss at epoch {epoch}, step {state.step}")
                now = time.perf_counter()
                run.report.read_out(state.step, epoch, running, lr,
                                    interval_images * world_size / (now - interval_start), clock.minutes_left(),
                                    state.skipped_steps + int(skipped.item()) if run.train_step.scaler else None)
                interval_start, interval_images = now, 0
            stop, checkpoint_due = agree_on_stop_and_checkpoint(run, clock)
            if stop:
                break
            if checkpoint_due:
                save_mid_epoch(run, state, clock, loss_sum, skipped)
    state.epoch_loss_sum = all_ranks_mean(loss_sum, world_size).item()  # waits for the device: steps are done
    state.skipped_steps += int(skipped.item())
    epoch_train_s = clock.end_epoch()
    check_finite(state.epoch_loss_sum, f"the training loss of epoch {epoch} (step {state.step})")
    return epoch_images * world_size / max(epoch_train_s, 1e-9)


def agree_on_stop_and_checkpoint(run, clock):
    """(stop inside the epoch, last.pt due), decided by all ranks in one all-reduce after every step, which also
    agrees on the lr's progress."""
    clock.keep_back(end_of_run_seconds(run, clock))
    signalled, spent, due, progress = max_over_ranks(
        [run.signals.received is not None, clock.out_of_time(), clock.checkpoint_due(run.options.checkpoint_minutes),
         clock.progress(clock.epoch_seconds())], run.world_size)
    clock.agree_on_progress(progress)
    return bool(signalled or spent), bool(due)


def check_finite(value, what):
    """NonFiniteError when a loss about to be reported or written is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} became {value}")


def save_last(run, state):
    """last.pt where training stands (rank 0 writes it and returns the dict); every rank checks the weights, so
    that NaN stops all ranks together."""
    ckpt, path, start = None, run.files.checkpoint("last.pt"), time.perf_counter()
    run.clock.stamp()
    if run.is_main:
        ckpt = run.checkpoint(state)
        save_checkpoint(ckpt, path)
    else:  # nothing to write: only the weights' check
        require_finite_weights({"model": run.model.state_dict(), "ema": run.ema_model.state_dict()})
    run.last_saved = (path, training_position(state))
    run.clock.saved(start)
    return ckpt


def save_mid_epoch(run, state, clock, loss_sum, skipped):
    """last.pt inside an epoch, with the epoch's loss sum, fp16 skips and training time so far: a resume continues
    from this very step."""
    clock.stamp()
    timing = {**state.timing, "train_s": state.timing["train_s"] + clock.epoch_seconds()}
    snapshot = dataclasses.replace(state, epoch_loss_sum=all_ranks_mean(loss_sum, run.world_size).item(),
                                   skipped_steps=state.skipped_steps + int(skipped.item()), timing=timing)
    save_last(run, snapshot)


def save_epoch_checkpoints(run, state, is_best):
    """last.pt, and best.pt (without the optimizer) when the validation loss is the best so far."""
    last = save_last(run, state)
    if is_best and run.is_main:
        save_checkpoint(last, run.files.checkpoint("best.pt"), with_optimizer=False)


def stop_on_signal(run, state, signal_name):
    """Save last.pt where training stands (unless just saved there), then stop with the command that resumes."""
    if run.last_saved != (run.files.checkpoint("last.pt"), training_position(state)):
        save_last(run, state)
    barrier(run.world_size)
    raise Interrupted(f"{signal_name or 'a signal (on another rank)'} received: stopped at {training_position(state)}"
                      f"; saved {run.files.checkpoint('last.pt')}. Resume with:\n"
                      f"  {resume_command(run.options.argv, resume='auto')}")


def resume_command(argv, **flags):
    """This run's command line (argv) with each of `flags` (e.g. resume="auto") in place of its value."""
    replaced = {f"--{name}" for name in flags}
    kept, argv = [], iter(argv)
    for arg in argv:
        if arg.split("=")[0] not in replaced:
            kept.append(arg)
        elif "=" not in arg:
            next(argv, None)  # "--flag value": drop the value too
    return " ".join(["python", sys.argv[0], *kept, *(f"--{name} {value}" for name, value in flags.items())])


def evaluation_losses(run, clock, epoch):
    """EMA validation and test losses ({'val_loss', 'test_loss'}, fixed t and ε); NonFiniteError on NaN."""
    config = run.config
    start = time.perf_counter()
    with clock.timed("eval_s"), memory_guard("computing the validation and test losses", "lower --batch_size"):
        run.ema_model.eval()
        losses = {f"{split}_loss": evaluate_loss(run.diffusion, run.ema_denoiser, loader, config["conditional"],
                                                 config["loss_type"]) for split, loader in run.eval_loaders.items()}
    clock.record_forwards(time.perf_counter() - start, sum(loader.num_local for loader in run.eval_loaders.values()))
    for key, value in losses.items():  # the same on every rank: all stop together
        check_finite(value, f"the {'validation' if key == 'val_loss' else 'test'} loss of epoch {epoch}")
    return losses


def write_epoch_grid(run, state, clock, epoch):
    """The epoch's sample grid, from fixed noise (GRID_SEED) so epochs compare, to its PNG and TensorBoard."""
    labels, count, columns = grid_layout(run.config["num_classes"])
    with clock.timed("sample_s"), memory_guard("sampling the epoch's grid", SAMPLE_REMEDY):
        images = run.grid_sampler.sample(count, labels, seed=GRID_SEED)
        save_grid(images, run.files.output("epoch_grid", epoch=epoch), columns)
    run.report.grid(state.step, images, columns)


def record_evaluation(run, state, epoch, train_loss, losses):
    """The evaluation in the history (a cut-short epoch at its fraction), and on rank 0 the loss JSON and plot;
    whether the validation loss is the best so far."""
    steps_per_epoch = len(run.train_loader)
    epochs_done = epoch if state.batch_in_epoch == steps_per_epoch else \
        round(state.epoch + state.batch_in_epoch / steps_per_epoch, 3)
    is_best = state.record_evaluation(epochs_done, train_loss, losses["val_loss"], losses["test_loss"])
    if run.is_main:
        write_json(state.history, run.files.output("loss_history"))
        plot_loss_history(state.history, run.files.output("loss_curves"), run.config["run_name"])
    return is_best


def finish(run, state, clock):
    """Rank 0 writes the final checkpoint (--save_model), FID (--eval_fid) and the metrics JSON; others wait."""
    if not run.is_main:
        barrier(run.world_size)
        return
    options, config, timing = run.options, run.config, state.timing
    if options.save_model:
        save_checkpoint(run.checkpoint(state), run.files.checkpoint("ckpt.pt"))
    if options.eval_fid:
        with clock.timed("fid_s"), memory_guard("computing FID", SAMPLE_REMEDY):
            grayscale_fid_note(config, run.report.verbose)
            measured = measure_inception_metrics(run.sampler, options.eval_fid, config["seed"], run.fid_features,
                                                 run.fid_reference, run.fid_training, run.files, run.report.verbose)
        run.report.scalars(state.step, {name: measured[name] for name in LOGGED_METRICS if measured[name] is not None})
    if options.eval_nll:
        with clock.timed("nll_s"), memory_guard("computing the bound in bits/dim", SAMPLE_REMEDY):
            test_images, _ = spread(run.test_images, None, options.eval_nll)
            nll = measure_nll(run.sampler, test_images, None, options.nll_variance, config["seed"], run.files,
                              run.report.verbose)["bits_per_dim"]
    clock.stamp()
    images_seen = state.step * config["global_batch_size"]
    metrics = {"world_size": run.world_size, "run_name": config["run_name"], "device": str(run.device),
               "num_params": run.num_params, "steps": state.step,
               "epochs_done": state.epoch, "batch_size": config["batch_size"], "grad_accum": config["grad_accum"],
               "global_batch_size": config["global_batch_size"], "precision": run.precision,
               "compiled": run.train_step.denoiser.compiled, "fp16_skipped_steps": state.skipped_steps,
               "time_budget_min": config["time_budget_min"], "stopped_by_time_budget": state.budget_spent,
               "train_images_per_s": images_seen / timing["train_s"] if timing["train_s"] else None,
               "timing": timing, "final": {k: v[-1] for k, v in state.history.items() if v},
               **(measured if options.eval_fid else {}), **({"nll_bits_per_dim": nll} if options.eval_nll else {})}
    write_json(metrics, run.files.output("metrics"))
    budget = f" of the {config['time_budget_min']:g}-minute budget" if config["time_budget_min"] else ""
    run.report.say(f"done in {clock.used_s() / 60:.1f} min{budget}: loss history {run.files.output('loss_history')}, "
                   f"checkpoints in {run.files.ckpt_dir}")
    barrier(run.world_size)


def diverged_message(run, problem):
    """What to say when training produced NaN or infinity: the last good checkpoint, and the command that continues
    from it with a tenth of the learning rate."""
    lower_lr = f"{run.config['lr'] / 10:g}"
    if run.last_saved is None:
        return (f"{problem}; stopped, and this run wrote no checkpoint before that. Start again with a lower --lr "
                f"(e.g. {lower_lr}) or a larger --warmup_steps.")
    path, position = run.last_saved
    return (f"{problem}; stopped. The last good checkpoint is {path} ({position}); to continue from it with a "
            f"lower learning rate:\n  {resume_command(run.options.argv, resume=path, lr=lower_lr)}")


def write_failed_message(run, problem):
    """What to say when a file could not be written: the last good checkpoint (untouched) is where to go on from."""
    if run.last_saved is None:
        return f"{problem}; training stopped, and this run has no checkpoint yet: make room and start it again"
    path, position = run.last_saved
    return (f"{problem}; training stopped. The last good checkpoint is {path} ({position}): make room (or restore "
            f"access) and continue with --resume {path}")
