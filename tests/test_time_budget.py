"""The time budget covers the whole run, a checkpoint exists before the end-of-run work, and a signal at any moment
stops a run with last.pt saved. No test here reads the wall clock: the clock is driven by hand, the end-of-run
estimate is replaced where a test needs the budget spent, and signals are sent from inside the work they stop."""
import json
import os
import signal
import time
import types

import pytest
import torch

import ddpm_main
import ddpm_train
import ddpm_train_step
from conftest import TINY_MODEL
from ddpm_diffusion import SamplerSettings
from ddpm_train import end_of_run_seconds, grid_settings
from ddpm_train_step import TrainingClock

RUN = [*TINY_MODEL, "--seed", "5", "--log_interval", "1"]


class HandClock:
    """time.perf_counter, moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def hand_clock(monkeypatch):
    clock = HandClock()
    monkeypatch.setattr(ddpm_train_step.time, "perf_counter", clock)
    return clock


def exit_status(*argv):
    """ddpm_main.main's exit status (0 when it returns)."""
    try:
        ddpm_main.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def test_the_clock_counts_the_whole_run_and_keeps_back_the_end_of_run_work(hand_clock):
    timing = dict.fromkeys(("decode_s", "compile_s", "train_s", "eval_s", "sample_s"), 0.0) | {"wall_s": 60.0}
    clock = TrainingClock(timing, budget_min=3, compiles=False, started=hand_clock.now)
    assert clock.used_s() == 60 and clock.minutes_left() == 2       # a resumed run goes on from its used time
    clock.start_epoch()
    with clock.step(64):
        hand_clock.now += 30                                         # one step of 64 images: 30 s
    assert clock.forward_s_per_image() == 30 / 64 / 3                # before an evaluation: a third of a step
    clock.reserve_s = 40
    assert clock.training_left_s() == 180 - 90 - 40 and not clock.out_of_time()
    assert clock.progress(clock.epoch_seconds()) == 30 / (30 + 50)  # the lr's decay: trained against to train
    hand_clock.now += 50
    assert clock.out_of_time() and clock.progress(clock.epoch_seconds()) == 1
    clock.end_epoch()
    clock.stamp()
    assert timing["train_s"] == 80 and timing["wall_s"] == 140
    clock.record_forwards(2.0, 1000)
    assert clock.forward_s_per_image() == 0.002                     # measured by an evaluation


def test_last_pt_is_due_checkpoint_minutes_after_the_last_one(hand_clock, monkeypatch):
    monkeypatch.setattr(ddpm_train, "end_of_run_seconds", lambda run, clock: 0.0)
    run = types.SimpleNamespace(signals=types.SimpleNamespace(received=None), world_size=1,
                                options=types.SimpleNamespace(checkpoint_minutes=0.5), last_save_time=hand_clock.now)
    clock = TrainingClock(dict.fromkeys(("train_s", "wall_s"), 0.0), None, False)
    hand_clock.now += 29.9
    assert ddpm_train.agree_on_stop_and_checkpoint(run, clock) == (False, False)
    hand_clock.now += 0.1
    assert ddpm_train.agree_on_stop_and_checkpoint(run, clock) == (False, True)
    run.signals.received = "SIGTERM"
    assert ddpm_train.agree_on_stop_and_checkpoint(run, clock) == (True, True)


def test_an_older_checkpoint_without_wall_time_counts_its_parts(hand_clock):
    timing = {"decode_s": 5.0, "compile_s": 0.0, "train_s": 100.0, "eval_s": 10.0, "sample_s": 5.0, "wall_s": 0.0}
    assert TrainingClock(timing, 10, False, started=hand_clock.now).used_s() == 120
    assert TrainingClock(timing, None, False).training_left_s() == float("inf")  # no budget, no limit


def test_the_end_of_run_estimate_counts_each_part_of_the_work():
    """Losses on both fixed samples, the grid (80 guided images × 25 steps × 2 branches), FID (100 samples × 15
    steps × 2, and the Inception pass), the bound (10 images × T) and four checkpoint writes."""
    config = {"conditional": True, "num_classes": 10, "timesteps": 100}
    sampler = types.SimpleNamespace(config=config, settings=SamplerSettings(steps=15, guidance_scale=3))
    grid_sampler = types.SimpleNamespace(config=config, settings=SamplerSettings(steps=25, guidance_scale=3))
    run = types.SimpleNamespace(
        config=config, device=torch.device("cpu"), is_main=True, sampler=sampler, grid_sampler=grid_sampler,
        eval_loaders={"val": types.SimpleNamespace(num_local=1000), "test": types.SimpleNamespace(num_local=1000)},
        options=types.SimpleNamespace(eval_fid=100, eval_nll=10, save_model=True),
        fid_features=types.SimpleNamespace(seconds_per_image=0.5))
    clock = types.SimpleNamespace(forward_s_per_image=lambda: 0.001, save_s=2.0)
    forwards = 2000 + 80 * 25 * 2 + 100 * 15 * 2 + 10 * 100
    assert end_of_run_seconds(run, clock) == pytest.approx(forwards * 0.001 + 100 * 0.5 + 4 * 2.0)


def test_grids_on_a_cpu_use_a_fast_sampler_where_the_config_names_a_slow_one():
    slow = SamplerSettings("ddpm", guidance_scale=2, guidance_interval=(0.3, 3)).for_timesteps(1000)
    fast = grid_settings(slow, 1000, torch.device("cpu"))
    assert (fast.sampler, fast.steps, fast.guidance_scale, fast.guidance_interval) == ("dpm++2m", 25, 2, (0.3, 3))
    assert grid_settings(slow, 1000, torch.device("cuda")) == slow   # a GPU samples the grids as the config says
    quick = SamplerSettings("dpm++2m", steps=15).for_timesteps(1000)
    assert grid_settings(quick, 1000, torch.device("cpu")) == quick


def test_the_budget_stops_training_for_the_end_of_run_work_and_a_resume_asks_for_more(tiny_data, tmp_path,
                                                                                        monkeypatch, capsys):
    """With the end-of-run work estimated at the whole budget, training stops after its first step: a checkpoint,
    losses and a grid are written, the epoch is not counted as done, and a resume with the same budget is one line
    saying how to give more; with more, the run goes on from the batch it stopped at."""
    monkeypatch.chdir(tmp_path)
    reserve = {"s": 30 * 60}
    monkeypatch.setattr(ddpm_train, "end_of_run_seconds", lambda run, clock: reserve["s"])
    argv = ["--data_dir", tiny_data, "--epochs", "3", "--time_budget_min", "30", "--run_name", "b", "--sampler", "ddpm",
            *RUN]
    assert exit_status(*argv) == 0
    out = capsys.readouterr().out
    assert "time budget 30 min for the whole run" in out
    assert "grids: ddpm, 10 steps" in out  # T = 10: the config's own sampler is fast enough
    assert "time budget: training stopped at step 1: epoch 1, batch 1 of 4" in out
    metrics = json.loads((tmp_path / "outputs" / "metrics_b.json").read_text())
    assert metrics["stopped_by_time_budget"] and metrics["steps"] == 1 and metrics["epochs_done"] == 0
    history = json.loads((tmp_path / "outputs" / "loss_history_b.json").read_text())
    assert history["epochs"] == [0.25] and len(history["val_loss"]) == 1
    assert (tmp_path / "outputs" / "samples_b_epoch001.png").is_file()
    last = tmp_path / "models" / "b" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["batch_in_epoch"], saved["budget_spent"]) == (0, 1, True)

    before = last.read_bytes()
    assert exit_status("--resume", "auto", "--run_name", "b", "--no_cuda") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "the time budget is spent" in err and "--time_budget_min" in err
    assert last.read_bytes() == before

    reserve["s"] = 0.0
    assert exit_status("--resume", "auto", "--run_name", "b", "--no_cuda", "--time_budget_min", "60") == 0
    out = capsys.readouterr().out
    assert "resuming 'b' from models/b/last.pt at epoch 1, batch 1" in out
    assert torch.load(last, weights_only=True)["step"] == 3 * 4  # every epoch, whole


def test_a_checkpoint_exists_before_the_end_of_run_work(tiny_data, tmp_path, monkeypatch):
    """last.pt of the last step is on disk when the grid, the first of the end-of-run work that takes long (the grid,
    ckpt.pt, FID, the bound), begins: only the losses, which must be finite for it to be written, come before."""
    monkeypatch.chdir(tmp_path)
    last, seen, write_epoch_grid = tmp_path / "models" / "c" / "last.pt", [], ddpm_train.write_epoch_grid

    def look_first(run, state, clock, epoch):
        seen.append(last.is_file() and torch.load(last, weights_only=True)["step"] == state.step == 4)
        write_epoch_grid(run, state, clock, epoch)

    monkeypatch.setattr(ddpm_train, "write_epoch_grid", look_first)
    assert exit_status("--data_dir", tiny_data, "--epochs", "1", "--run_name", "c", "--quiet", *RUN) == 0
    assert seen == [True]


def signal_inside(monkeypatch, module, name, signum=signal.SIGTERM):
    """module.name replaced by a stand-in that sends this process signum, then would work on for a minute; returns
    a list that records whether the work ever went on after the signal."""
    went_on = []

    def stand_in(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(60)  # a minute of "work"
        went_on.append(True)

    monkeypatch.setattr(module, name, stand_in)
    return went_on


@pytest.mark.parametrize("where", ["the epoch's losses", "the grid", "FID"])
def test_a_signal_during_the_end_of_run_work_stops_at_once_with_last_pt(where, tiny_data, tmp_path, monkeypatch,
                                                                        capsys, fake_inception):
    monkeypatch.chdir(tmp_path)
    module, name = {"the epoch's losses": (ddpm_train, "evaluate_loss"), "the grid": (ddpm_train, "write_epoch_grid"),
                    "FID": (ddpm_train, "measure_fid_and_is")}[where]
    went_on = signal_inside(monkeypatch, module, name)
    fid = ["--eval_fid", "10", "--fid_inception", fake_inception] if where == "FID" else []
    assert exit_status("--data_dir", tiny_data, "--epochs", "1", "--run_name", "s", *RUN, *fid) == 130
    err = capsys.readouterr().err
    assert "SIGTERM received: stopped at step 4" in err and "--resume auto" in err and not went_on
    assert torch.load(tmp_path / "models" / "s" / "last.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "outputs" / "metrics_s.json").exists()  # the run did not finish


def test_a_signal_during_an_evaluation_resumes_as_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """SIGINT in the grid of epoch 1 of 2: last.pt is epoch 1's steps, not yet evaluated; the resume evaluates it
    once, and the two runs' histories and weights are the same."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data_dir", tiny_data, "--epochs", "2", "--quiet", *RUN]
    write_epoch_grid = ddpm_train.write_epoch_grid
    signal_inside(monkeypatch, ddpm_train, "write_epoch_grid", signal.SIGINT)
    assert exit_status(*argv, "--run_name", "i") == 130
    monkeypatch.setattr(ddpm_train, "write_epoch_grid", write_epoch_grid)
    assert exit_status("--resume", "auto", "--run_name", "i", "--no_cuda", "--quiet") == 0
    assert exit_status(*argv, "--run_name", "ref") == 0
    histories = [json.loads((tmp_path / "outputs" / f"loss_history_{n}.json").read_text()) for n in ("i", "ref")]
    assert histories[0] == histories[1] and histories[0]["epochs"] == [1, 2]
    weights = [torch.load(tmp_path / "models" / n / "last.pt", weights_only=True)["ema"] for n in ("i", "ref")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
