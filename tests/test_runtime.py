"""The machine (ddpm_runtime): precision, compilation, the GPU branches run on the CPU, memory needs."""
import contextlib
import copy
import functools
import json
import re

import pytest
import torch
from torch._dynamo.utils import counters

import ddpm_main
import ddpm_runtime
import ddpm_train_step
from conftest import TINY_MODEL, run_main, tiny_unet
from ddpm_diffusion import Diffusion, SamplerSettings, cosine_beta_schedule
from ddpm_helpers import UserError
from ddpm_model import UNet, UNetConfig
from ddpm_runtime import (Denoiser, check_memory, check_run_memory, choose_compile, choose_precision, format_bytes,
                          memory_needs, parameter_count)
from ddpm_sample import generate
from ddpm_train_step import TrainingStep, build_loss_scaler, build_optimizer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UNet(dim=8, dim_mults=(1, 2), num_classes=10)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    return x, torch.randint(0, 10, (8,), generator=g), torch.randint(0, 10, (8,), generator=g), \
        torch.randn(8, 3, 16, 16, generator=g)


def test_bf16_loss_and_gradients_match_fp32(model):
    d = Diffusion(10, cosine_beta_schedule)
    x, t, y, noise = batch()
    plain = d.p_losses(model, x, t, noise, class_labels=y)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    fast = d.p_losses(Denoiser(model, precision="bf16"), x, t, noise, class_labels=y)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    assert fast.item() == pytest.approx(plain.item(), rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in plain_grads]),
                                                   torch.cat([g.flatten() for g in fast_grads]), dim=0)
    assert cosine > 0.99


def test_compile_failure_falls_back_to_eager(model, monkeypatch, capsys):
    def broken_compile(module, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    x, t, y, _ = batch()
    denoiser = Denoiser(model, compile=True)
    assert torch.equal(denoiser(x, t, y), model(x, t, y))
    assert not denoiser.compiled and "torch.compile failed" in capsys.readouterr().err


def test_fast_sampling_matches_plain_sampling(model):
    d = Diffusion(10, cosine_beta_schedule)
    noise = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    for settings in (SamplerSettings("dpm++2m"), SamplerSettings("ddim"), SamplerSettings("ddpm")):
        torch.manual_seed(3)
        plain = d.sample(model, noise.shape, settings, labels, noise=noise)
        torch.manual_seed(3)
        fast = d.sample(Denoiser(model, precision="bf16"), noise.shape, settings, labels, noise=noise)
        assert (fast - plain).abs().mean() < 0.02, settings


def a_batch(n=8, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def training_step(model, precision="fp32", compile=False, grad_accum=1, scaler=None):
    return TrainingStep(model, copy.deepcopy(model).requires_grad_(False), build_optimizer(model, 1e-3),
                        Diffusion(10, cosine_beta_schedule), Denoiser(model, compile, precision), p_uncond=0.1,
                        loss_type="l2", ema_decay=0.999, grad_accum=grad_accum,
                        scaler=scaler or build_loss_scaler(precision, torch.device("cpu")))


@pytest.fixture
def cuda_device(monkeypatch):
    """A stand-in CUDA device of a given compute capability, as torch.cuda reports it."""
    def make(name, capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return torch.device("cuda", 0)
    return make


def test_auto_precision_is_bf16_where_native_fp16_on_older_gpus_else_fp32(cuda_device, monkeypatch):
    assert choose_precision("auto", cuda_device("NVIDIA H200", (9, 0))) == (
        "bf16", "NVIDIA H200 (compute capability 9.0) has native bf16")
    assert choose_precision("auto", cuda_device("NVIDIA A100", (8, 0)))[0] == "bf16"
    assert choose_precision("auto", cuda_device("Tesla T4", (7, 5))) == (
        "fp16", "Tesla T4 (compute capability 7.5) has no bf16 tensor cores: fp16 with a dynamic loss scaler")
    assert choose_precision("auto", cuda_device("Tesla V100", (7, 0)))[0] == "fp16"
    assert choose_precision("fp32", cuda_device("Tesla T4", (7, 5))) == ("fp32", "--precision fp32")
    assert choose_precision("bf16", cuda_device("Tesla T4", (7, 5)))[1].endswith("expect it slower than float32")

    cpu = torch.device("cpu")
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: False)
    assert choose_precision("auto", cpu) == ("fp32", "the CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated")
    assert choose_precision("bf16", cpu)[1].startswith("--precision bf16, though the CPU has neither")
    assert choose_precision("fp16", cpu) == ("fp16", "--precision fp16: emulated on the CPU, expect it much slower "
                                                     "than float32")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert choose_precision("auto", cpu) == ("bf16", "the CPU has AMX")
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # a torch without the private checks
        monkeypatch.delattr(torch.cpu, check)
    assert ddpm_runtime.cpu_bf16_instructions() == [] and choose_precision("auto", cpu)[0] == "fp32"


def test_compile_auto_is_cuda_only_and_on_means_the_cpu_too():
    assert choose_compile("auto", torch.device("cuda", 0)) and not choose_compile("auto", torch.device("cpu"))
    assert choose_compile("on", torch.device("cpu")) and not choose_compile("off", torch.device("cuda", 0))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_loss_and_gradients_match_fp32_and_weights_stay_fp32(precision):
    """bf16 keeps 8 bits of mantissa, fp16 11: the loss within 2 % and the gradient's direction within cos > 0.99."""
    results = {}
    for p in ("fp32", precision):
        model = tiny_unet()
        step = training_step(model, p)
        torch.manual_seed(5)
        loss, skipped = step(*a_batch(), step=0, lr=1e-3)
        assert skipped.item() == 0
        results[p] = loss.item(), torch.cat([q.grad.flatten() for q in model.parameters()])
        assert all(q.dtype == torch.float32 for q in [*model.parameters(), *step.ema_model.parameters()])
        assert all(v.dtype == torch.float32 for s in step.optimizer.state.values() for v in s.values())
    assert results[precision][0] == pytest.approx(results["fp32"][0], rel=2e-2)
    assert torch.nn.functional.cosine_similarity(results["fp32"][1], results[precision][1], dim=0) > 0.99


def test_fp16_steps_whose_gradients_overflow_are_skipped_counted_and_leave_the_weights_alone():
    """From a loss scale of 2¹⁹ the tiny U-Net's scaled gradients overflow fp16 (max 65,504) twice: those steps change
    no weight and halve the scale; the third step trains, at 2¹⁷."""
    model = tiny_unet()
    step = training_step(model, "fp16", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 19))
    x, y = a_batch()
    flags, scales = [], []
    for i in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        loss, skipped = step(x, y, step=i, lr=1e-3)
        assert torch.isfinite(loss)  # an overflow in the backward pass, not in the loss
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert unchanged == bool(skipped.item())
        flags.append(int(skipped.item()))
        scales.append(step.scaler.get_scale())
    assert flags == [1, 1, 0] and scales == [2.0 ** 18, 2.0 ** 17, 2.0 ** 17]


def test_fused_adamw_steps_as_the_plain_one():
    """One step from the same weights and gradients agrees to float32 round-off (later steps drift apart by up to
    ~lr where a gradient is near 0, as any two AdamW implementations do)."""
    model, plain_model = tiny_unet(), tiny_unet()
    fused, plain = build_optimizer(model, 1e-3), torch.optim.AdamW(plain_model.parameters(), lr=1e-3)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x, y = a_batch()
    t = torch.arange(8) % 10
    for m, optimizer in ((model, fused), (plain_model, plain)):
        (m(x, t, y) - x).pow(2).mean().backward()
        optimizer.step()
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a.grad, b.grad) and torch.allclose(a, b, rtol=0, atol=1e-7)
        assert not torch.equal(a, tiny_unet().state_dict()[next(k for k, v in model.named_parameters() if v is a)])


def test_fp16_training_through_the_cli_reports_skipped_steps_and_a_resume_may_change_precision(
        tiny_data, tmp_path, monkeypatch, capsys):
    """27 training images, batch 8: 4 steps an epoch. From a loss scale of 2¹⁹ the first steps overflow: counted in
    the log lines and the metrics (each skip halved the scale), no NaN stop. The resume runs in float32 and says so."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ddpm_train_step, "FP16_INIT_SCALE", 2.0 ** 19)
    monkeypatch.setattr(ddpm_train_step, "LOG_LINE_SECONDS", 0)
    ddpm_main.main(["--data_dir", tiny_data, "--epochs", "1", "--log_interval", "1", "--run_name", "half",
                    "--sampling_steps", "1", *TINY_MODEL, "--precision", "fp16"])
    out = capsys.readouterr().out
    assert "compute: fp16 autocast (--precision fp16: emulated on the CPU" in out
    skips = [re.fullmatch(r"step \d  epoch 1  loss \S+  lr \S+  \d+ img/s  (\d) fp16 steps skipped \(overflow\)", line)
             for line in out.splitlines() if line.startswith("step ")]
    skips = [int(match.group(1)) for match in skips]
    assert len(skips) == 4 and skips[0] == 1 and skips == sorted(skips) and skips[-1] < 4  # the first overflows
    metrics = json.loads((tmp_path / "outputs" / "metrics_half.json").read_text())
    assert metrics["fp16_skipped_steps"] == skips[-1] and metrics["precision"] == "fp16" and metrics["steps"] == 4
    last = torch.load(tmp_path / "models" / "half" / "last.pt", weights_only=True)
    assert last["grad_scaler"]["scale"] == 2.0 ** (19 - skips[-1]) and last["config"]["precision"] == "fp16"

    ddpm_main.main(["--resume", "auto", "--run_name", "half", "--epochs", "2", "--precision", "fp32", "--no_cuda"])
    out = capsys.readouterr().out
    assert "precision fp16 → fp32" in out and "compute: float32 (--precision fp32)" in out
    metrics = json.loads((tmp_path / "outputs" / "metrics_half.json").read_text())
    assert metrics["steps"] == 8 and metrics["fp16_skipped_steps"] == skips[-1] and metrics["precision"] == "fp32"


@pytest.fixture
def scalar_kernels(monkeypatch):
    """Inductor's CPU kernels without SIMD: what is tested here is what this tool hands torch.compile (one graph, the
    same numbers), and vectorised C++ takes twice as long to compile cold."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", False)


def test_compiled_training_step_matches_eager_and_compiles_one_graph(monkeypatch):
    """The forward and backward pass of a one-stage U-Net as torch.compile captures them (AOTAutograd's joint graph,
    run eagerly: inductor's C++ for a backward pass takes 26 s to compile cold, and the sampler's test below runs
    inductor's code), three steps of one batch shape: one graph, compiled once; losses within 1e-4, first-step
    gradients within 1e-4 of the largest, weights within 3 · lr (Adam's step is about lr wherever a gradient's sign
    is uncertain)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    x, y = a_batch(4, 8)
    runs = {}
    for compiled in (False, True):
        model = tiny_unet(dim_mults=(1,), attn_heads=1, attn_dim_head=8).to(memory_format=torch.channels_last)
        step = training_step(model, "fp32", compile=compiled)
        torch.manual_seed(3)
        losses, grads = [], None
        for i in range(3):
            loss, _ = step(x, y, step=i, lr=1e-3)
            losses.append(loss.item())
            grads = grads or [p.grad.clone() for p in model.parameters()]
        assert step.denoiser.compiled == compiled
        runs[compiled] = losses, grads, [p.detach().clone() for p in model.parameters()]
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1
    (eager_losses, eager_grads, eager_weights), (losses, grads, weights) = runs[False], runs[True]
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    scale = max(g.abs().max() for g in eager_grads)
    assert all((a - b).abs().max() <= 1e-4 * scale for a, b in zip(grads, eager_grads))
    assert all((a - b).abs().max() <= 3e-3 for a, b in zip(weights, eager_weights))


def test_compiled_sampler_matches_eager_and_compiles_one_graph(scalar_kernels):
    """DPM-Solver++(2M) with guidance (both halves in one 2N batch) over two batches of one shape: one graph; the
    samples within 1e-3 of eager."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_unet(dim_mults=(1,), attn_heads=1, attn_dim_head=8).to(memory_format=torch.channels_last).eval()
    diffusion = Diffusion(10, cosine_beta_schedule)
    settings = SamplerSettings("dpm++2m", steps=4, guidance_scale=3.0)
    labels = torch.arange(8) % 10
    eager = generate(diffusion, Denoiser(model), settings, 8, 8, class_labels=labels, batch_size=4, seed=0)
    compiled_denoiser = Denoiser(model, compile=True)
    compiled = generate(diffusion, compiled_denoiser, settings, 8, 8, class_labels=labels, batch_size=4, seed=0)
    assert compiled_denoiser.compiled
    assert counters["stats"]["unique_graphs"] == 1
    assert (compiled - eager).abs().max() < 1e-3


def test_compile_on_compiles_training_and_inference_on_the_cpu(tiny_data, tmp_path, monkeypatch, capsys):
    """--compile on through the CLI hands the training U-Net and its EMA (training) or the sampled U-Net (inference)
    to torch.compile, and the first step of each batch size is timed apart from training (the device drained
    before and after it: a no-op on the CPU). torch.compile is recorded here, not run: what it makes of the U-Net
    is checked above."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(type(model).__name__) or model)
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--epochs", "1", "--compile", "on", "--save_model", "--run_name", "c",
                    "--sampling_steps", "1", *TINY_MODEL])
    assert "; torch.compile" in capsys.readouterr().out and compiled == ["UNet", "UNet"]
    metrics = json.loads((tmp_path / "outputs" / "metrics_c.json").read_text())
    assert metrics["compiled"] and 0 < metrics["timing"]["compile_s"] < metrics["timing"]["compile_s"] + \
        metrics["timing"]["train_s"]
    ddpm_main.main(["--inference", "--model_path", "models/c/ckpt.pt", "--num_samples", "2", "--compile", "on",
                    "--no_cuda"])
    assert ", compiled): " in capsys.readouterr().out and compiled == ["UNet"] * 3
    ddpm_main.main(["--inference", "--model_path", "models/c/ckpt.pt", "--num_samples", "2", "--no_cuda"])
    assert ", compiled" not in capsys.readouterr().out and len(compiled) == 3  # auto: CUDA only


class FakeDDP(torch.nn.Module):
    """What TrainingStep asks of DistributedDataParallel: forward, and no_sync (counted)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.no_sync_entered = module, 0

    def forward(self, *args):
        return self.module(*args)

    def no_sync(self):
        self.no_sync_entered += 1
        return contextlib.nullcontext()


def test_accumulated_step_computes_the_whole_batch_step_and_syncs_only_the_last_micro_batch():
    x, y = a_batch(7)  # 7 = 4 + 3: micro-batches need not be equal
    whole, accumulated = tiny_unet(), tiny_unet()
    step_whole = training_step(whole)
    wrapper = FakeDDP(accumulated)
    step_accumulated = TrainingStep(accumulated, copy.deepcopy(accumulated).requires_grad_(False),
                                    build_optimizer(accumulated, 1e-3), Diffusion(10, cosine_beta_schedule),
                                    Denoiser(wrapper), 0.1, "l2", 0.999, grad_accum=2)
    for i in range(2):
        torch.manual_seed(i)
        loss_whole, _ = step_whole(x, y, step=i, lr=1e-3)
        torch.manual_seed(i)
        loss_accumulated, _ = step_accumulated(x, y, step=i, lr=1e-3)
        assert loss_accumulated.item() == pytest.approx(loss_whole.item(), rel=1e-5)
        scale = max(p.grad.abs().max() for p in whole.parameters())
        for a, b in zip(whole.parameters(), accumulated.parameters()):  # float32 sums in another order
            assert (a.grad - b.grad).abs().max() <= 1e-5 * scale
    assert wrapper.no_sync_entered == 2  # the first of each step's two micro-batches
    for a, b in zip(step_whole.ema_model.parameters(), step_accumulated.ema_model.parameters()):
        assert torch.allclose(a, b, atol=2e-3)  # Adam moves a weight whose gradient is ~0 by up to lr either way


def test_grad_accum_through_the_cli_trains_what_the_whole_batch_trains(tiny_data, tmp_path):
    """--batch_size 4 --grad_accum 2 against --batch_size 8: the same steps, read-outs, loss history and weights."""
    common = ["--data_dir", tiny_data, "--epochs", "2", "--conditional", "--precision", "fp32", "--save_model",
              "--log_interval", "3", *TINY_MODEL]
    for name, batch in (("accum", ["--batch_size", "4", "--grad_accum", "2"]), ("whole", ["--batch_size", "8"])):
        result = run_main(*common, "--run_name", name, *batch, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert ("; 2 micro-batches of 4 per optimizer step: 8 images a step" in result.stdout) == (name == "accum")
    accum, whole = (json.loads((tmp_path / "outputs" / f"loss_history_{n}.json").read_text())
                    for n in ("accum", "whole"))
    for key in ("train_loss", "val_loss", "test_loss"):
        assert accum[key] == pytest.approx(whole[key], rel=1e-5), key
    a, b = (torch.load(tmp_path / "models" / n / "ckpt.pt", weights_only=True) for n in ("accum", "whole"))
    assert a["step"] == b["step"] == 8 and a["config"]["global_batch_size"] == 8 and a["config"]["grad_accum"] == 2
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], atol=2e-3), name
    metrics = json.loads((tmp_path / "outputs" / "metrics_accum.json").read_text())
    assert metrics["grad_accum"] == 2 and metrics["global_batch_size"] == 8


def test_memory_needs_are_pinned_lower_bounds():
    config = UNetConfig(dim=8, dim_mults=(1, 2), channels=3)
    params = sum(p.numel() for p in UNet(config).parameters())
    assert parameter_count(config) == params
    needs = memory_needs(config, timesteps=10, side=16, sample_batch=4, kept=(6, "--eval_fid"), training=True,
                         evaluations=2)
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
    kept = (10 ** 7, "--num_samples")
    check_run_memory(cuda, 10 ** 7, model, 1000, 32, kept, training=False, evaluations=2)  # one image must fit
    with pytest.raises(UserError, match="lower --sample_batch$"):
        check_run_memory(torch.device("cpu"), 10 ** 7, model, 1000, 32, kept, training=False, evaluations=2)
