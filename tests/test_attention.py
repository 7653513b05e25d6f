"""Tests of the Triton attention kernels (triton_attn/attention.py) against a float64 PyTorch reference.

On a machine without a GPU they run the real kernels in the Triton CPU interpreter: TRITON_INTERPRET=1 is set here
before anything imports triton's kernels (triton reads it when a kernel is defined). With TRITON_INTERPRET=0 and a
GPU, the same tests run on the GPU. Every output and scratch buffer is filled with NaN before the kernels run
(triton_attn.attention.POISON), so an element a kernel never writes fails the comparison.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_attn.attention (and its @triton.jit) is imported

import copy  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
import triton_attn.attention as ka  # noqa: E402
import model  # noqa: E402
from conftest import SAMPLE  # noqa: E402

DEVICE = "cpu" if ka.INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    # (also the case if another module imported triton_attn.attention before this one set TRITON_INTERPRET)
    pytest.skip("triton_attn.attention was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)

# max |error| allowed, relative to max |reference| (at least 1): fp32 is exact up to summation order; fp16 / bf16
# round q, k, v, P and dS to 11 / 8 significant bits before the tensor-core products
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(ka, "POISON", True)


def make_inputs(B, H, N, D, dtype, layout="contiguous", seed=0):
    """q, k, v (leaf tensors needing grad) and an upstream gradient. layout="qkv": q, k, v are strided views of
    one (B, N, 3, H, D) tensor, exactly as model.Attention produces them."""
    g = torch.Generator().manual_seed(seed)
    if layout == "qkv":
        qkv = torch.randn(B, N, 3, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        leaves = (qkv,)
    else:
        q, k, v = (torch.randn(B, H, N, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
        leaves = (q, k, v)
    do = torch.randn(B, H, N, D, generator=g).to(DEVICE, dtype)
    return q, k, v, do, leaves


def reference_with_grads(q, k, v, do, scale=None):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = ka.reference(q, k, v, scale)
    return (o,) + torch.autograd.grad(o, (q, k, v), do.double())


def assert_close(name, got, ref, dtype):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected the input dtype {dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got = got.detach().double().cpu()
    ref = ref.detach().cpu()
    assert torch.isfinite(got).all(), f"{name}: {(~torch.isfinite(got)).sum().item()} non-finite (unwritten?) elements"
    err = (got - ref).abs().max().item()
    bound = TOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


CASES = [  # dtype, (B, H, N, D): head dims 32 / 64 / 80 / 128; lengths 1, 7, 150, 197, 256 (full blocks only)
    (torch.float32, (1, 2, 1, 32)),
    (torch.float32, (2, 1, 7, 80)),
    (torch.float32, (1, 2, 150, 64)),
    (torch.float32, (1, 1, 197, 128)),
    (torch.float32, (1, 1, 256, 64)),
    (torch.float16, (2, 1, 7, 128)),
    (torch.float16, (1, 2, 197, 32)),
    (torch.float16, (1, 1, 150, 80)),
    (torch.bfloat16, (1, 1, 1, 64)),
    (torch.bfloat16, (1, 2, 150, 128)),
    (torch.bfloat16, (1, 1, 197, 80)),
]
if DEVICE == "cuda":  # on a GPU (bench_gpu.sh) also the sequences training runs, 256 and 1369, in bf16 and fp16
    CASES += [(dt, (2, 3, n, d)) for dt in (torch.bfloat16, torch.float16) for n in (256, 1369) for d in (64, 80, 128)]


@pytest.mark.parametrize("dtype,shape", CASES, ids=[f"{str(d)[6:]}-{'x'.join(map(str, s))}" for d, s in CASES])
def test_forward_and_grads_match_float64(dtype, shape):
    q, k, v, do, _ = make_inputs(*shape, dtype)
    o = ka.attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    ref = reference_with_grads(q, k, v, do)
    for name, got, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), ref):
        assert_close(name, got, r, dtype)


def test_model_layout_custom_scale_and_stride0_grad():
    """q, k, v as strided views of the fused qkv projection, a non-default scale, and the expanded (stride-0)
    upstream gradient that o.sum().backward() produces."""
    q, k, v, _, (qkv,) = make_inputs(2, 3, 150, 64, torch.float32, layout="qkv")
    assert not q.is_contiguous()
    o = ka.attention(q, k, v, scale=0.3)
    o.sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = ka.reference(q64, k64, v64, 0.3)
    o64.sum().backward()
    g64 = torch.stack([q64.grad, k64.grad, v64.grad]).permute(1, 3, 0, 2, 4)  # back to (B, N, 3, H, D)
    assert_close("o", o, o64, torch.float32)
    assert_close("dqkv", qkv.grad, g64, torch.float32)


def test_backward_is_deterministic():
    """No atomics: two backward passes give bitwise identical gradients."""
    q, k, v, do, _ = make_inputs(1, 2, 197, 64, torch.float16, seed=1)
    runs = [torch.autograd.grad(ka.attention(q, k, v), (q, k, v), do) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_poison_fills_buffers_with_nan():
    """The check above is live: with POISON, buffers start as NaN (an unwritten element cannot pass for 0)."""
    buf = ka._new_bnhd(1, 2, 3, 4, torch.float16, DEVICE)
    assert buf.shape == (1, 2, 3, 4) and torch.isnan(buf).all()


def test_rejects_bad_inputs():
    x = torch.randn(1, 1, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 128"):
        ka.attention(*(torch.randn(1, 1, 4, 160, device=DEVICE),) * 3)
    with pytest.raises(ValueError, match="one shape"):
        ka.attention(x, x, torch.randn(1, 1, 5, 32, device=DEVICE))
    with pytest.raises(ValueError, match="fp16 / bf16 / fp32"):
        ka.attention(x, x, x.double())


def xray_batch(size):
    """A real chest X-ray from the bundled sample, resized to size x size, as a (1, 3, size, size) batch (one
    image: the interpreter's cost grows with batch * heads programs)."""
    from PIL import Image
    paths = sorted((SAMPLE / "nih14" / "images").glob("*.jpg"))[:1]
    imgs = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR), np.float32) / 255.0
            for p in paths]
    x = (torch.from_numpy(np.stack(imgs)) - 0.5) / 0.25
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def test_vit_and_predictor_match_sdpa():
    """A ViT-Tiny (head dim 64) and a predictor (head dim 32) run forward and backward with the Triton kernels
    and give the same outputs and parameter gradients as with PyTorch SDPA, on real images."""
    torch.manual_seed(0)
    enc = model.build_vit("vit_tiny", img_size=56, patch_size=14)  # 4 x 4 = 16 patches
    pred = model.Predictor(enc.grid, embed_dim=192, pred_dim=96, depth=2, num_heads=3)
    x = xray_batch(56)
    ctx_idx = torch.tensor([[0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 13]])  # 11 context patches, 2 target blocks
    tgt_idx = [torch.tensor([[3, 7, 15]]), torch.tensor([[12, 14, 15]])]
    results = {}
    for impl in ("sdpa", "triton"):
        e, p = copy.deepcopy(enc).to(DEVICE), copy.deepcopy(pred).to(DEVICE)
        model.set_attn(e, impl)
        model.set_attn(p, impl)
        ctx = e(x.to(DEVICE), masks=[ctx_idx.to(DEVICE)])
        out = p(ctx, [ctx_idx.to(DEVICE)], [t.to(DEVICE) for t in tgt_idx])
        target = torch.linspace(-1, 1, out.numel(), device=DEVICE).reshape(out.shape)
        ((out - target) ** 2).sum().backward()  # sum, not mean: gradients well above fp32 noise
        results[impl] = (out.detach().cpu(), {n: q.grad.cpu() for m in (e, p) for n, q in m.named_parameters()
                                              if q.grad is not None})
    (out_s, g_s), (out_t, g_t) = results["sdpa"], results["triton"]
    assert out_t.shape == (2, 3, 192)
    assert g_t.keys() == g_s.keys() and any(".attn.qkv." in n for n in g_t)
    # fp32 both ways, only the summation order differs: measured <= 6e-7 of each tensor's range. The fused qkv
    # gradients are compared per q / k / v part: the k part is far smaller than the v part (near-uniform attention
    # at init), so one range for all three would hide an error in dK. The k bias is left out: softmax ignores a
    # constant added to all of a row's scores, so its true gradient is exactly 0 and both paths give fp32 noise;
    # it is checked to be that, negligible next to the v bias's gradient
    pairs = [("output", out_t, out_s)]
    for n in g_s:
        if ".qkv." not in n:
            pairs.append((f"grad of {n}", g_t[n], g_s[n]))
            continue
        parts = list(zip("qkv", g_t[n].chunk(3), g_s[n].chunk(3)))
        if n.endswith("bias"):
            assert parts[1][1].abs().max() <= 1e-5 * parts[2][2].abs().max(), f"{n}: k part not ~0"
            del parts[1]
        pairs += [(f"grad of {n} {p}", a, b) for p, a, b in parts]
    for n, a, b in pairs:
        err, size = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= 2e-5 * size, f"{n}: max abs difference {err:.3g} (max |sdpa| {size:.3g})"


def test_bench_parses_shapes():
    import base
    from triton_attn import bench_attention
    assert bench_attention.parse_shapes("128x12x256x64,1X2X7X80") == [(128, 12, 256, 64), (1, 2, 7, 80)]
    for bad in ("128x12x256", "1x1x4x160", "0x1x4x64"):
        with pytest.raises(base.UserError):
            bench_attention.parse_shapes(bad)
