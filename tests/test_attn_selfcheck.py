"""triton_attn/selfcheck.py: the Triton kernel is the default only after its start-up check passes; every way the check
can fail (triton missing, a compile or launch error, wrong numbers) falls back to SDPA with one warning line.

On this CPU machine the check runs the real kernels in Triton's interpreter (conftest sets TRITON_INTERPRET=1),
so the passing path is the real comparison with SDPA, not a stub."""
import sys

import pytest
import torch

from triton_attn import selfcheck


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(selfcheck, "_RESULTS", {})


def test_check_passes_on_the_real_kernel(capsys):
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
    assert selfcheck.triton_works("cpu") == (True, "matches SDPA")
    assert selfcheck.default_attention("cpu") == "triton"
    assert capsys.readouterr().err == ""


def _fallback(capsys, device="cpu"):
    assert selfcheck.default_attention(device) == "sdpa"
    assert selfcheck.default_attention(device) == "sdpa"  # remembered: checked and warned once per device
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: Triton attention self-check failed"), err
    assert "using PyTorch SDPA" in err[0]
    return err[0]


def test_compile_failure_falls_back_to_sdpa_with_one_warning(monkeypatch, capsys):
    from triton_attn import attention

    def broken(q, k, v, scale=None):  # what a ptxas / launch failure looks like to the caller
        raise RuntimeError("PTX assembly aborted due to errors\nptxas fatal : Unsupported .version 9.4")
    monkeypatch.setattr(attention, "attention", broken)
    line = _fallback(capsys)
    assert "RuntimeError: PTX assembly aborted" in line and "9.4" not in line  # first line of the error only


def test_wrong_numbers_fall_back(monkeypatch, capsys):
    from triton_attn import attention
    real = attention.attention
    monkeypatch.setattr(attention, "attention", lambda q, k, v, scale=None: real(q, k, v, scale) * 1.5)
    assert "output differs from SDPA" in _fallback(capsys)
    monkeypatch.setattr(attention, "attention", lambda q, k, v, scale=None: real(q, k, v, scale) * float("nan"))
    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    assert "output differs from SDPA" in _fallback(capsys)


def test_wrong_gradient_falls_back(monkeypatch, capsys):
    from triton_attn import attention
    real = attention.attention
    # the same forward value (k - k.detach() is 0), but dK gains dO: only the backward comparison can see it
    monkeypatch.setattr(attention, "attention", lambda q, k, v, scale=None: real(q, k, v, scale) + (k - k.detach()))
    assert "dk differs from SDPA" in _fallback(capsys)


def test_triton_not_importable_falls_back(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "triton_attn.attention", None)  # import raises ImportError
    assert "cannot import the Triton kernels" in _fallback(capsys)


def test_setup_uses_the_check_only_on_cuda(monkeypatch):
    import argparse

    import base
    import model
    calls = []
    monkeypatch.setattr(selfcheck, "default_attention", lambda d: calls.append(d) or "sdpa")
    args = argparse.Namespace(device="cpu", dtype=None, attn=None, seed=0)
    env = base.setup(args)
    args.attn = model.default_attention(env.device)  # what every script does with an unset --attn
    assert env.device.type == "cpu" and args.attn == "sdpa" and calls == []  # no check off CUDA
