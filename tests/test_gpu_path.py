"""The GPU-only code paths, reached on a CPU where they can be (issue 36): where the fused
optimizer's step lives after a universal load, the CUDA RNG restore on fewer devices, the FLOPs
of a masked step with split DWT tokens (what budgets and MFU use)."""

from __future__ import annotations

import pytest
import torch


def test_after_a_universal_load_each_step_is_its_own_and_where_the_kernel_wants_it():
    """DeepSpeed's universal load shares one CPU `step` tensor among the parameters; fused (and
    capturable) AdamW needs it on the parameter's device (CUDA runs use fused=True), plain AdamW
    on the CPU. Reached with parameters on the meta device (as a stand-in for CUDA)."""
    from maskdm.pipeline.checkpoint import place_steps
    a = torch.nn.Parameter(torch.empty(3, device="meta"))
    b = torch.nn.Parameter(torch.empty(2, device="meta"))
    c = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a, b]}, {"params": [c]}], lr=1e-3)
    shared = torch.tensor(7.0)
    for p in (a, b, c):
        opt.state[p] = {"step": shared}
    place_steps(opt)  # plain AdamW: on the CPU, each its own
    steps = [opt.state[p]["step"] for p in (a, b, c)]
    assert [s.device.type for s in steps] == ["cpu"] * 3
    assert steps[2].item() == 7.0 and len({id(s) for s in steps + [shared]}) == 4
    opt.state[c]["step"] += 1  # one parameter's step no longer moves the others
    assert shared.item() == 7.0 and steps[0].item() == 7.0
    for g in opt.param_groups:
        g["fused"] = True  # as on CUDA (fused kernels do not run on meta)
    place_steps(opt)
    assert [opt.state[p]["step"].device.type for p in (a, b, c)] == ["meta", "meta", "cpu"]


def test_a_checkpoint_written_with_more_devices_restores_on_fewer():
    """The CUDA RNG state of 0.3.0 checkpoints is the list of every visible device's state; a
    resume where a process sees fewer devices (one GPU per task under Slurm, another world size)
    takes its own device's, never indexes past the list (set_rng_state_all raised IndexError)."""
    from maskdm.pipeline.checkpoint import cuda_state_for
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    assert torch.equal(cuda_state_for(states, 3), states[3])
    assert torch.equal(cuda_state_for(states[:1], 5), states[0])  # fewer saved than devices
    assert torch.equal(cuda_state_for(states[5], 0), states[5])  # 0.3.1: one state per rank
    assert cuda_state_for(None, 0) is None and cuda_state_for([], 0) is None


@pytest.mark.parametrize("kind,extra", [("block", {"block_size": 2}), ("patch", {}),
                                        ("crop", {"crop_size": 4})])
def test_step_flops_of_split_dwt_tokens_under_a_mask_count_both_groups(kind, extra):
    """The paper's 256 px recipes: split DWT tokens (LL and details) under a mask. step_flops
    (the experiment's budgets, bench train's MFU) counts each group's visible tokens: for this
    8x8 token grid, 50% patch / block masks keep 32 of 64 cells per group, a 4x4 crop 16; so 64
    (or 32) visible tokens enter the encoder, and the count equals the real forward pass's with
    a mask drawn by the training code, times 3 (forward + backward) times the batch."""
    from maskdm.model.config import ModelConfig
    from maskdm.model.flops import forward_flops, step_flops
    from maskdm.model.masks import MaskSpec, sample_keep_idx
    from tests.test_model import _counted_flops
    cfg = ModelConfig(preset="tiny", in_channels=12, input_size=16, patch_size=2,
                      dwt_tokens="split", attention="sdpa").resolved()
    spec = MaskSpec(kind=kind, ratio=0.5 if kind != "crop" else 0.0, **extra).validate(cfg.grid)
    per_group = {"block": 32, "patch": 32, "crop": 16}[kind]
    keep = sample_keep_idx(spec, 1, cfg.grid, torch.Generator().manual_seed(0), groups=2)
    assert keep.shape == (1, 2 * per_group)
    assert step_flops(cfg, spec, 8) == 3 * forward_flops(cfg, 2 * per_group) * 8
    assert forward_flops(cfg, 2 * per_group) == _counted_flops(cfg, keep)


@pytest.mark.parametrize("error", [AttributeError("undefined symbol: _ZN3c10"),
                                   OSError("libcudart.so.12: cannot open shared object file"),
                                   RuntimeError("no kernel image is available")])
def test_attention_auto_falls_back_to_sdpa_on_any_failure_of_the_xformers_probe(monkeypatch,
                                                                                error):
    """A mismatched xformers build fails in many ways (before: only ImportError, RuntimeError,
    ValueError and NotImplementedError fell back; an AttributeError or OSError crashed
    `attention: auto`); `xformers` itself is then refused with the reason."""
    from maskdm.model import attention

    def probe(device):
        raise error
    monkeypatch.setattr(attention, "xformers_installed", lambda: True)
    monkeypatch.setattr(attention, "_probe", probe)
    monkeypatch.setattr(attention, "_probe_cache", {})
    backend, why = attention.resolve_backend("auto", "cuda")
    assert backend == "sdpa" and type(error).__name__ in why and "cannot run here" in why
    with pytest.raises(RuntimeError, match="model.attention=xformers: xformers is installed but"):
        attention.resolve_backend("xformers", "cuda")


def test_doctor_checks_for_the_c_compiler_triton_needs_on_gpus(monkeypatch):
    """`maskdm doctor` looked for a compiler only without a GPU (DeepSpeed's CPU op); on GPUs
    torch.compile's Triton needs one too. Reached by pretending CUDA is there."""
    import shutil

    import torch

    from maskdm.pipeline import doctor
    from maskdm.pipeline.config import load_config
    from tests.test_train import ROOT
    cfg = load_config([str(ROOT / "configs" / "test_tiny.yaml")], ["train.compile=true"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    (check,) = doctor._check_triton_compiler(cfg)
    assert check.status == doctor.FAIL and "train.compile=true" in check.detail
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/cc" if name == "cc" else None)
    (check,) = doctor._check_triton_compiler(cfg)
    assert check.status == doctor.OK and "/usr/bin/cc" in check.detail
