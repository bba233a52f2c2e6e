"""Cheap checks before expensive work: flag sizes bounded before anything is built, data files opened only when they
are regular files of a bounded size, outputs never written over an input, empty paths refused, flags that do nothing
in the chosen job refused, killed runs' temporary files removed, and a stop signal at any moment one line and exit
status 130 within seconds. A table per class; each row one line, its exit status, nothing written, no hang."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MAIN, TINY_MODEL, make_image_folder, run_cli, run_main
from ddpm_helpers import RunFiles, input_file_problem
from test_hostile_input import one_line_error, tree

SHIPPED = os.path.join(os.path.dirname(MAIN), "models", "cifar10_cond_speedrun", "ckpt.pt")


def digits(n):
    return "9" * n


FLAG_SIZES = [
    (["--num_res_blocks", "1000000000"], "--num_res_blocks must be in [1, 64], got 1000000000"),
    (["--min_snr_gamma", "1e300", "--epochs", "1"], None),  # a γ past float32's range clamps nothing: it trains
    (["--inference", "--conditional", "--model_path", SHIPPED, "--sample_classes", "\u0663"],
     "--sample_classes: '\u0663' is neither a class index 0-9 nor a class name"),
    (["--inference", "--conditional", "--model_path", SHIPPED, "--sample_classes", digits(5000)],
     "--sample_classes: '99999999999999999999999999999999999999999999999999999999999"),
    (["--epoch", "1"], "unrecognized arguments: --epoch 1"),
    (["--model_path", "x.pt"], "--model_path does nothing in training (it is for --inference and --export_diffusers)"),
    (["--inference", "--model_path", SHIPPED, "--lr", "0.1"], "--lr does nothing in --inference (it is for training)"),
    (["--fid_inception", "x.pth"], "--fid_inception goes with --eval_fid; give it too"),
    (["--save_dir", ""], "--save_dir is empty: name a folder"),
    (["--models_dir", ""], "--models_dir is empty: name a folder"),
    (["--inference", "--model_path", SHIPPED, "--fid_ref_stats", "", "--eval_fid", "10"],
     "--fid_ref_stats is empty: name a file"),
]


@pytest.mark.parametrize("argv,message", FLAG_SIZES, ids=[" ".join(a)[:40] for a, _ in FLAG_SIZES])
def test_flags_are_bounded_before_anything_is_built(argv, message, tiny_data, tmp_path):
    start = time.perf_counter()
    result = run_main("--data_dir", tiny_data, *TINY_MODEL, *argv, "--quiet", cwd=tmp_path) \
        if "--inference" not in argv else run_main(*argv, "--no_cuda", "--quiet", cwd=tmp_path)
    if message is None:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return
    line = one_line_error(result)
    assert message in line, line
    assert time.perf_counter() - start < 30 and tree(tmp_path) == {}


# ------------------------------------------------------------------------------------------------ data folders

def bomb(path):
    """A PNG whose header claims 30,000 × 30,000 pixels in a few kilobytes."""
    Image.new("1", (30_000, 30_000)).save(path)


def large(path):
    Image.new("L", (5000, 4000)).save(path)


def fifo(path):
    os.remove(path)
    os.mkfifo(path)


def dangling(path):
    os.remove(path)
    os.symlink("nowhere.png", path)


DATA_FOLDERS = [
    ("a decompression bomb first", bomb, "claims more pixels than any image can hold"),
    ("an image too large first", large, "is 5000×4000 pixels, more than the 16,777,216 a training image may have"),
    ("a FIFO named .png", fifo, "is not a regular image file (is not a regular file (a FIFO, socket or device))"),
    ("a link to nothing", dangling, "is not a regular image file (is a symbolic link to 'nowhere.png', which does"),
]


@pytest.mark.parametrize("name,damage,message", DATA_FOLDERS, ids=[row[0] for row in DATA_FOLDERS])
def test_a_data_file_is_checked_before_it_is_read(name, damage, message, tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class_train=2, num_classes=2)
    damage(os.path.join(data, "train", "0_class0", "0000.png"))
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("--data_dir", data, *TINY_MODEL, "--epochs", "1", cwd=work, timeout=120)  # a FIFO would hang
    assert message in one_line_error(result)
    assert tree(work) == {}


def test_a_single_training_image_is_refused_before_anything_is_written(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class_train=1, num_classes=1)
    work = tmp_path / "work"
    work.mkdir()
    line = one_line_error(run_main("--data_dir", data, *TINY_MODEL, "--epochs", "1", cwd=work))
    assert line.endswith("holds 1 training image; training needs at least 2 (one to train on, one to validate)")
    assert tree(work) == {}


def test_a_decode_cache_of_another_image_size_is_decoded_again(tmp_path):
    from ddpm_data import load_dataset
    data = make_image_folder(str(tmp_path / "data"), per_class_train=2, num_classes=2, size=16)
    assert load_dataset(data)["train_images"].shape[-2:] == (16, 16)
    make_image_folder(data, per_class_train=2, num_classes=2, size=24)  # the same names, new images of 24 × 24
    assert load_dataset(data)["train_images"].shape[-2:] == (24, 24)


def test_a_missing_nested_data_dir_leaves_no_folder_behind(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        os.makedirs(args[0], exist_ok=True)  # as torchvision does before it tries to download
        raise RuntimeError("no internet")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    line = one_line_error(run_main("--data_dir", "a/b/c", "--dataset", "cifar10", *TINY_MODEL, cwd=tmp_path))
    assert "could not be downloaded" in line and tree(tmp_path) == {}


def test_a_class_name_too_long_for_a_file_name_still_samples(tmp_path):
    names = ["é" * 120, "b" * 250]  # 240 and 250 bytes: folder names that fit, file names that would not
    data = make_image_folder(str(tmp_path / "data"), per_class_train=2, num_classes=2, class_names=names)
    assert run_main("--data_dir", data, *TINY_MODEL, "--epochs", "1", "--conditional", "--save_model", "--quiet",
                    cwd=tmp_path).returncode == 0
    result = run_main("--inference", "--conditional", "--model_path", "models/DDPM/ckpt.pt", "--num_samples", "2",
                      "--no_cuda", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(len(name.encode()) <= 255 for name in os.listdir(tmp_path / "outputs" / "samples_DDPM"))


# ----------------------------------------------------------------------------------------------------- writes

def test_an_output_never_overwrites_an_input(trained, tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for name in ("samples_r.npz", "samples_r.png", "metrics_r.json"):
        (outputs / name).write_bytes((trained / "models" / "uncond" / "ckpt.pt").read_bytes())
        before = tree(tmp_path)
        line = one_line_error(run_main("--inference", "--model_path", f"outputs/{name}", "--run_name", "r",
                                       "--no_cuda", cwd=tmp_path))
        assert f"--model_path 'outputs/{name}' is where this command writes one of its outputs (run 'r')" in line
        assert tree(tmp_path) == before


def test_temporary_files_of_a_killed_run_are_removed_by_the_next_run_of_that_name(tiny_data, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id no process has now
    leftovers = [tmp_path / "models" / "r" / f"last.pt.tmp{dead.pid}", tmp_path / "outputs" / f"metrics_r.json.tmp"
                 f"{dead.pid}", tmp_path / "outputs" / f"samples_r_epoch001.png.tmp{dead.pid}"]
    alive = subprocess.Popen(["sleep", "120"])
    kept = [tmp_path / "models" / "r" / f"last.pt.tmp{alive.pid}",  # a running process's: it may be writing
            tmp_path / "outputs" / f"metrics_other.json.tmp{dead.pid}"]  # another run's
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert sorted(RunFiles(str(tmp_path / "models"), str(tmp_path / "outputs"), "r").stale_temporaries()) == \
        sorted(map(str, leftovers))
    result = run_main("--data_dir", tiny_data, *TINY_MODEL, "--epochs", "1", "--run_name", "r", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    alive.kill()
    assert not any(path.exists() for path in leftovers) and all(path.exists() for path in kept)


# ---------------------------------------------------------------------------------------------------- messages

def test_input_files_are_named_by_what_is_wrong_with_them(tmp_path, monkeypatch):
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "ok").write_bytes(b"x")
    assert input_file_problem(str(tmp_path / "loop_a")) == "is a loop of symbolic links"
    assert input_file_problem(str(tmp_path / "missing")) == "does not exist"
    assert input_file_problem(str(tmp_path)) == "is a folder, not a file"
    assert input_file_problem(str(tmp_path / "fifo")) == "is not a regular file (a FIFO, socket or device)"
    assert input_file_problem(str(tmp_path / "ok")) is None
    real_open = open

    def unreadable(path, *args, **kwargs):
        if str(path).endswith("ok"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", unreadable)
    assert input_file_problem(str(tmp_path / "ok")) == "cannot be read (Permission denied)"


def test_a_symlink_loop_as_model_path_is_named(tmp_path):
    os.symlink("b.pt", tmp_path / "a.pt")
    os.symlink("a.pt", tmp_path / "b.pt")
    line = one_line_error(run_main("--inference", "--model_path", "a.pt", "--no_cuda", cwd=tmp_path))
    assert line == "ddpm_main.py: error: --model_path 'a.pt' is a loop of symbolic links"


def test_fid_statistics_no_inception_network_gives_are_refused():
    from ddpm_fid import statistics_problem
    mu, sigma = np.zeros(2048), np.eye(2048)
    assert statistics_problem({"mu": mu, "sigma": sigma}) is None
    assert "which no Inception network gives" in statistics_problem({"mu": mu + 1e200, "sigma": sigma})
    assert "negative variance" in statistics_problem({"mu": mu, "sigma": -sigma})


# ----------------------------------------------------------------------------------------------------- signals

def stopped(argv, cwd, after_s, sig=signal.SIGTERM, wait_for=None, stream="stderr"):
    """Run ddpm_main.py, send `sig` `after_s` seconds after its start (or after `stream` shows a line starting with
    `wait_for`), and return (the CompletedProcess, seconds from the signal to the exit)."""
    process = subprocess.Popen([sys.executable, MAIN, *map(str, argv)], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    seen = ""
    while wait_for and not seen.startswith(wait_for):
        seen = getattr(process, stream).readline()
        assert seen, "the command ended before the moment to stop it"
    time.sleep(after_s)
    process.send_signal(sig)
    start = time.perf_counter()
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, process.returncode, out, err), time.perf_counter() - start


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    result, seconds = stopped(["--inference", "--model_path", SHIPPED], tmp_path, 0.3, signal.SIGINT)
    assert result.returncode == 130 and seconds < 5
    assert result.stderr.splitlines()[-1].startswith("ddpm_main.py: stopped by SIGINT")
    assert "Traceback" not in result.stderr and tree(tmp_path) == {}


def test_sigterm_while_sampling_is_one_line(tmp_path):
    result, seconds = stopped(["--inference", "--model_path", SHIPPED, "--num_samples", "2000", "--sample_batch", "500",
                               "--no_cuda"], tmp_path, 2, wait_for="note: ")
    assert result.returncode == 130 and seconds < 10, result.stderr
    assert result.stderr.splitlines()[-1] == ("ddpm_main.py: stopped by SIGTERM; files already written stay, nothing "
                                              "is half-written")
    assert not [path for path in tree(tmp_path) if ".tmp" in path]


def test_sigterm_while_training_saves_last_pt_and_stops_within_seconds(tiny_data, tmp_path):
    argv = ["--data_dir", tiny_data, *TINY_MODEL, "--epochs", "500"]
    result, seconds = stopped(argv, tmp_path, 0.5, wait_for="epoch 1/500", stream="stdout")
    assert result.returncode == 130 and seconds < 10, result.stderr
    assert "SIGTERM received" in result.stderr and (tmp_path / "models" / "DDPM" / "last.pt").is_file()


def test_sigterm_during_an_evaluation_or_grid_stops_at_once(tiny_data, tmp_path, monkeypatch):
    """Outside the training steps (losses, grids, FID, the end-of-run work) a signal stops at once: the sampler
    that would run for hours is interrupted inside its loop, last.pt is saved, exit status 130."""
    import ddpm_train

    def endless_grid(run, state, clock, epoch):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # a 1,000-step ancestral grid of a large network on a CPU

    monkeypatch.setattr(ddpm_train, "write_epoch_grid", endless_grid)
    start = time.perf_counter()
    result = run_main("--data_dir", tiny_data, *TINY_MODEL, "--epochs", "3", "--quiet", cwd=tmp_path)
    assert result.returncode == 130 and time.perf_counter() - start < 30, result.stderr
    assert "SIGTERM received: stopped at step 4: epoch 1 done; saved models/DDPM/last.pt" in result.stderr
