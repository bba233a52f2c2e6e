"""What stops a command: signals, NaN, failed writes, memory. One line, the right exit status, nothing half-written
and no good file lost."""
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import ddpm_helpers
import ddpm_main
import ddpm_pictures
from conftest import (MAIN, SHIPPED, TINY_MODEL, card_holding, one_line_error, run_in_process, run_main, save_edited,
                      tree)
from ddpm_checkpoint import TrainingState, build_checkpoint, load_checkpoint, save_checkpoint
from ddpm_diffusion import Diffusion
from ddpm_helpers import NonFiniteError, RunFiles, UserError, write_json
from ddpm_model import UNet


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_never_written_nor_loaded(bad_value, tmp_path):
    model, ema = UNet(dim=8, dim_mults=(1,)), UNet(dim=8, dim_mults=(1,))
    config = {"model": model.config.to_dict(), "timesteps": 10, "schedule": "cosine", "image_size": 8}
    ckpt = build_checkpoint(config, model, ema, torch.optim.AdamW(model.parameters()), TrainingState(), False)
    ckpt["ema"]["final_conv.bias"][1] = bad_value
    with pytest.raises(NonFiniteError, match=r"NaN or infinite values \(ema.final_conv.bias\)"):
        save_checkpoint(ckpt, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []
    save_edited(ckpt, tmp_path / "written_elsewhere.pt")
    with pytest.raises(UserError, match="NaN or infinite weights"):
        load_checkpoint(str(tmp_path / "written_elsewhere.pt"))


def test_divergence_stops_before_anything_is_written_from_it(tiny_data, tmp_path, monkeypatch, capsys):
    """One step of lr 1e30 makes every loss after it NaN: the run stops with exit 1, writes no checkpoint, loss
    JSON or grid, and says that it has no good checkpoint."""
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--data_dir", tiny_data, "--epochs", "1", "--run_name", "nan", "--lr", "1e30",
                                "--warmup_steps", "0", *TINY_MODEL, "--batch_size", "32"], capsys)  # 1 step
    assert code == 1 and "Traceback" not in err
    assert "the validation loss of epoch 1 became nan; stopped, and this run wrote no checkpoint" in err
    assert sorted(os.listdir(tmp_path / "models" / "nan")) == ["config.json"]
    assert sorted(os.listdir(tmp_path / "outputs")) == ["forward_process_nan.png"]


def test_divergence_names_the_last_good_checkpoint_and_how_to_go_on_from_it(tiny_data, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--epochs", "1", "--run_name", "nan", "--quiet", *TINY_MODEL])
    last = tmp_path / "models" / "nan" / "last.pt"
    good = last.read_bytes()
    code, err = run_in_process(["--resume", "auto", "--run_name", "nan", "--epochs", "2", "--lr", "1e30",
                                "--warmup_steps", "0", "--log_interval", "1", "--quiet"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "the training loss at epoch 2, step 6 became nan; stopped. The last good checkpoint is " \
           "models/nan/last.pt (step 4: epoch 1 done); to continue from it with a lower learning rate:" in err
    assert err.splitlines()[-1].endswith(" --run_name nan --epochs 2 --warmup_steps 0 --log_interval 1 --quiet "
                                         "--resume models/nan/last.pt --lr 1e+29")
    assert last.read_bytes() == good
    assert not list((tmp_path / "models" / "nan").glob("*.tmp*"))
    history = json.loads((tmp_path / "outputs" / "loss_history_nan.json").read_text())
    assert history["epochs"] == [1]  # nothing of epoch 2 was written


def test_samples_that_are_not_finite_are_not_written(trained, tmp_path, monkeypatch, capsys):
    ckpt = load_checkpoint(str(trained / "models" / "uncond" / "ckpt.pt"))
    ckpt["ema"]["init_conv.weight"] *= 1e37  # finite weights whose activations overflow: NaN from GroupNorm
    save_edited(ckpt, tmp_path / "overflowing.pt")
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--inference", "--model_path", "overflowing.pt", "--num_samples", "2", "--no_cuda"],
                               capsys)
    assert code == 1 and "the samples hold NaN or infinite values; nothing was written" in err
    assert sorted(os.listdir(tmp_path)) == ["overflowing.pt"]


def test_json_never_holds_nan(tmp_path):
    with pytest.raises(NonFiniteError):
        write_json({"loss": float("nan")}, tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_sampling_exits_130_with_one_line(tmp_path):
    # SIGINT at its default, as in a terminal: a suite started in the background (cmd &) passes it on ignored
    proc = subprocess.Popen([sys.executable, MAIN, "--inference", "--conditional", "--model_path", SHIPPED,
                             "--num_samples", "400", "--sample_batch", "20", "--no_cuda"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("sampling on cpu")
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)  # seconds at most; the timeout only stops a hang
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["ddpm_main.py: interrupted (Ctrl-C); files already written stay, nothing is "
                                        "half-written"]
    assert os.listdir(tmp_path) == []


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


def test_fp16_loss_that_is_not_finite_still_stops_the_run(tiny_data, tmp_path, monkeypatch, capsys):
    """A NaN loss is not an overflow the scaler can mend: the run stops (exit 1) as in float32, writing nothing."""
    monkeypatch.chdir(tmp_path)
    real_losses = Diffusion.p_losses
    monkeypatch.setattr(Diffusion, "p_losses", lambda self, *a, **k: real_losses(self, *a, **k) * float("nan"))
    code = run_main("--data_dir", tiny_data, "--epochs", "1", "--log_interval", "1", "--run_name", "nan16",
                    *TINY_MODEL, "--precision", "fp16", cwd=tmp_path)
    assert code.returncode == 1 and "the training loss at epoch 1, step 1 became nan; stopped" in code.stderr
    assert not (tmp_path / "models" / "nan16" / "last.pt").exists()


def test_inference_that_runs_out_of_memory_still_writes_every_sample(trained, monkeypatch, tmp_path):
    """Room for 3: 10 at a time fail, then 5; 2 at a time fit, and the rest goes 2 at a time."""
    tried = []
    monkeypatch.setattr(Diffusion, "sample", card_holding(3, tried))
    result = run_main("--inference", "--model_path", os.path.join(trained, "models", "cond", "ckpt.pt"),
                      "--conditional", "--num_samples", "10", "--sample_batch", "10", "--no_cuda", "--run_name", "oom",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: out of memory sampling 10 images at a time") == 1
    assert tried == [10, 5, 2, 2, 2, 2, 2] and len(os.listdir(tmp_path / "outputs" / "samples_oom")) == 10


def with_file_size_limit(limit):
    """For a subprocess: no file may grow past `limit` bytes (RLIMIT_FSIZE, as a quota or a full disk would stop
    it); the write fails with EFBIG instead of the process being killed."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_checkpoint_that_cannot_be_written_stops_training_and_keeps_the_last_good_one(tiny_data, tmp_path):
    """A real failed write, in torch.save itself: the resumed run may write nothing larger than 300 kB, and its
    last.pt is 1.3 MB. It stops with one line naming the file and the last good checkpoint, which is unchanged."""
    first = run_main("--data_dir", tiny_data, "--epochs", "1", "--run_name", "r", "--quiet", *TINY_MODEL, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    last = tmp_path / "models" / "r" / "last.pt"
    good = last.read_bytes()
    assert len(good) > 300_000
    result = subprocess.run([sys.executable, MAIN, "--resume", "auto", "--run_name", "r", "--epochs", "2", "--quiet"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            preexec_fn=with_file_size_limit(300_000))
    assert one_line_error(result, code=1) == (
        "ddpm_main.py: error: could not write models/r/last.pt (File too large); training stopped. The last good "
        "checkpoint is models/r/last.pt (step 4: epoch 1 done): make room (or restore access) and continue with "
        "--resume models/r/last.pt")
    assert last.read_bytes() == good
    assert not [path for path in tree(tmp_path) if ".tmp" in path]
    resumed = run_main("--resume", "models/r/last.pt", "--epochs", "2", "--quiet", cwd=tmp_path)  # room again
    assert resumed.returncode == 0, resumed.stderr


def test_samples_that_cannot_be_written_leave_the_earlier_ones(trained, monkeypatch):
    """The disk fills while the sample PNGs are written: one line, exit 1, and the earlier PNGs are all still
    there, unchanged, with no temporary file or folder left."""
    argv = ["--inference", "--model_path", "models/uncond/ckpt.pt", "--num_samples", "4", "--run_name", "full",
            "--no_cuda"]
    assert run_main(*argv, cwd=trained).returncode == 0
    before = tree(trained / "outputs" / "samples_full")
    saves = []
    real_save = ddpm_pictures.Image.Image.save

    def save_until_the_disk_is_full(image, *args, **kwargs):
        saves.append(1)
        if len(saves) == 3:  # the grid, one PNG, then no space
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, *args, **kwargs)

    monkeypatch.setattr(ddpm_pictures.Image.Image, "save", save_until_the_disk_is_full)
    result = run_main(*argv, "--seed", "1", cwd=trained)
    assert one_line_error(result, code=1) == (f"ddpm_main.py: error: could not write the sample PNGs in "
                                              f"{os.path.join('outputs', 'samples_full')} (No space left on device)")
    assert tree(trained / "outputs" / "samples_full") == before
    assert not [name for name in os.listdir(trained / "outputs") if ".tmp" in name]


def test_a_failed_write_leaves_the_file_it_would_replace(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    ddpm_helpers.write_json({"fid": 1.0}, path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ddpm_helpers.os, "fsync", no_space)
    with pytest.raises(ddpm_helpers.WriteError, match=r"could not write .*metrics.json \(No space left on device\)"):
        ddpm_helpers.write_json({"fid": 2.0}, path)
    assert path.read_text() == '{\n  "fid": 1.0\n}\n' and os.listdir(tmp_path) == ["metrics.json"]


def test_running_out_of_memory_is_one_line_saying_what_and_which_flag(tiny_data, trained, tmp_path, monkeypatch):
    import ddpm_diffusion
    import ddpm_train_step

    def out_of_gpu_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ddpm_train_step.TrainingStep, "__call__", out_of_gpu_memory)
    result = run_main("--data_dir", tiny_data, "--epochs", "1", "--run_name", "oom", *TINY_MODEL, cwd=tmp_path)
    assert one_line_error(result, code=1) == ("ddpm_main.py: error: out of GPU memory while training on batches of "
                                              "8: lower --batch_size (--grad_accum K keeps K × --batch_size images a "
                                              "step)")

    def allocate_four_petabytes(*args, **kwargs):
        return torch.empty(2 ** 50)  # a real allocation failure of the CPU allocator

    monkeypatch.setattr(ddpm_diffusion.Diffusion, "sample", allocate_four_petabytes)
    result = run_main("--inference", "--model_path", "models/uncond/ckpt.pt", "--num_samples", "3", "--run_name",
                      "oom", "--no_cuda", cwd=trained)
    assert one_line_error(result, code=1) == ("ddpm_main.py: error: out of memory while sampling 3 images: lower "
                                              "--sample_batch")
