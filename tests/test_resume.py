"""Resume, checkpoints and signals: an interrupted run continues as if it had never stopped. Runs that need no
signal go in-process (ddpm_main.main), which saves the seconds each new process spends importing torch."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import ddpm_main
from conftest import MAIN, TINY_MODEL, make_image_folder
from ddpm_config import ADJUSTABLE_SETTINGS, FIXED_SETTINGS, stored_settings

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
