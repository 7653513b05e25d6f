"""
Start-up self-check of the Triton attention kernel, so that it is the CUDA default only where it demonstrably works.

    from triton_attn.selfcheck import default_attention
    args.attn = default_attention(device)      # "triton" if the check passes on this device, else "sdpa"

The check runs once per device and process: it compiles the kernels (forward and backward) for this GPU and
compares them on a small input (two heads, a sequence length that is not a multiple of any block, head dim 64,
bf16, the dtype training uses on CUDA) with PyTorch SDPA computed in float32. Anything that goes wrong (triton
missing or too old, a compile error, ptxas rejecting the GPU, a launch failure, wrong numbers) makes the default
PyTorch SDPA instead, with one warning line on stderr naming the cause. An explicit --attn triton is not checked:
it runs the kernel and any failure surfaces.
"""
import sys

import torch

_RESULTS = {}  # device string -> (ok, reason): the check runs once per device per process

# bf16 has 8 bits of mantissa: an O(1e-2) error on unit-scale outputs is its rounding, a broken kernel is O(1)
TOLERANCE = 5e-2


def _run_check(device):
    try:
        import importlib
        triton_attention = importlib.import_module("triton_attn.attention")
    except Exception as e:  # ImportError (no triton), or triton failing to initialise its backend
        return False, f"cannot import the Triton kernels ({type(e).__name__}: {e})"

    def differs(name, a, b):
        err = (a.float() - b).abs().max().item()
        ok = err <= TOLERANCE * max(1.0, b.abs().max().item())  # written so that NaN fails
        return None if ok else f"{name} differs from SDPA by {err:.3g}"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (torch.randn(1, 2, 77, 64, generator=g).to(device, torch.bfloat16) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32)
        o = triton_attention.attention(q, k, v)
        bad = differs("output", o, ref)  # the forward first: a broken one needs no backward to be rejected
        if bad:
            return False, bad
        grads = torch.autograd.grad(o, (q, k, v), do)
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
        for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
            bad = differs(name, a, b)
            if bad:
                return False, bad
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"{type(e).__name__}: {first}"
    return True, "matches SDPA"


def triton_works(device):
    """(ok, reason) of the self-check on `device`, computed on the first call and remembered."""
    key = str(torch.device(device))
    if key not in _RESULTS:
        _RESULTS[key] = _run_check(torch.device(device))
    return _RESULTS[key]


def default_attention(device):
    """The attention implementation to use by default on `device`: "triton" when the self-check passes there, else
    "sdpa", with one warning line on stderr (once per device). base.setup asks this for CUDA devices only (on a
    CPU the kernel runs only in Triton's interpreter, which the tests use to exercise this function)."""
    device = torch.device(device)
    first = str(device) not in _RESULTS
    ok, reason = triton_works(device)
    if not ok and first:
        print(f"warning: Triton attention self-check failed on {device} ({reason}); using PyTorch SDPA "
              f"(--attn triton forces the kernel)", file=sys.stderr, flush=True)
    return "triton" if ok else "sdpa"
