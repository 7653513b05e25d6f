"""
Benchmark of the Triton attention kernels against PyTorch SDPA (each backend) and the explicit math path, with a
numerics check of the Triton kernels on the same inputs.

    python triton_attn/bench_attention.py                          # the 4 project shapes, bf16, table + checks
    python triton_attn/bench_attention.py --shapes 128x12x256x64 --dtype fp16
    python triton_attn/bench_attention.py --check-only             # numerics only, no timing
    TRITON_INTERPRET=1 python triton_attn/bench_attention.py       # no GPU: a tiny check in the CPU interpreter

Shapes are BxHxNxD (batch, heads, sequence, head dim). For each shape it prints forward, backward and
forward+backward time (ms, median of triton.testing.do_bench) and TFLOP/s for every provider that runs:
  triton          triton_attn/attention.py
  sdpa-flash      torch SDPA, SDPBackend.FLASH_ATTENTION     (a backend that errors is reported and skipped)
  sdpa-efficient  torch SDPA, SDPBackend.EFFICIENT_ATTENTION
  sdpa-cudnn      torch SDPA, SDPBackend.CUDNN_ATTENTION
  math            model.attention(impl="math"), what --attn math runs (materialises the N x N scores)
FLOP convention (that of FlashAttention's papers and the Triton tutorial): forward = 4*B*H*N*N*D (two matmuls),
backward = 2.5 x forward (five matmuls; a backward that recomputes Q K^T, like this one and FlashAttention's,
does more work than it is credited for), forward+backward = 3.5 x forward.

Numerics: Triton output and gradients in the chosen dtype against an fp32 PyTorch reference computed from the
same (rounded) inputs on the first few batch items; the SDPA flash / efficient error beside it as a yardstick.
A check passes when the Triton error is within 2x the best SDPA backend's error or 1% of the reference's range.
The last line says whether Triton forward+backward is at least as fast as the best SDPA backend at every
benchmarked head-dim-64 shape of sequence 256 and 1369 (the project's goal on H100 / H200 in bf16).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for a plain run
import base  # noqa: E402
import triton_attn.attention as ka  # noqa: E402
import model  # noqa: E402

DEFAULT_SHAPES = "128x12x256x64,128x12x150x64,32x12x1369x64,128x12x300x32"
CHECK_BATCH = 4  # batch items compared against the fp32 reference (the batch items are independent)


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        try:
            B, H, N, D = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise base.UserError(f"--shapes: {item!r} is not BxHxNxD (e.g. 128x12x256x64)") from None
        if min(B, H, N, D) < 1 or D > 128:
            raise base.UserError(f"--shapes: {item!r} needs positive sizes and a head dim of at most 128")
        shapes.append((B, H, N, D))
    return shapes


def providers():
    """name -> attention(q, k, v) for every implementation this torch build has."""
    out = {"triton": ka.attention}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        SDPBackend = None
    if SDPBackend is not None:
        for name, backend in [("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"),
                              ("sdpa-cudnn", "CUDNN_ATTENTION")]:
            if hasattr(SDPBackend, backend):
                def fn(q, k, v, b=getattr(SDPBackend, backend)):
                    with sdpa_kernel(b):
                        return F.scaled_dot_product_attention(q, k, v)
                out[name] = fn
    out["math"] = lambda q, k, v: model.attention(q, k, v, impl="math")
    return out


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], do


def run_once(fn, qkv, do):
    for t in qkv:
        t.grad = None
    o = fn(*qkv)
    o.backward(do)
    return o.detach(), [t.grad for t in qkv]


def check(shape, dtype, device, provs):
    """Max abs error of each provider vs an fp32 reference on the first CHECK_BATCH batch items -> dict."""
    qkv, do = make_inputs(shape, dtype, device)
    b = min(CHECK_BATCH, shape[0])
    ref_in = [t.detach()[:b].float().requires_grad_() for t in qkv]
    ref_o = model.attention(*ref_in, impl="math")  # fp32 throughout: the rounded inputs, exact arithmetic
    ref_g = torch.autograd.grad(ref_o, ref_in, do[:b].float())
    errs = {}
    for name, fn in provs.items():
        if name == "math":
            continue
        try:
            o, g = run_once(fn, qkv, do)
        except Exception as e:  # a backend this GPU / dtype / shape does not support
            errs[name] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            continue
        errs[name] = max((a[:b].float() - r).abs().max().item() for a, r in zip([o] + g, [ref_o, *ref_g]))
    scale = max(t.abs().max().item() for t in [ref_o, *ref_g])
    return errs, scale


def bench(shape, dtype, device, fn):
    """(forward, backward, forward+backward) milliseconds, medians of triton.testing.do_bench."""
    from triton.testing import do_bench
    qkv, do = make_inputs(shape, dtype, device)
    run_once(fn, qkv, do)  # compile / autotune outside the timing
    with torch.no_grad():
        t_fwd = do_bench(lambda: fn(*qkv), return_mode="median")
    o = fn(*qkv)
    t_bwd = do_bench(lambda: o.backward(do, retain_graph=True), grad_to_none=qkv, return_mode="median")
    t_all = do_bench(lambda: fn(*qkv).backward(do), grad_to_none=qkv, return_mode="median")
    return t_fwd, t_bwd, t_all


def fmt(err):
    return f"{err:.2e}" if isinstance(err, float) else err


def interpreted_sanity_check():
    """No GPU but TRITON_INTERPRET=1: the same numerics check on a tiny shape, Triton vs fp32, in bf16."""
    shape = (1, 2, 150, 64)
    errs, scale = check(shape, torch.bfloat16, "cpu", {"triton": ka.attention})
    ok = errs["triton"] <= 0.01 * max(1.0, scale)
    print(f"interpreted check {shape} bf16: max abs err {errs['triton']:.2e} vs fp32 -> {'PASS' if ok else 'FAIL'}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxHxNxD (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", choices=list(base.DTYPES), help="input dtype (default: bf16)")
    p.add_argument("--check-only", action="store_true", help="numerics checks only, no timing")
    args = p.parse_args()
    shapes, dtype = parse_shapes(args.shapes), base.DTYPES[args.dtype]

    if not torch.cuda.is_available():
        if ka.INTERPRET:
            sys.exit(0 if interpreted_sanity_check() else 1)
        print("no CUDA GPU: nothing to benchmark. On a GPU machine run `python triton_attn/bench_attention.py`; here, "
              "`TRITON_INTERPRET=1 python triton_attn/bench_attention.py` runs a tiny interpreted check.")
        return
    import triton
    device, provs = "cuda", providers()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | {args.dtype}")
    print("TFLOP/s convention: fwd 4*B*H*N^2*D, bwd 2.5x fwd, fwd+bwd 3.5x fwd\n")

    all_ok, results = True, {}
    for shape in shapes:
        B, H, N, D = shape
        errs, scale = check(shape, dtype, device, provs)
        sdpa_errs = [e for n, e in errs.items() if n.startswith("sdpa") and isinstance(e, float)]
        bound = max(2 * min(sdpa_errs, default=0.0), 0.01 * max(1.0, scale))
        ok = isinstance(errs["triton"], float) and errs["triton"] <= bound
        all_ok &= ok
        print(f"== B={B} H={H} N={N} D={D}: numerics (max abs err of o, dq, dk, dv vs fp32 on {min(B, CHECK_BATCH)} "
              f"items; scale {scale:.2f}): triton {fmt(errs['triton'])} {'PASS' if ok else 'FAIL'} (bound {bound:.2e})"
              + "".join(f" | {n} {fmt(e)}" for n, e in errs.items() if n != "triton"))
        if args.check_only:
            continue
        flop = 4 * B * H * N * N * D
        print(f"{'provider':16s}" + "".join(f"{c:>10s}" for c in ("fwd ms", "bwd ms", "f+b ms", "fwd TF/s",
                                                               "bwd TF/s", "f+b TF/s")))
        for name, fn in provs.items():
            if isinstance(errs.get(name), str):
                print(f"{name:16s} {errs[name]}")
                continue
            try:
                t = bench(shape, dtype, device, fn)
            except Exception as e:  # e.g. out of memory for the math path
                print(f"{name:16s} failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                torch.cuda.empty_cache()
                continue
            results[(shape, name)] = t
            tf = [flop * m / (ms * 1e-3) / 1e12 for m, ms in zip((1, 2.5, 3.5), t)]
            print(f"{name:16s}" + "".join(f"{x:10.3f}" for x in t) + "".join(f"{x:10.1f}" for x in tf))
        print()

    if not args.check_only:
        verdicts = []
        for shape in shapes:
            if shape[2] in (256, 1369) and shape[3] == 64 and (shape, "triton") in results:
                sdpa = {n: results[(s, n)][2] for (s, n) in results if s == shape and n.startswith("sdpa")}
                if sdpa:
                    best = min(sdpa, key=sdpa.get)
                    tri = results[(shape, "triton")][2]
                    verdicts.append((tri <= sdpa[best],
                                     f"N={shape[2]}: triton {tri:.3f} ms vs {best} {sdpa[best]:.3f} ms"))
        if verdicts:
            met = all(v for v, _ in verdicts)
            print(f"GOAL {'MET' if met else 'NOT MET'} (triton fwd+bwd <= best SDPA, D=64, seq 256 and 1369): "
                  + "; ".join(s for _, s in verdicts))
        else:
            print("GOAL not evaluated: no D=64 shape of sequence 256 or 1369 had both triton and SDPA timed")
    print(f"numerics: {'all PASS' if all_ok else 'some FAIL'}")
    if not all_ok:
        sys.exit(1)


if __name__ == "__main__":
    base.run(main)
