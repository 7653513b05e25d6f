"""
Pretraining throughput: one full I-JEPA training step (target forward, context encoder, predictor, loss, backward,
AdamW, EMA) timed on synthetic images, for a chosen model, predictor, resolution, batch, attention and device.

    python bench.py --model vit_tiny --pred_depth 6 --pred_dim 192 --img_size 224 --batch_size 8 --device cpu
    python bench.py --model vit_base --batch_size 128 --device cuda --attn triton sdpa     # compare attentions
    python bench.py ... --ijepa_dir /path/to/facebookresearch/ijepa                       # + the official code

Images are random (this measures the model, not decoding: use --cache_dir in pretrain.py so decoding never
limits the GPU); masks come from masks.py with the paper's settings, drawn before timing and shared by every
implementation so all run the same amount of work. With --ijepa_dir the official I-JEPA modules run the same
step as Meta's train.py does it (their ViT, predictor, apply_masks, AdamW param groups, per-parameter EMA loop) at
equal settings; our model takes the grayscale image as 1 channel, theirs as 3 (the stem is <0.5% of the work).
The last line is `pretrain img/s: X` for this project's code (the first --attn given).
"""
import argparse
import importlib
import os
import sys
import time

import torch
import torch.nn.functional as F

import masks as masks_lib
import pretrain
from model import count_params


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, batches, device, warmup, steps):
    for i in range(warmup):
        step_fn(*batches[i % len(batches)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for i in range(steps):
        step_fn(*batches[i % len(batches)])
    sync(device)
    return (time.perf_counter() - t) / steps


def ours(args, attn, device, autocast):
    a = argparse.Namespace(**vars(args))
    a.attn = attn
    jepa, target = pretrain.build(a, device)
    opt = pretrain.make_optimizer(jepa)
    pretrain.set_hparams(opt, 1e-4, 0.04)
    model = torch.compile(jepa) if args.compile else jepa

    def step(imgs, me, mp):
        with autocast():
            loss, _ = pretrain.jepa_loss(model, target, imgs, me, mp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pretrain.ema_update(target, jepa.encoder, 0.996)
    return step, count_params(jepa.encoder), count_params(jepa.predictor)


def ijepa(args, device, autocast):
    """Meta's modules and their train.py step, unchanged in substance (fetched repo on sys.path)."""
    sys.path.insert(0, os.path.abspath(args.ijepa_dir))
    vt = importlib.import_module("src.models.vision_transformer")
    from src.masks.utils import apply_masks
    from src.utils.tensors import repeat_interleave_batch
    enc = vt.__dict__[args.model](img_size=[args.img_size], patch_size=args.patch_size).to(device)
    pred = vt.vit_predictor(num_patches=enc.patch_embed.num_patches, embed_dim=enc.embed_dim,
                            predictor_embed_dim=args.pred_dim, depth=args.pred_depth, num_heads=enc.num_heads).to(device)
    import copy
    tgt = copy.deepcopy(enc)
    for p in tgt.parameters():
        p.requires_grad = False
    groups = [
        {"params": [p for n, p in enc.named_parameters() if "bias" not in n and len(p.shape) != 1]},
        {"params": [p for n, p in pred.named_parameters() if "bias" not in n and len(p.shape) != 1]},
        {"params": [p for n, p in enc.named_parameters() if "bias" in n or len(p.shape) == 1], "weight_decay": 0},
        {"params": [p for n, p in pred.named_parameters() if "bias" in n or len(p.shape) == 1], "weight_decay": 0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.04)

    def step(imgs, me, mp):
        imgs = imgs.expand(-1, 3, -1, -1)
        with autocast():
            with torch.no_grad():
                h = tgt(imgs)
                h = F.layer_norm(h, (h.size(-1),))
                B = len(h)
                h = apply_masks(h, mp)
                h = repeat_interleave_batch(h, B, repeat=len(me))
            z = pred(enc(imgs, me), me, mp)
            loss = F.smooth_l1_loss(z, h)
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            m = 0.996
            for q, k in zip(enc.parameters(), tgt.parameters()):
                k.data.mul_(m).add_((1. - m) * q.detach().data)
    return step, count_params(enc), count_params(pred)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base")
    p.add_argument("--pred_depth", type=int, default=12)
    p.add_argument("--pred_dim", type=int, default=384)
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--patch_size", type=int, default=14)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--attn", nargs="+", default=None, help="one or more of triton sdpa math (default: triton on "
                                                            "CUDA, sdpa elsewhere)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--ijepa_dir", default=None, help="a checkout of facebookresearch/ijepa to benchmark beside ours")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    attns = args.attn or (["triton"] if device.type == "cuda" else ["sdpa"])

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    torch.manual_seed(0)
    grid = (args.img_size // args.patch_size,) * 2
    collator = masks_lib.MaskCollator(grid=grid, min_keep=min(10, grid[0] * grid[1] // 8))
    batches = []
    for s in range(4):  # a few different mask draws, so lengths vary as they do in training
        me, mp = collator.sample(args.batch_size, s)
        imgs = torch.randn(args.batch_size, 1, args.img_size, args.img_size, device=device)
        batches.append((imgs, [m.to(device) for m in me], [m.to(device) for m in mp]))

    rows = []
    impls = [(f"radjepa/{a}", lambda a=a: ours(args, a, device, autocast)) for a in attns]
    if args.ijepa_dir:
        impls.append(("ijepa (official)", lambda: ijepa(args, device, autocast)))
    for name, make in impls:
        step, n_enc, n_pred = make()
        dt = time_steps(step, batches, device, args.warmup, args.steps)
        rows.append((name, dt * 1e3, args.batch_size / dt, pretrain.memory_mb(device), n_enc / 1e6, n_pred / 1e6))
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ctx, tgt = batches[0][1][0].shape[1], batches[0][2][0].shape[1]
    print(f"{args.model}/{args.patch_size} @ {args.img_size}px, predictor {args.pred_depth}x{args.pred_dim}, "
          f"batch {args.batch_size}, {device} {str(dtype).replace('torch.', '')}, threads {torch.get_num_threads()}, "
          f"context ~{ctx} / target {tgt} patches x {len(batches[0][2])}")
    mem = "peak GPU MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"| {'implementation':<18} | {'step ms':>9} | {'img/s':>9} | {mem:>12} | {'enc M':>6} | {'pred M':>6} |")
    print(f"|{'-' * 20}|{'-' * 11}|{'-' * 11}|{'-' * 14}|{'-' * 8}|{'-' * 8}|")
    for r in rows:
        print(f"| {r[0]:<18} | {r[1]:>9.1f} | {r[2]:>9.1f} | {r[3]:>12.0f} | {r[4]:>6.1f} | {r[5]:>6.1f} |")
    if args.ijepa_dir:
        print(f"speed-up over official I-JEPA: {rows[0][2] / rows[-1][2]:.2f}x")
    print(f"pretrain img/s: {rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
