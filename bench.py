"""
Pretraining throughput, against the hardware's limit and against Meta's code: one full I-JEPA training step (target
forward, context encoder, predictor, loss, backward, AdamW, EMA) timed for a chosen model, predictor, resolution,
batch, attention, device and precision; and, with --data, the input pipeline (decode + crop + collate).

    python bench.py --model vit_tiny --pred_depth 6 --pred_dim 192 --img_size 224 --batch_size 8 --device cpu \\
        --dtype fp32 bf16 --repeats 3 --ijepa_dir /path/to/facebookresearch/ijepa      # side by side with Meta
    python bench.py --model vit_base --batch_size 128 --device cuda --attn triton sdpa     # compare attentions
    python bench.py --data /data/nih --cache_dir /fast/cache --data_workers 8 --steps 0   # the input pipeline only

Model: images are random and masks come from masks.py with the paper's settings, drawn before timing and shared by
every implementation, so all run the same work. For each --dtype (autocast; fp32 = none) it prints step time,
img/s, the step's FLOPs per image (counted by torch.utils.flop_counter on real steps over every timed mask draw, with
math attention so that attention counts too: matmuls, convolutions, forward and backward), the achieved FLOP/s and
the utilisation against a matmul peak measured in the same run for that dtype (nanoGPT's MFU, with the peak
measured here rather than taken from a datasheet). Every implementation is timed --repeats times, interleaved
(A B A B ...), and the median is reported: on a shared machine, neighbours' load then hits all of them alike.
OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless set): spinning ones swing timings under load.
With --ijepa_dir, Meta's official modules run the step as Meta's train.py does (their ViT, predictor,
apply_masks, AdamW param groups, per-parameter EMA loop): "as shipped" keeps their precision handling
(torch.cuda.amp.autocast: fp32 on a CPU whatever the flag), "autocast" wraps it in this run's autocast for the dtype.
Our model takes the grey image as 1 channel, theirs as 3 (<0.5% of the work).

Data (--data SOURCE...): the pretraining DataLoader (PretrainDataset + MaskCollator, pretrain.py's sampler) timed
over --data_batches batches after one warm-up batch, uncached (decoding the files) and, with --cache_dir (a cache
from prepare.py), cached; with 0 workers (one core, the per-core figure) and with --data_workers.

The last line is `data img/s: X` with --data (the cached figure when --cache_dir is given), else
`pretrain img/s: X` for this project's code (first --attn, first --dtype).
"""
import argparse
import copy
import importlib
import os
import statistics
import sys
import time
from contextlib import nullcontext

# OpenMP threads sleep when idle instead of spinning (before torch loads it): on a shared machine spinning threads
# made 2-thread steps swing 4x under a neighbour's load; the header line says which policy ran
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn.functional as F

import base
import data
import imagecache
import masks as masks_lib
import pretrain
from model import VIT_CONFIGS, count_params, default_attention


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, batches, device, warmup, steps):
    for i in range(warmup):
        step_fn(*batches[i % len(batches)])
    sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step_fn(*batches[i % len(batches)])
    sync(device)
    return (time.perf_counter() - t) / steps


def matmul_peak(device, dtype, n=None, reps=5):
    """FLOP/s of a large square matmul in `dtype` on `device` now: the practical peak MFU is measured against."""
    n = n or (8192 if device.type == "cuda" else 1536)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def step_flops(step_fn, batches):
    """FLOPs of one training step (forward + backward), the mean over `batches`, as torch's FlopCounterMode counts
    them. It sees matmuls, so `step_fn` runs attention as math: it counts 0 in CPU flash attention and Triton."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        for b in batches:
            step_fn(*b)
    return counter.get_total_flops() / len(batches)


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
                            predictor_embed_dim=args.pred_dim, depth=args.pred_depth,
                            num_heads=enc.num_heads).to(device)
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


def paper_masks(args):
    """masks.py's collator with the paper's settings (min_keep 10, lowered on grids too small to keep it)."""
    grid = (args.img_size // args.patch_size,) * 2
    return masks_lib.MaskCollator(grid=grid, min_keep=min(10, grid[0] * grid[1] // 8 - 1))


def bench_model(args, device):
    torch.manual_seed(0)
    collator = paper_masks(args)
    batches = []
    for s in range(4):  # a few different mask draws, so lengths vary as they do in training
        me, mp = collator.sample(args.batch_size, s)
        imgs = torch.randn(args.batch_size, 1, args.img_size, args.img_size, device=device)
        batches.append((imgs, [m.to(device) for m in me], [m.to(device) for m in mp]))
    results = {}  # (name, dtype) -> dict
    # the same work at every precision and attention: counted once per code base, fp32, math attention
    plain = argparse.Namespace(**{**vars(args), "compile": False})
    flops = {"radjepa": step_flops(ours(plain, "math", device, nullcontext)[0], batches) / args.batch_size}
    if args.ijepa_dir:
        flops["ijepa"] = step_flops(ijepa(args, device, nullcontext)[0], batches) / args.batch_size
    for dname in args.dtype:
        dtype = base.DTYPES[dname]

        def autocast(dtype=dtype):
            return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        attns = args.attn or [default_attention(device, dtype)]
        impls = [(f"radjepa/{a}", lambda a=a: ours(args, a, device, autocast)) for a in attns]
        if args.ijepa_dir:
            # Meta's train.py uses torch.cuda.amp.autocast: on CUDA that is this dtype; on a CPU it does nothing,
            # so their code as shipped runs fp32 there (timed in the fp32 round) and "autocast" is ours around it
            shipped = device.type == "cuda" or dtype == torch.float32
            impls.append((f"ijepa ({'as shipped' if shipped else 'autocast'})", lambda: ijepa(args, device, autocast)))
        built = [(name, *make()) for name, make in impls]
        peak = matmul_peak(device, dtype)
        times, mem = {name: [] for name, *_ in built}, {}
        for r in range(args.repeats):  # interleaved, so slow phases of a shared machine hit every implementation
            for name, step, _, _ in built:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[name].append(time_steps(step, batches, device, args.warmup if r == 0 else 1, args.steps))
                if device.type == "cuda":
                    mem[name] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        peak = max(peak, matmul_peak(device, dtype))
        for name, *_ in built:
            f, dt = flops[name.split("/")[0].split()[0]], statistics.median(times[name])
            results[(name, dname)] = dict(ms=dt * 1e3, img_s=args.batch_size / dt, spread=(min(times[name]) * 1e3,
                                          max(times[name]) * 1e3), flops=f, peak=peak,
                                          mfu=f * args.batch_size / dt / peak, mem=mem.get(name), times=times[name])
        del built
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ctx, tgt = batches[0][1][0].shape[1], batches[0][2][0].shape[1]
    print(f"{args.model}/{args.patch_size} @ {args.img_size}px, predictor {args.pred_depth}x{args.pred_dim}, "
          f"batch {args.batch_size}, {device}, threads {torch.get_num_threads()} (OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY')}), context ~{ctx} / target {tgt} patches x {len(batches[0][2])}; "
          f"median of {args.repeats} interleaved runs of {args.steps} steps over {len(batches)} mask draws; "
          "FLOPs: the mean over the draws (attention included)")
    print(f"| {'implementation':<20} | dtype | {'step ms':>9} | {'min-max ms':>15} | {'img/s':>8} | "
          f"{'GFLOP/img':>9} | {'TFLOP/s':>8} | {'peak TFLOP/s':>12} | {'MFU':>6} | peak GiB |")
    print(f"|{'-' * 22}|-------|{'-' * 11}|{'-' * 17}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 14}|{'-' * 8}|"
          f"{'-' * 10}|")
    for (name, dname), r in results.items():
        print(f"| {name:<20} | {dname:<5} | {r['ms']:>9.1f} | {r['spread'][0]:>7.0f}-{r['spread'][1]:<7.0f} | "
              f"{r['img_s']:>8.2f} | {r['flops'] / 1e9:>9.2f} | {r['flops'] * r['img_s'] / 1e12:>8.4f} | "
              f"{r['peak'] / 1e12:>12.4f} | {r['mfu']:>6.1%} | {'%.2f' % r['mem'] if r['mem'] else '-':>8} |")
    first = {d: next(r for (n, dn), r in results.items() if dn == d and n.startswith("radjepa")) for d in args.dtype}
    if args.ijepa_dir:
        for (name, dname), b in results.items():
            if name.startswith("ijepa"):
                a = first[dname]  # the median of the rounds' ratios: a round's load hits both sides alike
                ratio = statistics.median(tb / ta for ta, tb in zip(a["times"], b["times"]))
                print(f"speed-up over Meta's I-JEPA at {dname} ({name[7:-1]}): {ratio:.2f}x, median of the rounds' "
                      f"ratios (MFU {a['mfu']:.1%} vs {b['mfu']:.1%})")
        ours_best = max(r["img_s"] for (n, _), r in results.items() if n.startswith("radjepa"))
        meta_best = max(r["img_s"] for (n, _), r in results.items() if n.startswith("ijepa"))
        print(f"speed-up, each side at its best precision here: {ours_best / meta_best:.2f}x")
    return first[args.dtype[0]]


# ----------------------------------------------------------------------------------------------------------------
# the input pipeline

def bench_data(args):
    """img/s of the pretraining DataLoader (decode or cache read, random resized crop, normalise, masks, collate)."""
    sources = data.parse_sources(args.data)
    paths = data.concat_paths(sources)
    collator = paper_masks(args)
    sampler = data.MixSampler(sources, seed=0)
    bs, n_batches = args.data_batch_size, args.data_batches
    kinds = [("uncached", None)]
    if args.cache_dir:
        side = imagecache.min_stored_side(args.img_size)
        kinds.append(("cached", imagecache.open_cache(args.cache_dir, paths, side)))
    rows = []
    for kind, cache in kinds:
        ds = data.PretrainDataset(paths, args.img_size, cache=cache)
        for workers in sorted({0, args.data_workers}):
            steps = pretrain.StepBatches(sampler, bs, max(1, len(sampler) // bs), 0, n_batches + 1)
            loader = torch.utils.data.DataLoader(ds, batch_sampler=steps, collate_fn=collator, num_workers=workers)
            it = iter(loader)
            next(it)  # warm-up: worker start-up, first file opens
            t = time.perf_counter()
            n = sum(len(b[0]) for b in it)
            dt = time.perf_counter() - t
            rows.append((kind, workers, n / dt, n / dt / max(1, workers)))
    print(f"data: {len(paths)} images, {args.img_size} px crops, batch {bs}, {n_batches} timed batches after one "
          f"warm-up" + (f"; cache {args.cache_dir}: short side {kinds[-1][1].side} px, {kinds[-1][1].format}"
                        if args.cache_dir else ""))
    print("| path     | workers | img/s    | img/s per core |")
    print("|----------|---------|----------|----------------|")
    for kind, w, ips, per in rows:
        print(f"| {kind:<8} | {w:>7} | {ips:>8.1f} | {per:>14.1f} |")
    return next(ips for kind, w, ips, _ in rows if kind == kinds[-1][0] and w == args.data_workers)


def get_args(argv=None):
    p = base.ArgumentParser(__doc__)
    p.add_argument("--model", default="vit_base")
    p.add_argument("--pred_depth", type=int, default=12)
    p.add_argument("--pred_dim", type=int, default=384)
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--patch_size", type=int, default=14)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--init", default="meta", choices=["meta", "rescaled"])
    p.add_argument("--attn", nargs="+", default=None, help="one or more of triton sdpa math (default: model."
                   "default_attention: triton on CUDA if its self-check passes; on a CPU sdpa in fp32, math in bf16)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", nargs="+", default=None, choices=list(base.DTYPES),
                   help="one or more autocast dtypes (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (0: no model benchmark)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per implementation (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--ijepa_dir", default=None, help="a checkout of facebookresearch/ijepa to benchmark beside ours")
    p.add_argument("--data", nargs="+", default=None, metavar="SOURCE", help="also time the input pipeline on these")
    p.add_argument("--cache_dir", default=None, help="a cache prepare.py built from --data: time the cached path too")
    p.add_argument("--data_workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers")
    p.add_argument("--data_batch_size", type=int, default=32)
    p.add_argument("--data_batches", type=int, default=8, help="timed batches per data configuration")
    args = base.check(p.parse_args(argv), "pred_depth >= 1", "pred_dim >= 1", "img_size >= 1", "img_size <= 4096",
                      "patch_size >= 1", "batch_size >= 1", "steps >= 0", "warmup >= 0", "repeats >= 1",
                      "threads >= 1", "data_workers >= 0", "data_batch_size >= 1", "data_batches >= 1",
                      models=VIT_CONFIGS)
    if args.img_size % args.patch_size:
        raise base.UserError(f"--img_size {args.img_size} is not a multiple of --patch_size {args.patch_size}")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"])
    first = bench_model(args, device) if args.steps > 0 else None
    if args.data:
        print(f"data img/s: {bench_data(args):.1f}")
    elif first:
        print(f"pretrain img/s: {first['img_s']:.2f}")


if __name__ == "__main__":
    base.run(main)
