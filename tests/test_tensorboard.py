"""--tensorboard DIR: the events a run writes read back as the numbers it reports, on every way out."""
import importlib.util
import json
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ddpm_main
import ddpm_train
from conftest import ROOT, TINY_MODEL


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
    assert scalars["fid"] == [(steps, pytest.approx(metrics["fid"], rel=1e-6))]
    assert scalars["inception_score"] == [(steps, pytest.approx(metrics["inception_score"], rel=1e-6))]
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


@pytest.mark.parametrize("argv,message", [
    (["--inference", "--model_path", "x.pt", "--tensorboard", "tb"], "--tensorboard does nothing in --inference"),
    (["--tensorboard", "tb"], "--tensorboard needs the tensorboard package"),
])
def test_tensorboard_flag_errors(argv, message, tmp_path, monkeypatch, capsys):
    real_find_spec = ddpm_train.importlib.util.find_spec
    monkeypatch.setattr(ddpm_train.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ddpm_main.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
