"""A training run (ddpm_train, ddpm_train_step): the step, EMA and lr, the run end to end, resume, the time budget,
TensorBoard, torchrun."""
import importlib.util
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import ddpm_flags
import ddpm_main
import ddpm_train
import ddpm_train_step
from conftest import MAIN, ROOT, TINY_MODEL, make_image_folder, run_main
from ddpm_config import ADJUSTABLE_SETTINGS, FIXED_SETTINGS, stored_settings
from ddpm_diffusion import SamplerSettings
from ddpm_train import end_of_run_seconds, grid_settings
from ddpm_train_step import TrainingClock, learning_rate, update_ema


def test_training_writes_history_checkpoint_and_grids(trained):
    history = json.loads((trained / "outputs" / "loss_history_cond.json").read_text())
    assert set(history) == {"train_loss", "val_loss", "test_loss", "epochs"}
    assert history["epochs"] == [1]
    assert all(len(history[k]) == 1 and np.isfinite(history[k][0]) for k in history)
    grid = Image.open(trained / "outputs" / "samples_cond_epoch001.png")
    assert grid.size == (8 * 18 + 2, 10 * 18 + 2)  # one row per class, 8 columns of 16 px + 2 px padding
    assert (trained / "outputs" / "loss_curves_cond.png").is_file()
    ckpt = torch.load(trained / "models" / "cond" / "ckpt.pt", weights_only=True)
    config = ckpt["config"]
    assert config["conditional"] and config["num_classes"] == 10
    assert config["model"]["dim"] == 8 and config["model"]["dim_mults"] == [1, 2] and config["timesteps"] == 10
    assert config["schedule"] == "cosine" and config["image_size"] == 16
    assert config["num_train"] == 27 and config["num_val"] == 3 and config["num_test"] == 10
    assert {"model", "ema", "optimizer", "epoch"} <= set(ckpt)
    uncond = torch.load(trained / "models" / "uncond" / "ckpt.pt", weights_only=True)
    assert uncond["config"]["num_classes"] is None


def test_log_has_a_line_per_epoch_without_a_terminal(tiny_data, tmp_path):
    result = run_main("--data_dir", tiny_data, "--epochs", "2", "--eval_every", "2", "--run_name", "log",
                     *TINY_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all("img/s" in line for line in lines)
    assert lines[0].startswith("epoch 1/2  train ") and "val" not in lines[0]  # not an evaluation epoch
    assert lines[1].startswith("epoch 2/2  train ") and "  val " in lines[1] and "  test " in lines[1]


def test_without_a_terminal_training_logs_a_line_per_read_out_at_most_once_a_minute(tiny_data, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--data_dir", tiny_data, "--epochs", "2", "--log_interval", "2", "--time_budget_min", "5", *TINY_MODEL]
    monkeypatch.setattr(ddpm_train_step, "LOG_LINE_SECONDS", math.inf)  # the minute never passes, however slow the run
    ddpm_main.main([*argv, "--run_name", "slow"])
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    monkeypatch.setattr(ddpm_train_step, "LOG_LINE_SECONDS", 0)
    ddpm_main.main([*argv, "--run_name", "fast"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[:2] for line in lines] == [["step 2", "epoch 1"], ["step 4", "epoch 1"],
                                                         ["step 6", "epoch 2"], ["step 8", "epoch 2"]]
    assert all(re.fullmatch(r"step \d  epoch \d  loss \d\.\d{4}  lr \S+  \d+ img/s  \d\.\d min of the budget left",
                            line) for line in lines), lines


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMMON = ["--conditional", "--seed", "3", "--dim", "8", "--dim_mults", "1,2", "--timesteps", "10", "--no_cuda",
          "--log_interval", "2", "--precision", "fp32"]  # fp32: the comparisons are to float32 round-off


def torchrun(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 40 training images → 36 train / 4 validation; 20 test: every split divides by 2 ranks
    return make_image_folder(str(tmp_path_factory.mktemp("ddp_data")), per_class_train=4, per_class_test=2)


def test_two_ranks_accumulating_match_one_process_with_the_global_batch_and_resume(data, tmp_path):
    """2 ranks × 2 micro-batches of 2 = one process with batch 8: the same losses and weights (so the ranks' shards
    are the single process's epoch; the loader's sharding alone: tests/test_data.py)."""
    first = torchrun([MAIN, "--data_dir", data, "--epochs", "1", "--batch_size", "2", "--grad_accum", "2",
                      "--run_name", "ddp", *COMMON], tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("training 'ddp'") == 1 and "2 ranks × batch 2" in first.stdout  # rank 0 prints
    assert "2 micro-batches of 2 per optimizer step on each of 2 ranks: 8 images a step" in first.stdout
    resumed = torchrun([MAIN, "--epochs", "2", "--run_name", "ddp", "--resume", "auto", "--save_model", "--no_cuda"],
                       tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    single = run_main("--data_dir", data, "--epochs", "2", "--batch_size", "8", "--run_name", "single",
                     "--save_model", *COMMON, cwd=tmp_path)
    assert single.returncode == 0, single.stderr

    ddp = json.loads((tmp_path / "outputs" / "loss_history_ddp.json").read_text())
    one = json.loads((tmp_path / "outputs" / "loss_history_single.json").read_text())
    assert ddp["epochs"] == one["epochs"] == [1, 2]
    for key in ("train_loss", "val_loss", "test_loss"):  # equal up to float32 reduction order
        assert ddp[key] == pytest.approx(one[key], rel=1e-4), key
    a = torch.load(tmp_path / "models" / "ddp" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "models" / "single" / "ckpt.pt", weights_only=True)
    for name in a["model"]:
        # Adam divides by √v: float32 round-off in near-zero gradients moves a weight by up to ~lr per step
        assert torch.allclose(a["model"][name], b["model"][name], atol=2e-3), name
    assert a["config"]["world_size"] == 2 and a["config"]["global_batch_size"] == 8 and a["step"] == b["step"]
    outputs = sorted(p.name for p in (tmp_path / "outputs").iterdir() if "ddp" in p.name)
    assert outputs == ["forward_process_ddp.png", "loss_curves_ddp.png", "loss_history_ddp.json", "metrics_ddp.json",
                       "samples_ddp_epoch001.png", "samples_ddp_epoch002.png"]
    assert json.loads((tmp_path / "outputs" / "metrics_ddp.json").read_text())["world_size"] == 2


def test_the_time_budget_is_checked_after_every_step_under_torchrun(data, tmp_path):
    """0.03 s, spent by the set-up: both ranks stop together after the first step, not at the first --log_interval
    read-out (here 100 steps)."""
    result = torchrun([MAIN, "--data_dir", data, "--epochs", "50", "--batch_size", "2", "--time_budget_min", "0.0005",
                       "--run_name", "budget", *COMMON, "--log_interval", "100"], tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "outputs" / "metrics_budget.json").read_text())
    assert metrics["steps"] == 1 and metrics["stopped_by_time_budget"] and metrics["world_size"] == 2


@pytest.fixture(scope="module")
def paper_preset_run(tiny_data, tmp_path_factory):
    """A 1-epoch run of the paper preset, shrunk to the tiny data (16×16 images, T = 10)."""
    cwd = tmp_path_factory.mktemp("preset")
    result = run_main("--preset", "ddpm_cifar10", "--data_dir", tiny_data, "--dim", "8", "--groups", "4",
                      "--dim_mults", "1,2", "--attn_resolutions", "8", "--timesteps", "10", "--batch_size", "8",
                      "--epochs", "1", "--eval_every", "1", "--save_model", "--run_name", "paper", "--no_cuda",
                      "--precision", "fp32", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def test_a_preset_run_stores_its_network_and_inference_rebuilds_it(paper_preset_run, tmp_path):
    config = json.load(open(paper_preset_run / "models" / "paper" / "config.json"))
    assert config["model"]["architecture"] == "ddpm" and config["model"]["dropout"] == 0.1
    assert config["weight_decay"] == 0 and config["sampling"]["sampler"] == "ddpm"
    result = run_main("--inference", "--model_path", paper_preset_run / "models" / "paper" / "ckpt.pt",
                      "--denoising_strip", "--save_dir", tmp_path, "--precision", "fp32", cwd=paper_preset_run)
    assert result.returncode == 0, result.stderr
    assert "denoising strip (8 samples, x̂_0 at 10 of 10 steps, ddpm" in result.stdout
    assert (tmp_path / "denoising_strip_paper.png").stat().st_size > 0 and not (tmp_path / "samples_paper.png").exists()


def test_ema_update_is_a_lerp():
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for b, e, m in zip(before, ema.parameters(), model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * m)


def test_a_budget_spent_by_the_set_up_still_trains_a_step_and_finishes_cleanly(tiny_data, tmp_path):
    """0.03 s: the set-up alone spends it (the budget is the whole run's). One step, then the losses, the grid and
    the checkpoints; the epoch it cut short is not counted as done."""
    result = run_main("--data_dir", tiny_data, "--epochs", "500", "--time_budget_min", "0.0005", "--save_model",
                     "--run_name", "budget", *TINY_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "time budget: training stopped at step 1: epoch 1, batch 1 of 4" in result.stdout
    metrics = json.loads((tmp_path / "outputs" / "metrics_budget.json").read_text())
    assert metrics["stopped_by_time_budget"] and metrics["steps"] == 1 and metrics["epochs_done"] == 0
    assert set(metrics["timing"]) >= {"decode_s", "compile_s", "train_s", "eval_s", "sample_s", "wall_s"}
    history = json.loads((tmp_path / "outputs" / "loss_history_budget.json").read_text())
    assert history["epochs"] == [0.25] and history["val_loss"]
    assert (tmp_path / "models" / "budget" / "ckpt.pt").is_file()
    assert (tmp_path / "outputs" / "samples_budget_epoch001.png").is_file()


def test_learning_rate_warmup_and_cosine_decay():
    flags = vars(ddpm_flags.build_parser().parse_args(["--lr", "0.01", "--warmup_steps", "10", "--lr_decay",
                                                         "cosine"]))
    assert learning_rate(flags, 0, 0.0) == pytest.approx(0.001)
    assert learning_rate(flags, 9, 0.0) == pytest.approx(0.01)
    assert learning_rate(flags, 500, 0.5) == pytest.approx(0.005)
    assert learning_rate(flags, 900, 1.0) == pytest.approx(0.0, abs=1e-12)
    flags["lr_decay"] = "none"
    assert learning_rate(flags, 900, 1.0) == pytest.approx(0.01)


def test_v_prediction_min_snr_cosine_run_end_to_end(tiny_data, tmp_path):
    result = run_main("--data_dir", tiny_data, "--conditional", "--epochs", "2", "--prediction", "v",
                     "--min_snr_gamma", "5", "--lr_decay", "cosine", "--save_model", "--run_name", "v",
                     *TINY_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = torch.load(tmp_path / "models" / "v" / "ckpt.pt", weights_only=True)["config"]
    assert (config["prediction"], config["min_snr_gamma"], config["lr_decay"]) == ("v", 5.0, "cosine")
    history = json.loads((tmp_path / "outputs" / "loss_history_v.json").read_text())
    assert all(np.isfinite(history["val_loss"]))
    sampled = run_main("--inference", "--conditional", "--model_path", "models/v/ckpt.pt", "--num_samples", "3",
                      "--sampler", "ddim", "--sampling_steps", "3", "--no_cuda", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr


RUN = TINY_MODEL + ["--seed", "7", "--log_interval", "1"]


def main(*argv):
    """ddpm_main.main in this process, in the current folder (monkeypatch.chdir it to the test's)."""
    ddpm_main.main([str(a) for a in argv])


def history(cwd, name):
    return json.loads((cwd / "outputs" / f"loss_history_{name}.json").read_text())


def assert_same_history(a, b):
    """Same epochs; losses equal to float32 round-off (CPU runs are deterministic)."""
    assert a["epochs"] == b["epochs"]
    for key in ("train_loss", "val_loss", "test_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def assert_same_weights(path_a, path_b):
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.allclose(a[key][name], b[key][name], rtol=1e-5, atol=1e-6), (key, name)


def test_resume_after_epoch_1_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch, capsys):
    """Non-default settings survive a --resume that names none of them, and the resumed run is the uninterrupted
    one. (Not --lr_decay cosine: its horizon is --epochs, so a 1-epoch run decays faster than the first epoch of
    a 2-epoch one, by design.)"""
    monkeypatch.chdir(tmp_path)
    settings = ["--conditional", "--lr", "0.002", "--warmup_steps", "3", "--p_uncond", "0.3", "--ema_decay", "0.99",
                "--prediction", "v", "--min_snr_gamma", "5", "--loss_type", "l1", "--schedule", "linear", "--seed",
                "11", "--log_interval", "1", *TINY_MODEL]
    main("--data_dir", tiny_data, "--epochs", "2", "--run_name", "full", *settings, "--quiet")
    main("--data_dir", tiny_data, "--epochs", "1", "--run_name", "part", *settings, "--quiet")
    main("--resume", "auto", "--epochs", "2", "--run_name", "part", "--no_cuda")
    assert "resuming 'part' from models/part/last.pt at epoch 2, batch 0" in capsys.readouterr().out
    assert_same_history(history(tmp_path, "full"), history(tmp_path, "part"))
    assert_same_weights(tmp_path / "models" / "full" / "last.pt", tmp_path / "models" / "part" / "last.pt")
    assert (tmp_path / "outputs" / "samples_part_epoch002.png").is_file()  # the grids continue too
    configs = [torch.load(tmp_path / "models" / n / "last.pt", weights_only=True)["config"] for n in ("full", "part")]
    configs = [stored_settings(c) for c in configs]  # the network's settings: in its model entry
    kept = FIXED_SETTINGS + ADJUSTABLE_SETTINGS
    assert {k: configs[1][k] for k in kept} == {k: configs[0][k] for k in kept}
    config = json.loads((tmp_path / "models" / "part" / "config.json").read_text())
    assert config["conditional"] and config["versions"]["torch"] == torch.__version__


def test_best_checkpoint_follows_validation_loss(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main("--data_dir", tiny_data, "--epochs", "3", "--run_name", "b", *RUN, "--quiet")
    val = history(tmp_path, "b")["val_loss"]
    best = torch.load(tmp_path / "models" / "b" / "best.pt", weights_only=True)
    assert best["epoch"] == 1 + val.index(min(val)) and "optimizer" not in best
    assert torch.load(tmp_path / "models" / "b" / "last.pt", weights_only=True)["epoch"] == 3
    assert not (tmp_path / "models" / "b" / "ckpt.pt").exists()  # only with --save_model


def start_training(tiny_data, cwd, name, epochs):
    return subprocess.Popen([sys.executable, MAIN, "--data_dir", str(tiny_data), "--conditional", "--epochs",
                             str(epochs), "--run_name", name, *RUN], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def interrupt_after_first_epoch(proc, signum):
    line = proc.stdout.readline()                     # "training ..."
    while not line.startswith("epoch 1/"):
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    time.sleep(0.3)                                   # usually lands inside epoch 2
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigint_saves_state_and_resume_matches_uninterrupted(tiny_data, tmp_path, monkeypatch):
    proc = start_training(tiny_data, tmp_path, "sig", 40)
    code, err = interrupt_after_first_epoch(proc, signal.SIGINT)
    assert code == 130, err
    assert "SIGINT received" in err and "--resume auto" in err and "Traceback" not in err
    last = torch.load(tmp_path / "models" / "sig" / "last.pt", weights_only=True)
    end = last["epoch"] + 1                            # finish the epoch it stopped in (or the next one)
    monkeypatch.chdir(tmp_path)
    main("--resume", "auto", "--epochs", end, "--run_name", "sig", "--no_cuda", "--quiet")
    main("--data_dir", tiny_data, "--conditional", "--epochs", end, "--run_name", "ref", *RUN, "--quiet")
    assert_same_history(history(tmp_path, "sig"), history(tmp_path, "ref"))
    assert_same_weights(tmp_path / "models" / "sig" / "last.pt", tmp_path / "models" / "ref" / "last.pt")


def test_kill_9_loses_at_most_checkpoint_minutes_and_resumes_exactly(tiny_data, tmp_path, monkeypatch, capsys):
    """SIGKILL (or the OOM killer) gives no chance to save: last.pt written every --checkpoint_minutes (here 1.2 s),
    mid-epoch included, is what is left, and the resumed run ends with the uninterrupted run's weights. The kill
    comes once a periodic write past the first epoch is seen, however slowly the machine runs (the period itself is
    test_time_budget's)."""
    data = make_image_folder(str(tmp_path / "data"), per_class_train=8)  # 72 training images: 9 steps per epoch
    run = ["--data_dir", data, "--run_name", "k9", "--checkpoint_every", "1000", "--eval_every", "1000",
           "--checkpoint_minutes", "0.02", *RUN]
    proc = subprocess.Popen([sys.executable, MAIN, *run, "--epochs", "1000"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "models" / "k9" / "last.pt"
    while proc.poll() is None and not (last.exists() and torch.load(last, weights_only=True)["step"] > 9):
        time.sleep(0.2)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    saved = torch.load(last, weights_only=True)
    assert saved["step"] > 9                           # a periodic write after the first epoch
    end = saved["epoch"] + 1                           # finish the epoch it was killed in
    monkeypatch.chdir(tmp_path)
    main(*run, "--resume", "auto", "--epochs", end)
    assert f"at epoch {end}, batch {saved['batch_in_epoch']}" in capsys.readouterr().out
    main(*run, "--run_name", "k9_ref", "--epochs", end, "--quiet")
    assert_same_weights(last, tmp_path / "models" / "k9_ref" / "last.pt")


def test_resume_takes_adjustable_flags_and_refuses_to_change_the_model(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main("--data_dir", tiny_data, "--epochs", "1", "--run_name", "r", "--time_budget_min", "30", *RUN, "--quiet")
    last = tmp_path / "models" / "r" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(SystemExit) as refused:
        main("--resume", "auto", "--run_name", "r", "--epochs", "2", "--dim", "16", "--timesteps", "10",
             "--schedule", "linear", "--batch_size", "4", "--no_cuda")
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "Traceback" not in err
    assert ("--batch_size 4, --schedule linear, --dim 16 differ from the run being resumed (batch_size 8, "
            "schedule cosine, dim 8)") in err  # in the order ddpm_config declares them
    assert last.read_bytes() == before
    used_before = torch.load(last, weights_only=True)["timing"]["wall_s"] / 60
    main("--resume", "auto", "--run_name", "r", "--epochs", "2", "--lr", "0.001", "--dim", "8", "--no_cuda")
    out = capsys.readouterr().out
    used, left = map(float, re.search(r"time budget 30 min for the whole run: (\S+) used, (\S+) left", out).groups())
    assert used >= round(used_before, 1) and used + left == pytest.approx(30, abs=0.1)  # the run's total so far
    assert "changed from the checkpoint: lr 0.003 → 0.001, epochs 1 → 2\n" in out
    config = torch.load(last, weights_only=True)["config"]
    assert config["lr"] == 0.001 and config["epochs"] == 2 and config["time_budget_min"] == 30


def test_resume_errors(tmp_path, trained, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def refused(*argv):
        with pytest.raises(SystemExit) as exit_info:
            main(*argv, "--no_cuda")
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    err = refused("--resume", "auto", "--run_name", "never_trained")
    assert "looked for models/never_trained/last.pt and found nothing to resume" in err
    assert "first --checkpoint_minutes" in err and "models holds no last.pt" in err
    err = refused("--resume", "auto", "--run_name", "never_trained", "--models_dir", trained / "models")
    assert "runs with a last.pt in" in err and err.strip().endswith("models: cond, uncond)")
    assert "weights only" in refused("--resume", trained / "models" / "cond" / "best.pt")


# ddpm_main.py with SummaryWriter.close() leaving a mark: Python flushes an open event file at exit anyway, so only
# the call itself shows that the writer was closed
CLOSE_SPY = """
import sys
sys.path.insert(0, sys.argv[1])
import torch.utils.tensorboard as tensorboard


class SpyWriter(tensorboard.SummaryWriter):
    def close(self):
        super().close()
        open("writer_closed", "a").write("closed\\n")


tensorboard.SummaryWriter = SpyWriter
import ddpm_main
ddpm_main.main(sys.argv[2:])
"""


def spied_command(*args):
    return [sys.executable, "-c", CLOSE_SPY, ROOT, *map(str, args)]


def read_events(log_dir):
    """The scalars {tag: [(step, value)]} and image counts {tag: n} of every event file in log_dir."""
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, {tag: len(events.Images(tag)) for tag in events.Tags()["images"]}


@pytest.fixture
def closes(monkeypatch):
    """Counts SummaryWriter.close() calls in this process (an open event file is flushed at exit anyway, so only
    the call itself shows that the writer was closed)."""
    import torch.utils.tensorboard as tensorboard
    calls = []

    class SpyWriter(tensorboard.SummaryWriter):
        def close(self):
            super().close()
            calls.append(self.log_dir)

    monkeypatch.setattr(tensorboard, "SummaryWriter", SpyWriter)
    return calls


def test_events_hold_losses_lr_speed_fid_is_and_grids(tiny_data, tmp_path, fake_inception, monkeypatch, closes):
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--conditional", "--epochs", "2", "--lr", "0.002", "--warmup_steps", "8",
                    "--log_interval", "1", "--tensorboard", "tb", "--eval_fid", "10", "--fid_inception",
                    fake_inception, "--sampler", "ddim", "--sampling_steps", "2", "--run_name", "tb", "--quiet",
                    *TINY_MODEL])
    assert closes == ["tb"]
    scalars, images = read_events(tmp_path / "tb")
    history = json.loads((tmp_path / "outputs" / "loss_history_tb.json").read_text())
    metrics = json.loads((tmp_path / "outputs" / "metrics_tb.json").read_text())
    steps = metrics["steps"]  # 27 training images, batch 8: 4 steps an epoch

    assert [s for s, _ in scalars["train/loss"]] == list(range(1, steps + 1))  # a read-out every step
    assert [s for s, _ in scalars["train/images_per_s"]] == list(range(1, steps + 1))
    assert all(v > 0 for _, v in scalars["train/images_per_s"])
    lrs = dict(scalars["train/lr"])  # the lr of the step read out: warm-up (step + 1) / 8 · lr, step = 0-based
    assert lrs[1] == pytest.approx(0.002 / 8) and lrs[4] == pytest.approx(0.002 * 4 / 8) and lrs[8] == pytest.approx(0.002)
    for key in ("train_loss", "val_loss", "test_loss"):  # float32 in the event file
        assert [v for _, v in scalars[f"epoch/{key}"]] == pytest.approx(history[key], rel=1e-6)
    assert [s for s, _ in scalars["epoch/val_loss"]] == [steps // 2, steps]
    assert len(scalars["epoch/images_per_s"]) == 2
    for name in ("fid", "fid_second_draw", "kid", "prc_precision", "prc_recall", "inception_score", "copy_share"):
        assert scalars[name] == [(steps, pytest.approx(metrics[name], rel=1e-6, abs=1e-9))], name
    assert images == {"samples": 2}  # the per-epoch grid


def test_no_tensorboard_import_without_the_flag(tiny_data, tmp_path, monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    for path in sorted(pathlib.Path(ROOT).glob("ddpm_*.py")):  # no module imports it when loaded ...
        spec = importlib.util.spec_from_file_location(f"fresh_{path.stem}", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--epochs", "1", "--quiet", *TINY_MODEL])  # ... nor does a run
    assert (tmp_path / "outputs" / "loss_history_DDPM.json").is_file()


def test_writer_is_closed_by_a_nan_stop(tiny_data, tmp_path, monkeypatch, capsys, closes):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ddpm_main.main(["--data_dir", tiny_data, "--epochs", "1", "--lr", "1e30", "--warmup_steps", "0",
                        "--log_interval", "1", "--tensorboard", "tb", "--run_name", "nan", *TINY_MODEL])
    assert exit_info.value.code == 1 and "loss at epoch 1, step 2 became nan" in capsys.readouterr().err
    assert closes == ["tb"]
    scalars, _ = read_events(tmp_path / "tb")
    assert scalars["train/loss"][0][0] == 1  # the read-out before the loss turned NaN


def test_writer_is_closed_by_sigterm_which_saves_last_pt(tiny_data, tmp_path):
    """SIGTERM (a scheduler's stop) goes the way of Ctrl-C: the step finishes, last.pt is written, exit 130."""
    proc = subprocess.Popen(spied_command("--data_dir", tiny_data, "--epochs", "40", "--tensorboard", "tb",
                                          "--run_name", "sig", *TINY_MODEL), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    while not line.startswith("epoch 1/"):
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "SIGTERM received" in err and "--resume auto" in err
    assert torch.load(tmp_path / "models" / "sig" / "last.pt", weights_only=True)["step"] >= 4
    assert (tmp_path / "writer_closed").read_text() == "closed\n"
    scalars, images = read_events(tmp_path / "tb")
    assert scalars["epoch/val_loss"][0][0] == 4 and images["samples"] >= 1


BUDGET_RUN = [*TINY_MODEL, "--seed", "5", "--log_interval", "1"]


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
            *BUDGET_RUN]
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
    assert exit_status("--data_dir", tiny_data, "--epochs", "1", "--run_name", "c", "--quiet", *BUDGET_RUN) == 0
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
                    "FID": (ddpm_train, "measure_inception_metrics")}[where]
    went_on = signal_inside(monkeypatch, module, name)
    fid = ["--eval_fid", "10", "--fid_inception", fake_inception] if where == "FID" else []
    assert exit_status("--data_dir", tiny_data, "--epochs", "1", "--run_name", "s", *BUDGET_RUN, *fid) == 130
    err = capsys.readouterr().err
    assert "SIGTERM received: stopped at step 4" in err and "--resume auto" in err and not went_on
    assert torch.load(tmp_path / "models" / "s" / "last.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "outputs" / "metrics_s.json").exists()  # the run did not finish


def test_a_signal_during_an_evaluation_resumes_as_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    """SIGINT in the grid of epoch 1 of 2: last.pt is epoch 1's steps, not yet evaluated; the resume evaluates it
    once, and the two runs' histories and weights are the same."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data_dir", tiny_data, "--epochs", "2", "--quiet", *BUDGET_RUN]
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
