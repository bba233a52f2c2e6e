"""A training run, once set up (ddpm_train_setup.py): epoch after epoch of training steps, evaluation (losses, grids,
plots), checkpoint saves, stopping on a signal or the time budget, and the end (final checkpoint, FID, metrics).

ddpm_main.py's train() is the story these pieces make; the step itself, the clock and the reporting are in
ddpm_train_step.py. Nothing here reads the command line: a run takes its config (what it trains) and TrainingOptions
(how it goes about it).
"""
import dataclasses
import math
import sys
import time

import torch

from ddpm_checkpoint import require_finite_weights, save_checkpoint
from ddpm_helpers import Interrupted, NonFiniteError, write_json
from ddpm_pictures import GRID_PER_CLASS, GRID_SEED, GRID_UNCONDITIONAL, MAX_CLASS_ROWS, plot_loss_history, save_grid
from ddpm_runtime import all_ranks_mean, barrier, max_over_ranks, memory_guard
from ddpm_sample import grayscale_fid_note, measure_fid_and_is, measure_nll, spread
from ddpm_train_setup import training_position
from ddpm_train_step import evaluate_loss, learning_rate

BATCH_REMEDY = "lower --batch_size (--grad_accum K keeps K × --batch_size images a step)"
SAMPLE_REMEDY = "lower --sample_batch"


def train_epochs(run, state, clock):
    """Epoch after epoch until the config's epochs, a signal (last.pt saved, then Interrupted) or the time budget
    (the end-of-run work's time kept back) stops training; each evaluated every --eval_every epochs and at the end,
    last.pt saved every --checkpoint_every epochs, when evaluated, and before the end-of-run work starts. An epoch
    the budget cuts short is not counted as done: a resume goes on from its batch."""
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
    """The end-of-run work's seconds, estimated from the speeds the clock has measured: the last evaluation (its
    losses and grid), --eval_fid's samples and Inception pass, --eval_nll's T evaluations an image, and the
    checkpoint writes (last.pt before and after the evaluation, best.pt, ckpt.pt)."""
    options, forward_s = run.options, clock.forward_s_per_image()
    forwards = sum(loader.num_local for loader in run.eval_loaders.values())
    if run.is_main:
        forwards += grid_size(run) * network_evaluations(run.grid_sampler)
        forwards += options.eval_fid * network_evaluations(run.sampler) + options.eval_nll * run.config["timesteps"]
    inception_s = options.eval_fid * run.fid_features.seconds_per_image if options.eval_fid and run.is_main else 0.0
    return forwards * forward_s + inception_s + (3 + options.save_model) * clock.save_s


def network_evaluations(sampler):
    """Forward passes of one image a sample costs: the sampler's steps, twice where classifier-free guidance runs
    both branches (counted at every step: an upper bound with a guidance interval)."""
    guided = sampler.config["conditional"] and sampler.settings.guidance_scale not in (0, 1)
    return sampler.settings.steps * (2 if guided else 1)


def train_one_epoch(run, state, clock, epoch):
    """The epoch's training steps, from where it stands to its end, or until a signal or the time budget stops
    them (checked after every step). Losses stay on the device until a read-out (every --log_interval steps), the
    only host syncs. Returns the epoch's training images per second."""
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
    """Whether to stop inside the epoch (a signal, or the budget spent once the end-of-run work's time is kept
    back), and whether last.pt is due (--checkpoint_minutes since the last one): after every step, decided by all
    ranks together in one all-reduce of host numbers, which also agrees on the lr's progress."""
    clock.reserve_s = end_of_run_seconds(run, clock)
    due = time.perf_counter() - run.last_save_time >= run.options.checkpoint_minutes * 60
    signalled, spent, due, clock.agreed_progress = max_over_ranks(
        [run.signals.received is not None, clock.out_of_time(), due, clock.progress(clock.epoch_seconds())],
        run.world_size)
    return bool(signalled or spent), bool(due)


def check_finite(value, what):
    """NonFiniteError when a loss about to be reported or written is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} became {value}")


def save_last(run, state):
    """last.pt where training stands (rank 0 writes it and gets the checkpoint dict back; other ranks None). Every
    rank checks the weights (the same on all), so that NaN weights stop all ranks together and are never written."""
    ckpt, path, start = None, run.files.checkpoint("last.pt"), time.perf_counter()
    run.clock.stamp()
    if run.is_main:
        ckpt = run.checkpoint(state)
        save_checkpoint(ckpt, path)
    else:  # nothing to write: only the weights' check
        require_finite_weights({"model": run.model.state_dict(), "ema": run.ema_model.state_dict()})
    run.last_saved, run.last_save_time = (path, training_position(state)), time.perf_counter()
    run.clock.save_s = run.last_save_time - start
    return ckpt


def save_mid_epoch(run, state, clock, loss_sum, skipped):
    """last.pt inside an epoch (--checkpoint_minutes): the position, the epoch's loss sum and fp16 skips, and the
    training time so far, so that a resume continues from this very step."""
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
    """Save last.pt where training stands (mid-epoch included; not again when it was just saved there), then stop
    with the command that resumes."""
    if run.last_saved != (run.files.checkpoint("last.pt"), training_position(state)):
        save_last(run, state)
    barrier(run.world_size)
    raise Interrupted(f"{signal_name or 'a signal (on another rank)'} received: stopped at {training_position(state)}"
                      f"; saved {run.files.checkpoint('last.pt')}. Resume with:\n"
                      f"  {resume_command(run.options.command_line, resume='auto')}")


def resume_command(argv, **flags):
    """The command line of this run (its arguments: argv) with each of `flags` (e.g. resume="auto") in place of
    its value there."""
    replaced = {f"--{name}" for name in flags}
    kept, argv = [], iter(argv)
    for arg in argv:
        if arg.split("=")[0] not in replaced:
            kept.append(arg)
        elif "=" not in arg:
            next(argv, None)  # "--flag value": drop the value too
    return " ".join(["python", sys.argv[0], *kept, *(f"--{name} {value}" for name, value in flags.items())])


def evaluation_losses(run, clock, epoch):
    """EMA validation and test losses on EVAL_IMAGES of each split (fixed t and ε, so epochs compare): {'val_loss',
    'test_loss'}; NonFiniteError on NaN, before anything is written from them."""
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
    with clock.timed("sample_s"), memory_guard("sampling the epoch's grid", SAMPLE_REMEDY):
        images = run.grid_sampler.sample(grid_size(run), grid_labels(run), seed=GRID_SEED)
        save_grid(images, run.files.output("epoch_grid", epoch=epoch), grid_columns(run))
    run.report.grid(state.step, images, grid_columns(run))


def record_evaluation(run, state, epoch, train_loss, losses):
    """The evaluation in the history (an epoch the time budget cut short at the fraction of it done), and on rank 0
    the loss JSON and plot. Returns whether the validation loss is the best so far."""
    steps_per_epoch = len(run.train_loader)
    epochs_done = epoch if state.batch_in_epoch == steps_per_epoch else \
        round(state.epoch + state.batch_in_epoch / steps_per_epoch, 3)
    is_best = state.record_evaluation(epochs_done, train_loss, losses["val_loss"], losses["test_loss"])
    if run.is_main:
        write_json(state.history, run.files.output("loss_history"))
        plot_loss_history(state.history, run.files.output("loss_curves"), run.config["run_name"])
    return is_best


def grid_labels(run):
    """The per-epoch grid's class labels: GRID_PER_CLASS of each class, a row each (with more than MAX_CLASS_ROWS
    classes, one image per class); None for an unconditional model."""
    num_classes = run.config["num_classes"]
    if not run.config["conditional"]:
        return None
    per_class = GRID_PER_CLASS if num_classes <= MAX_CLASS_ROWS else 1
    return torch.arange(num_classes, device=run.device).repeat_interleave(per_class)


def grid_size(run):
    """Images in the per-epoch grid: GRID_UNCONDITIONAL unconditional, else one per grid label."""
    labels = grid_labels(run)
    return GRID_UNCONDITIONAL if labels is None else len(labels)


def grid_columns(run):
    """The per-epoch grid's columns: 8 (8 × 8 unconditional, 8 per class a row), or about √K for K > MAX_CLASS_ROWS
    classes."""
    num_classes = run.config["num_classes"]
    if run.config["conditional"] and num_classes > MAX_CLASS_ROWS:
        return math.isqrt(num_classes - 1) + 1  # ⌈√K⌉ columns
    return GRID_PER_CLASS


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
            measured = measure_fid_and_is(run.sampler, options.eval_fid, config["seed"], run.fid_features,
                                          run.fid_reference, run.files.output("fid_samples"), run.report.verbose)
        run.report.scalars(state.step, {name: measured[name] for name in ("fid", "inception_score")
                                        if measured[name] is not None})
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
    """What to say when training produced NaN or infinity: the problem, the last checkpoint that is really good
    (or that there is none), and the command that continues from it with a tenth of the learning rate."""
    lower_lr = f"{run.config['lr'] / 10:g}"
    if run.last_saved is None:
        return (f"{problem}; stopped, and this run wrote no checkpoint before that. Start again with a lower --lr "
                f"(e.g. {lower_lr}) or a larger --warmup_steps.")
    path, position = run.last_saved
    return (f"{problem}; stopped. The last good checkpoint is {path} ({position}); to continue from it with a "
            f"lower learning rate:\n  {resume_command(run.options.command_line, resume=path, lr=lower_lr)}")


def write_failed_message(run, problem):
    """What to say when a file could not be written: training stops (it does not go on as if saved), and the last
    good checkpoint, which the failed write left as it was, is where to go on from."""
    if run.last_saved is None:
        return f"{problem}; training stopped, and this run has no checkpoint yet: make room and start it again"
    path, position = run.last_saved
    return (f"{problem}; training stopped. The last good checkpoint is {path} ({position}): make room (or restore "
            f"access) and continue with --resume {path}")
