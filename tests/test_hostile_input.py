"""What the tool reads and writes, made hostile: damaged or foreign checkpoints, last.pt files and decode caches, full
disks, numbers no machine can hold, run names that are paths, and FID networks and statistics that cannot be trusted.
Each is one line and an exit status; nothing already saved is lost; nothing is written outside --models_dir and
--save_dir."""
import errno
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_helpers
import ddpm_pictures
import ddpm_runtime
from conftest import MAIN, TINY_MODEL, make_image_folder, run_main, save_edited
from ddpm_checkpoint import write_checkpoint
from ddpm_data import CACHE_NAME, DeviceLoader, load_dataset
from ddpm_fid import (InceptionFeatures, reference_statistics, statistics_problem, stats_cache_name,
                      write_random_inception)
from ddpm_helpers import MAX_RUN_NAME, NAME_MAX, OUTPUT_NAMES, RunFiles, UserError, sanitized_run_name
from ddpm_model import UNet, UNetConfig
from ddpm_runtime import check_memory, check_run_memory, format_bytes, memory_needs, parameter_count


def tree(root):
    """Every file and folder under root, relative to it, with each file's bytes: to compare before and after."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


def one_line_error(result, code=2):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("ddpm_main.py: error: "), result.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ checkpoints

def damage(ckpt, how):
    """A copy of a checkpoint damaged in one way, as a foreign tool, a cut download or a hand edit would."""
    ckpt = {**ckpt, "config": {**ckpt["config"], "model": dict(ckpt["config"]["model"])}}
    if how == "no weights":
        ckpt.pop("model"), ckpt.pop("ema")
    elif how == "no timesteps":
        del ckpt["config"]["timesteps"]
    elif how == "other shapes":
        ckpt["config"]["model"]["dim"] = 16
    elif how == "a huge network":
        ckpt["config"]["model"]["dim"] = 8_000_000
    elif how == "unknown schedule":
        ckpt["config"]["schedule"] = "quadratic"
    elif how == "config a list":
        ckpt["config"] = [1, 2]
    elif how == "weights not tensors":
        ckpt["ema"] = {name: 0 for name in ckpt["ema"]}
    elif how == "bad sampling":
        ckpt["config"]["sampling"] = {"sampler": "euler"}
    elif how == "fewer parameters in the optimizer":
        ckpt["optimizer"] = {**ckpt["optimizer"], "param_groups": [{**ckpt["optimizer"]["param_groups"][0],
                                                                   "params": [0, 1]}]}
    elif how == "rng not a tensor":
        ckpt["rng"] = {"cpu": [1, 2, 3], "cuda": []}
    elif how == "no history":
        del ckpt["history"]
    elif how == "no batch_size":
        del ckpt["config"]["batch_size"]
    return ckpt


SAMPLE = ("uncond/ckpt.pt", ["--inference", "--model_path", "damaged.pt", "--num_samples", "2"])
RESUME = ("cond/last.pt", ["--resume", "damaged.pt", "--epochs", "2"])


@pytest.mark.parametrize("use,how,message", [
    (SAMPLE, "no weights", "it holds no weights ('ema' or 'model')"),
    (SAMPLE, "no timesteps", "the config lacks timesteps"),
    (SAMPLE, "other shapes", "its ema weights do not fit the network its config describes (time_mlp.1.weight is "
                             "32×8 in the file and 64×16 for the network its config describes;"),
    (SAMPLE, "a huge network", "its config describes a network of 9,216,000,000,000,000 parameters, its weights "
                               "hold 66,595"),  # 4 · 9 · 16,000,000²: not even built on the meta device
    (SAMPLE, "unknown schedule", "the config's schedule is 'quadratic', not one of linear, cosine, sigmoid"),
    (SAMPLE, "config a list", "its config is not a dict"),
    (SAMPLE, "weights not tensors", "its ema weights are not a dict of tensors"),
    (SAMPLE, "bad sampling", "the config's sampling.sampler is 'euler', not one of dpm++2m, ddim, ddpm"),
    (RESUME, "fewer parameters in the optimizer", "its optimizer state is for 2 parameters, the network has "),
    (RESUME, "rng not a tensor", "the checkpoint's rng is {'cpu': [1, 2, 3], 'cuda': []}, not the generators' "
                                 "states"),
    (RESUME, "no history", "the checkpoint lacks history"),
    (RESUME, "no batch_size", "the config lacks batch_size"),
    (RESUME, "other shapes", "its ema weights do not fit the network"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_what_is_wrong_before_anything_is_written(
        use, how, message, trained, tmp_path):
    source, argv = use
    save_edited(damage(torch.load(trained / "models" / source, weights_only=True), how), tmp_path / "damaged.pt")
    before = tree(tmp_path)
    result = run_main(*argv, "--no_cuda", cwd=tmp_path)
    assert one_line_error(result).startswith(f"ddpm_main.py: error: 'damaged.pt' is damaged or incomplete: {message}")
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------------------------- decode cache

def test_a_damaged_decode_cache_is_decoded_again_with_one_warning(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=3)
    fresh = load_dataset(data)
    cache = os.path.join(data, CACHE_NAME)
    good = torch.load(cache, weights_only=True)
    capsys.readouterr()
    for damaged, problem in (
            (b"\x00" * 100, "unreadable: "),
            ({**good, "train_images": good["train_images"][:, 0]}, "its train images are not 6 uint8 images"),
            ({**good, "test_labels": good["test_labels"] + 7}, "its test labels are not 3 class indices"),
            ({**good, "classes": ["x", "y", "z"]}, "its class names or image shapes do not match the folders'")):
        if isinstance(damaged, bytes):
            with open(cache, "wb") as f:
                f.write(damaged)
        else:
            torch.save(damaged, cache)
        data_again = load_dataset(data)
        err = capsys.readouterr().err
        assert err.startswith(f"warning: the decode cache {cache} is damaged ({problem}")
        assert err.endswith("; decoding the images again\n") and len(err.splitlines()) == 1
        for key in ("train_images", "train_labels", "test_images", "test_labels"):
            assert torch.equal(data_again[key], fresh[key])
        assert data_again["classes"] == fresh["classes"]
        load_dataset(data)  # the cache written again is good: read without a word
        assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- failed writes

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


# ------------------------------------------------------------------------------------------------- numbers

def test_memory_needs_are_pinned_lower_bounds():
    config = UNetConfig(dim=8, dim_mults=(1, 2), channels=3)
    params = sum(p.numel() for p in UNet(config).parameters())
    assert parameter_count(config) == params
    needs = memory_needs(config, timesteps=10, side=16, sample_batch=4, samples_kept=6, training=True, evaluations=2)
    # skips per image: the first conv's 8 × 16² and two per stage, 2 · 8 · 16² + 2 · 8 · 8² (stage inputs 8, 8)
    skips = 8 * 256 + 2 * 8 * 256 + 2 * 8 * 64
    assert [n for n, _, _ in needs] == [params * 4 * 5,                            # weights, grads, EMA, 2 moments
                                        10 * 15 * 12,                              # 15 tables in float64 + float32
                                        4 * 2 * (skips * 2 + 4 * 3 * 256 * 4),     # guided: 2 × 4 images
                                        6 * 3 * 256 * 4]                           # the samples, float32
    assert [flag for _, _, flag in needs] == ["--dim or --dim_mults", "--timesteps", "--sample_batch", "--eval_fid"]
    huge = UNetConfig(dim=800_000_000)  # not built, even on the meta device: the middle blocks' convolutions
    assert parameter_count(huge) == 4 * 9 * 3_200_000_000 ** 2


def test_check_memory_names_the_largest_need_and_its_flag():
    check_memory([(1000, "small", "--a")], torch.device("cpu"))
    with pytest.raises(UserError) as refused:
        check_memory([(10 ** 20, "for the schedule", "--timesteps"), (10 ** 16, "for a batch", "--sample_batch"),
                      (1, "tiny", "--x")], torch.device("cpu"))
    message = str(refused.value)
    assert message.startswith("this would need at least 1.0e+20 B of memory (1.0e+20 B for the schedule) and this "
                              "machine has ")
    assert message.endswith(": lower --timesteps")
    assert [format_bytes(n) for n in (999, 1000, 1_234_567, 2.5e15)] == ["999 B", "1.0 kB", "1.2 MB", "2.5 PB"]


def test_on_cuda_the_samples_count_against_ram_and_a_sampling_batch_may_halve_down_to_one(monkeypatch):
    """The CUDA branch, on the CPU: the card's memory and the machine's are checked apart, and a --sample_batch the
    card cannot hold is not refused (generate halves it), while on a CPU it is."""
    def memory_of(device):
        return (10 ** 9, "the GPU has") if device.type == "cuda" else (10 ** 12, "this machine has")

    monkeypatch.setattr(ddpm_runtime, "memory_of", memory_of)
    cuda = torch.device("cuda")
    check_memory([(9 * 10 ** 8, "weights", "--dim")], cuda, [(9 * 10 ** 11, "samples", "--num_samples")])
    with pytest.raises(UserError, match=r"\(2.0 GB weights\) and the GPU has 1.0 GB: lower --dim$"):
        check_memory([(2 * 10 ** 9, "weights", "--dim")], cuda, [(9 * 10 ** 11, "samples", "--num_samples")])
    with pytest.raises(UserError, match=r"and this machine has 1.0 TB: lower --num_samples$"):
        check_memory([(10, "weights", "--dim")], cuda, [(2 * 10 ** 12, "samples", "--num_samples")])
    model = UNetConfig(dim=32, dim_mults=(1, 2, 2))
    check_run_memory(cuda, 10 ** 7, model, 1000, 32, 10 ** 7, training=False, evaluations=2)  # one image must fit
    with pytest.raises(UserError, match="lower --sample_batch$"):
        check_run_memory(torch.device("cpu"), 10 ** 7, model, 1000, 32, 10 ** 7, training=False, evaluations=2)


def test_the_epoch_order_takes_any_seed_in_the_generators_range_and_is_unchanged_for_the_rest():
    images, labels = torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long)
    for seed in (2 ** 64 - 1, -2 ** 63):
        order, _ = DeviceLoader(images, labels, 2, "cpu", seed=seed).epoch_indices(3)
        assert sorted(order.tolist()) == list(range(10))
    order, flips = DeviceLoader(images, labels, 2, "cpu", seed=5).epoch_indices(3)
    g = torch.Generator().manual_seed(5 * 1_000_003 + 3)  # the seeding before any seed was allowed
    assert torch.equal(order, torch.randperm(10, generator=g)) and torch.equal(flips, torch.rand(10, generator=g) < 0.5)


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


# ----------------------------------------------------------------------------------------------- run names

HOSTILE_NAMES = ["/tmp/ddpm_hostile_absolute", "../../elsewhere", "a/b", "a\\b", ".", "..", "", "ünïcödé", "x" * 300,
                 "tab\tname", "nul\x00name", "two words"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_run_name_that_is_not_a_name_is_refused_and_nothing_is_written_anywhere(name, tiny_data, trained, tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "models").mkdir()
    before = tree(tmp_path), tree(trained)
    for argv in (["--data_dir", tiny_data, "--epochs", "1", *TINY_MODEL],
                 ["--data_dir", tiny_data, "--resume", "auto"],
                 ["--inference", "--model_path", str(trained / "models" / "uncond" / "ckpt.pt"), "--no_cuda"]):
        result = run_main(*argv, "--run_name", name, cwd=sandbox)
        assert f"--run_name {name!r} " in one_line_error(result)
        assert "it names files, not a place" in result.stderr
    assert (tree(tmp_path), tree(trained)) == before
    assert not os.path.exists("/tmp/ddpm_hostile_absolute")


def test_a_checkpoints_invalid_run_name_is_replaced_and_nothing_leaves_the_save_dir(trained, tmp_path):
    ckpt = torch.load(trained / "models" / "uncond" / "ckpt.pt", weights_only=True)
    ckpt["config"]["run_name"] = "../../evil name"  # an older tool's, or a hand-edited file
    write_checkpoint(ckpt, str(tmp_path / "old copy.pt"))  # not a valid run name either: the stored one is tried
    result = run_main("--inference", "--model_path", "old copy.pt", "--num_samples", "2", "--no_cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == ("note: 'old copy.pt' carries the run name '../../evil name', which is "
                                             "not a valid one (letters A-Z a-z, digits, '_', '-' and '.'); its files "
                                             "are named 'evil_name'")
    written = sorted(path for path in tree(tmp_path) if path != "old copy.pt")
    assert written == ["outputs", "outputs/samples_evil_name", "outputs/samples_evil_name.npz",
                       "outputs/samples_evil_name.png", "outputs/samples_evil_name/00000.png",
                       "outputs/samples_evil_name/00001.png"]
    assert not os.path.exists(tmp_path.parent / "evil name")


def test_every_path_is_built_inside_its_folder_and_the_longest_name_fits():
    files = RunFiles("m", "o", "x" * MAX_RUN_NAME)
    assert os.path.dirname(files.ckpt_dir) == "m"
    for kind in OUTPUT_NAMES:
        path = files.output(kind, epoch=999_999_999)
        assert os.path.dirname(path) == "o"
        assert len(os.path.basename(path) + f".tmp{2 ** 22}") <= NAME_MAX
    assert max(len(os.path.basename(files.output(kind, epoch=999_999_999)) + f".tmp{2 ** 22}")
               for kind in OUTPUT_NAMES) == NAME_MAX
    with pytest.raises(UserError, match="at most 217"):
        RunFiles("m", "o", "x" * (MAX_RUN_NAME + 1))
    assert [sanitized_run_name(n) for n in ("../../x y", "..", "", None, "ok-1.2")] == ["x_y", "DDPM", "DDPM", "DDPM",
                                                                                       "ok-1.2"]


# ---------------------------------------------------------------------------------------------------- FID

def test_switching_fid_networks_recomputes_the_cached_statistics(tmp_path, fake_inception, capsys):
    data = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=3)
    loaded = load_dataset(data)
    facts = {"dataset": "folder", "classes": loaded["classes"], "channels": 3, "data_size": [16, 16]}
    first = InceptionFeatures(fake_inception, "cpu")
    second = InceptionFeatures(write_random_inception(str(tmp_path / "b.pth"), seed=1), "cpu")  # other features
    images = loaded["train_images"].permute(0, 2, 3, 1).numpy()
    mu_first = reference_statistics(first, data, None, facts).mu
    cache = os.path.join(data, stats_cache_name("train", "folder"))
    assert str(np.load(cache)["network"]) == first.fingerprint
    capsys.readouterr()
    second_reference = reference_statistics(second, data, None, facts)
    assert capsys.readouterr().err == (f"note: the FID reference statistics {cache} was made by another "
                                       "--fid_inception network: computing them again\n")
    expected_mu, expected_sigma, _ = second.statistics(images)
    assert np.allclose(second_reference.mu, expected_mu) and not np.allclose(second_reference.mu, mu_first)
    assert np.allclose(second_reference.sigma, expected_sigma, rtol=1e-6, atol=1e-6)
    assert np.allclose(reference_statistics(second, data, None, facts).mu, expected_mu)  # now from the cache
    assert capsys.readouterr().err == ""
    np.savez(cache, **{k: v for k, v in np.load(cache).items() if k != "network"})  # as an older version wrote it
    reference_statistics(second, data, None, facts)
    assert "does not record which network made it" in capsys.readouterr().err


def test_features_that_are_not_finite_are_refused_and_nothing_is_cached(tmp_path, fake_inception):
    data = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=3)
    loaded = load_dataset(data)
    facts = {"dataset": "folder", "classes": loaded["classes"], "channels": 3, "data_size": [16, 16]}
    features = InceptionFeatures(fake_inception, "cpu")  # finite on the one image it is tried on as it loads ...
    features.net = lambda x: (torch.full((len(x), 2048), float("nan")), torch.zeros(len(x), 1008))  # ... then NaN
    with pytest.raises(UserError, match="gave NaN or infinite features for some of 6 images: the network is broken; "
                                        "nothing was cached"):
        reference_statistics(features, data, None, facts)
    assert not os.path.exists(os.path.join(data, stats_cache_name("train", "folder")))


def test_statistics_are_checked_before_they_are_used():
    good = {"mu": np.zeros(2048), "sigma": np.eye(2048, dtype=np.float32)}
    assert statistics_problem(good) is None
    asymmetric = np.eye(2048)
    asymmetric[0, 1] = 0.5
    assert statistics_problem({**good, "sigma": asymmetric}) == "its sigma is not symmetric, as a covariance is"
    assert statistics_problem({"sigma": good["sigma"]}) == "it holds no mu"
    assert statistics_problem({**good, "mu": np.full(2048, np.nan)}) == "its mu or sigma hold NaN or infinite values"
    assert statistics_problem({**good, "mu": np.zeros(64)}).startswith("its mu is (64,) and sigma (2048, 2048), not")


def bad_fid_files(folder, fake_inception):
    """{name: (flags, the message)} of FID inputs that must stop a training run before its first step."""
    np.savez(folder / "no_mu.npz", sigma=np.eye(2048))
    np.savez(folder / "narrow.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(folder / "pickled.npz", mu=np.array([object()], dtype=object), sigma=np.eye(2048))
    (folder / "text.npz").write_text("mu, sigma")
    (folder / "text.pth").write_text("not a network")
    torch.save({"conv.weight": torch.zeros(2, 2)}, folder / "other.pth")
    state = torch.load(fake_inception, weights_only=True)
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
               folder / "nan.pth")
    return {
        "other weights": (["--fid_inception", str(folder / "other.pth")],
                          "does not hold the Inception-v3 weights torch-fidelity expects"),
        "NaN network": (["--fid_inception", str(folder / "nan.pth")],
                        "gives NaN or infinite features for one image: the network is broken"),
        "not a network": (["--fid_inception", str(folder / "text.pth")], "cannot be read as plain weights"),
        "stats without mu": (["--fid_ref_stats", str(folder / "no_mu.npz")], "cannot be used: it holds no mu"),
        "stats of other shape": (["--fid_ref_stats", str(folder / "narrow.npz")], "cannot be used: its mu is (64,)"),
        "pickled stats": (["--fid_ref_stats", str(folder / "pickled.npz")],
                          "cannot be used: it is not a readable npz of statistics (ValueError)"),
        "stats not an npz": (["--fid_ref_stats", str(folder / "text.npz")],
                             "cannot be used: it is not a readable npz of statistics"),
    }


def test_a_bad_fid_network_or_statistics_file_stops_training_before_its_first_step(tiny_data, tmp_path,
                                                                                    fake_inception):
    for case, (flags, message) in bad_fid_files(tmp_path, fake_inception).items():
        cwd = tmp_path / case.replace(" ", "_")
        cwd.mkdir()
        result = run_main("--data_dir", tiny_data, "--epochs", "1", "--eval_fid", "10", "--fid_inception",
                          fake_inception, *flags, *TINY_MODEL, cwd=cwd)
        assert message in one_line_error(result), case
        assert os.listdir(cwd) == [], case  # no checkpoint, grid or log: not one step was taken
