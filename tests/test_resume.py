"""Resume, checkpoints and signals: an interrupted run continues as if it had never stopped."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import MAIN, TINY_MODEL, run_cli

RUN = TINY_MODEL + ["--seed", "7", "--log_interval", "1"]


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


def test_resume_after_epoch_1_matches_uninterrupted_run(tiny_data, tmp_path):
    assert run_cli("--data_dir", tiny_data, "--conditional", "--epochs", "3", "--run_name", "full", *RUN,
                   cwd=tmp_path).returncode == 0
    first = run_cli("--data_dir", tiny_data, "--conditional", "--epochs", "1", "--run_name", "part", *RUN,
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run_cli("--resume", "auto", "--epochs", "3", "--run_name", "part", "--no_cuda", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming 'part'" in resumed.stdout
    assert_same_history(history(tmp_path, "full"), history(tmp_path, "part"))
    assert_same_weights(tmp_path / "models" / "full" / "last.pt", tmp_path / "models" / "part" / "last.pt")
    assert (tmp_path / "outputs" / "samples_part_epoch003.png").is_file()  # the grids continue too
    config = json.loads((tmp_path / "models" / "part" / "config.json").read_text())
    assert config["conditional"] and config["versions"]["torch"] == torch.__version__


def test_best_checkpoint_follows_validation_loss(tiny_data, tmp_path):
    assert run_cli("--data_dir", tiny_data, "--epochs", "3", "--run_name", "b", *RUN, cwd=tmp_path).returncode == 0
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


def test_sigint_saves_state_and_resume_matches_uninterrupted(tiny_data, tmp_path):
    proc = start_training(tiny_data, tmp_path, "sig", 40)
    code, err = interrupt_after_first_epoch(proc, signal.SIGINT)
    assert code == 130, err
    assert "SIGINT received" in err and "--resume auto" in err and "Traceback" not in err
    last = torch.load(tmp_path / "models" / "sig" / "last.pt", weights_only=True)
    end = last["epoch"] + 1                            # finish the epoch it stopped in (or the next one)
    resumed = run_cli("--resume", "auto", "--epochs", end, "--run_name", "sig", "--no_cuda", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert run_cli("--data_dir", tiny_data, "--conditional", "--epochs", end, "--run_name", "ref", *RUN,
                   cwd=tmp_path).returncode == 0
    assert_same_history(history(tmp_path, "sig"), history(tmp_path, "ref"))
    assert_same_weights(tmp_path / "models" / "sig" / "last.pt", tmp_path / "models" / "ref" / "last.pt")


def test_sigterm_saves_state(tiny_data, tmp_path):
    proc = start_training(tiny_data, tmp_path, "term", 40)
    code, err = interrupt_after_first_epoch(proc, signal.SIGTERM)
    assert code == 130 and "SIGTERM received" in err and "--resume auto" in err
    assert torch.load(tmp_path / "models" / "term" / "last.pt", weights_only=True)["step"] >= 4


def test_resume_errors(tmp_path, trained):
    result = run_cli("--resume", "auto", "--run_name", "never_trained", "--no_cuda", cwd=tmp_path)
    assert result.returncode == 2 and "no models/never_trained/last.pt" in result.stderr
    best = run_cli("--resume", str(trained / "models" / "cond" / "best.pt"), "--no_cuda", cwd=tmp_path)
    assert best.returncode == 2 and "weights only" in best.stderr
