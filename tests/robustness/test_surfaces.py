"""The hostile user's table for the newer surfaces (editing, import, run folders, signals): every case one line with
its exit status, nothing overwritten, nothing half-written. A case is (class, name, what it sets up and runs, the
exit status, words its line holds); docs/robustness.md says what each class promises."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_checkpoint
from conftest import MAIN, ROOT, run_main, tree
from ddpm_helpers import WriteError

BIG = 10 ** 9


def edit(trained, *flags):
    """An editing command on the unconditional tiny model, its outputs named r."""
    return ["--inference", "--model_path", trained / "models" / "uncond" / "ckpt.pt", "--run_name", "r", "--no_cuda",
            "--sampling_steps", "2", *flags]


def png_at(path, side=16):
    """A valid side × side PNG at `path` (a mask: white left half), as a user might leave one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((side, side), np.uint8)
    pixels[:, :side // 2] = 255
    Image.fromarray(pixels).save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------------- memory and counts

MEMORY = [
    ("interpolation frames past memory", ["--interpolate", "seed:0,seed:1", "--frames", BIG], "--frames"),
    ("interpolation frames past 2**64", ["--interpolate", "seed:0,seed:1", "--frames", 2 ** 64], "--frames"),
    ("RePaint jumps without end", ["--inpaint", "centre", "--jump_count", BIG], "--jump_count"),
    ("a strip past memory", ["--denoising_strip", "--num_samples", 10 ** 8], "--num_samples"),
    ("a sweep past memory", ["--guidance_sweep", ",".join(["1"] * 1_000_000), "--conditional"], "--guidance_sweep"),
]


@pytest.mark.parametrize("name,flags,named", MEMORY, ids=[case[0] for case in MEMORY])
def test_every_job_is_inside_a_memory_bound(name, flags, named, trained, tmp_path):
    model = "cond" if "--conditional" in flags else "uncond"
    argv = [*edit(trained, *flags)]
    argv[2] = trained / "models" / model / "ckpt.pt"
    result = run_main(*argv, cwd=tmp_path)
    line = one_line(result, 2)
    assert named in line
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- outputs over inputs

OVER_INPUTS = [
    ("a mask where the grid goes", "inpaint_r.png", ["--inpaint", "outputs/inpaint_r.png"], "--inpaint"),
    ("an image where the grid goes", "invert_r.png", ["--invert", "--images", "outputs/invert_r.png"], "--images"),
    ("an image where the npz goes", "inpaint_r.npz", ["--inpaint", "left", "--images", "outputs/inpaint_r.npz"],
     "--images"),
    ("an end where the strip goes", "interpolate_r.png", ["--interpolate", "outputs/interpolate_r.png,seed:1"],
     "--interpolate"),
]


@pytest.mark.parametrize("name,output,flags,named", OVER_INPUTS, ids=[case[0] for case in OVER_INPUTS])
def test_no_output_is_written_over_an_input(name, output, flags, named, trained, tmp_path):
    png_at(tmp_path / "outputs" / output)
    before = tree(tmp_path)
    line = one_line(run_main(*edit(trained, *flags), cwd=tmp_path), 2)
    assert named in line and "is where this command writes" in line
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------- imports into run folders

@pytest.mark.parametrize("present", [("last.pt", "config.json"), ("config.json",), ("notes.txt",)])
def test_an_import_never_writes_into_a_folder_that_holds_files(present, small_folder, tmp_path):
    run = tmp_path / "models" / "r"
    run.mkdir(parents=True)
    for name in present:
        (run / name).write_text("the user's")
    before = tree(tmp_path)
    line = one_line(run_main("--import_weights", small_folder[0], "--run_name", "r", cwd=tmp_path), 2)
    assert "models/r" in line
    assert tree(tmp_path) == before


def test_a_failed_import_leaves_nothing_and_can_be_retried(small_folder, tmp_path, monkeypatch):
    def full_disk(obj, path):
        raise WriteError(f"could not write {path} (No space left on device)")

    with monkeypatch.context() as patch:
        patch.setattr(ddpm_checkpoint, "write_json", full_disk)
        line = one_line(run_main("--import_weights", small_folder[0], "--run_name", "r", cwd=tmp_path), 1)
    assert "No space left on device" in line
    assert not (tmp_path / "models").exists()  # the folder the import made for it too
    assert run_main("--import_weights", small_folder[0], "--run_name", "r", "--quiet", cwd=tmp_path).returncode == 0
    assert sorted(os.listdir(tmp_path / "models" / "r")) == ["ckpt.pt", "config.json"]


def test_the_folder_of_a_killed_import_is_cleared_by_the_next(small_folder, tmp_path):
    left = tmp_path / "models" / "r.tmp4194303"  # a pid past most kernels' range: its process runs nowhere
    left.mkdir(parents=True)
    (left / "ckpt.pt").write_bytes(b"half a checkpoint")
    assert run_main("--import_weights", small_folder[0], "--run_name", "r", "--quiet", cwd=tmp_path).returncode == 0
    assert sorted(os.listdir(tmp_path / "models")) == ["r"]


# ------------------------------------------------------------------------------------------- one process per run

HOLD_LOCK = ("import sys, time; sys.path.insert(0, {root!r}); from ddpm_helpers import RunFiles, run_lock\n"
             "with run_lock(RunFiles('models', 'outputs', 'r')):\n    print('held', flush=True); time.sleep(60)")


@pytest.fixture
def run_held(tmp_path):
    """Another process holding run r's folder (models/r) as a training run or an import does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=ROOT)], cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield holder
    holder.kill()
    holder.wait()


def test_a_second_training_of_a_held_run_is_refused(run_held, tiny_data, tmp_path):
    before = tree(tmp_path)
    line = one_line(run_main("--data_dir", tiny_data, "--run_name", "r", "--dim", "8", "--dim_mults", "1,2",
                             "--no_cuda", cwd=tmp_path), 2)
    assert f"pid {run_held.pid}" in line
    assert tree(tmp_path) == before


def test_an_import_into_a_held_run_is_refused(run_held, small_folder, tmp_path):
    before = tree(tmp_path)
    line = one_line(run_main("--import_weights", small_folder[0], "--run_name", "r", cwd=tmp_path), 2)
    assert f"pid {run_held.pid}" in line
    assert tree(tmp_path) == before


def test_the_lock_of_a_dead_process_is_taken_over_with_a_note(small_folder, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=ROOT)], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "held"
    dead.kill()  # kill -9: the lock file stays, naming a process that no longer runs
    dead.wait()
    result = run_main("--import_weights", small_folder[0], "--run_name", "r", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"pid {dead.pid}" in result.stderr and "no longer runs" in result.stderr
    assert sorted(os.listdir(tmp_path / "models")) == ["r"]  # the lock went with the import


# ------------------------------------------------------------------------------------------- foreign values

def diffusers_copy(small_folder, folder, config=None, scheduler=None, raw_config=None):
    """A copy of the small diffusers folder with config.json entries changed (or its text replaced) and a
    scheduler_config.json."""
    source = small_folder[0]
    shutil.copytree(source, folder)
    text = raw_config if raw_config is not None else json.dumps({**json.loads((source / "config.json").read_text()),
                                                                 **(config or {})})
    (folder / "config.json").write_text(text)
    if scheduler is not None:
        (folder / "scheduler_config.json").write_text(scheduler if isinstance(scheduler, str) else
                                                      json.dumps(scheduler))
    return folder


SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
FOREIGN = [
    ("beta_end NaN", {}, {**SCHEDULER, "beta_end": float("nan")}, "beta_end"),
    ("T of 2e9", {}, {**SCHEDULER, "num_train_timesteps": 2_000_000_000}, "num_train_timesteps"),
    ("GroupNorm eps 1e308", {"norm_eps": 1e308}, None, "norm_eps"),
    ("groups as text", {"norm_num_groups": "8"}, None, "norm_num_groups"),
    ("a schedule as a list", {}, {**SCHEDULER, "beta_schedule": ["linear"]}, "beta_schedule"),
    ("down blocks as a number", {"down_block_types": 5}, None, "down_block_types"),
    ("a scheduler nested deep", {}, "[" * 100_000 + "]" * 100_000, "scheduler_config.json"),
]


@pytest.mark.parametrize("name,config,scheduler,named", FOREIGN, ids=[case[0] for case in FOREIGN])
def test_foreign_values_are_checked_like_the_tools_own(name, config, scheduler, named, small_folder, tmp_path):
    folder = diffusers_copy(small_folder, tmp_path / "foreign", config, scheduler)
    line = one_line(run_main("--import_weights", folder, "--run_name", "r", cwd=tmp_path), 2)
    assert named in line
    assert not (tmp_path / "models").exists()


def test_a_config_nested_deep_is_one_line(small_folder, tmp_path):
    folder = diffusers_copy(small_folder, tmp_path / "foreign", raw_config='{"a": ' + "[" * 100_000 + "]" * 100_000
                            + "}")
    line = one_line(run_main("--import_weights", folder, "--run_name", "r", cwd=tmp_path), 2)
    assert "config.json" in line


def test_integer_weights_are_refused(small_folder, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = diffusers_copy(small_folder, tmp_path / "foreign")
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.bias"] = tensors["conv_in.bias"].to(torch.int8)
    save_file(tensors, weights)
    line = one_line(run_main("--import_weights", folder, "--run_name", "r", cwd=tmp_path), 2)
    assert "conv_in.bias" in line and "int8" in line


@pytest.mark.parametrize("seed", ["seed:-9223372036854775809", "seed:18446744073709551616"])
def test_a_seed_past_the_generators_range_is_refused(seed, trained, tmp_path):
    line = one_line(run_main(*edit(trained, "--interpolate", f"{seed},seed:1"), cwd=tmp_path), 2)
    assert "seed" in line


# ------------------------------------------------------------------------------------------- signals

def stop_inside(target, name, monkeypatch):
    """`target.name` sends this process SIGTERM as it begins: the stop lands inside it, as a real one may."""
    real = getattr(target, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, signalled)


@pytest.mark.parametrize("where", ["torch.load", "load_state_dict"])
def test_a_stop_while_a_checkpoint_loads_says_it_stopped(where, trained, tmp_path, monkeypatch):
    if where == "torch.load":
        stop_inside(torch, "load", monkeypatch)
    else:
        stop_inside(torch.nn.Module, "load_state_dict", monkeypatch)
    result = run_main(*edit(trained, "--num_samples", "2"), cwd=tmp_path)
    line = one_line(result, 130, "ddpm_main.py: stopped by SIGTERM")
    assert "damaged" not in line
    assert os.listdir(tmp_path) == []


def test_a_stop_while_an_import_saves_leaves_nothing(small_folder, tmp_path, monkeypatch):
    stop_inside(torch, "save", monkeypatch)
    result = run_main("--import_weights", small_folder[0], "--run_name", "r", cwd=tmp_path)
    one_line(result, 130, "ddpm_main.py: stopped by SIGTERM")
    assert not (tmp_path / "models" / "r").exists()


def test_two_signals_a_tenth_of_a_second_apart_are_one_line_and_130(trained, tmp_path):
    process = subprocess.Popen([sys.executable, "-u", MAIN, *map(str, edit(trained, "--num_samples", "20000",
                                                                             "--sampling_steps", "10"))],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(process.stdout, "sampling")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    one_line(subprocess.CompletedProcess([], process.returncode, "", err), 130, "ddpm_main.py: stopped by SIGTERM")


def test_a_signal_after_the_job_finished_keeps_its_status(trained, tmp_path):
    process = subprocess.Popen([sys.executable, "-u", MAIN, *map(str, edit(trained, "--num_samples", "2"))],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(process.stdout, "samples in")
    while process.poll() is None:  # signals all through the exit: the files are complete
        process.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    err = process.stderr.read()
    if process.returncode != 0:  # the job's status, or the stop said in one line: never a death by the signal
        one_line(subprocess.CompletedProcess([], process.returncode, "", err), 130, "ddpm_main.py: stopped by SIGTERM")
    assert "Traceback" not in err and (tmp_path / "outputs" / "samples_r.png").is_file()


def wait_for_line(stream, words, timeout=120):
    """Read `stream` until a line holding `words`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = stream.readline()
        if words in line:
            return line
        assert line, f"the command ended before saying {words!r}"
    raise AssertionError(f"no line with {words!r} in {timeout} s")


def one_line(result, code, start="ddpm_main.py: error: "):
    """The one line (notes and warnings aside) of a command that stopped with `code`, no traceback."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith(("note:", "warning:"))]
    assert len(lines) == 1 and lines[0].startswith(start), result.stderr
    return lines[0]
