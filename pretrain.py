"""
RadJEPa pretraining: I-JEPA latent prediction on chest X-rays.

    python pretrain.py                                   # demo: small ViT on the bundled X-rays, CPU, minutes
    torchrun --nproc_per_node 8 pretrain.py --data_dir /data/mimic /data/chexpert:2 --cache_dir /fast/cache
    python pretrain.py --data_dir ARCHIVE --resume       # continue a killed run exactly where it stopped

Per image, one large context block and 4 target blocks of patches are drawn (masks.py). The context encoder sees
only the context patches; the predictor, a narrow transformer, predicts the target encoder's layer-normed
features at the target positions; the loss is smooth-L1 (or L2) in latent space; the target encoder is an EMA of
the context encoder. No pixels are reconstructed, no negatives, no view augmentations: just a random resized crop.

Without --data_dir the "demo" preset runs (vit_tiny at 112 px on sample_data/); with it the "paper" preset
(ViT-B/14 at 224 px, Meta's I-JEPA recipe). Any flag given explicitly overrides the preset.

Writes to --out_dir (default out/pretrain): log.jsonl (one line per step), checkpoint.pt (full training state,
atomic, for --resume), encoder.safetensors (the target encoder alone, for probe.py / segment.py / report.py),
masks.png (what the masking looks like on your data).
"""
import argparse
import copy
import math
import os
import resource
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import masks as masks_lib
from common import UserError
from encoders import save_encoder
from model import VIT_CONFIGS, Predictor, apply_masks, build_vit, init_weights, repeat_interleave_batch
from probe import DEMO_CSV, quick_probe

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "sample_data")

# Flags whose default depends on the preset; every one can still be given explicitly.
PRESETS = {
    "paper": dict(model="vit_base", img_size=224, batch_size=128, epochs=300, warmup=40, lr=1e-3, start_lr=2e-4,
                  final_lr=1e-6, pred_depth=12, pred_dim=384, min_keep=10, log_every=10, ckpt_every=1000),
    # demo: the recipe that beat a same-architecture random encoder per CPU-minute (docs/ablations.md): the
    # paper's lr 1e-3 is for batch 2048; at batch 16 it destroys the random features faster than it builds new ones
    "demo": dict(model="vit_tiny", img_size=112, batch_size=16, epochs=12, warmup=1, lr=2.5e-4, start_lr=2.5e-5,
                 final_lr=1e-6, pred_depth=4, pred_dim=96, min_keep=4, log_every=1, ckpt_every=50),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", nargs="+", default=None, metavar="SOURCE",
                   help="image folders or CSV files (column `path`, optional `view`), each optionally PATH:WEIGHT "
                        "to set its share of every epoch (default: the bundled sample_data)")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="defaults for the flags below (default: demo without --data_dir, paper with it)")
    p.add_argument("--frontal_ratio", type=float, default=None,
                   help="resample so frontal:lateral is this ratio where CSV sources give a view column (paper: 3)")
    p.add_argument("--cache_dir", default=None, help="decode every image once into a uint8 memory-mapped cache here")
    p.add_argument("--cache_size", type=int, default=256, help="side length of cached images")
    p.add_argument("--verify", action="store_true",
                   help="open every file's header before training and drop unreadable ones up front")
    p.add_argument("--crop_scale", type=float, nargs=2, default=(0.3, 1.0), help="random resized crop area range")
    p.add_argument("--pred_depth", type=int, default=None, help="predictor depth (paper: 12)")
    p.add_argument("--pred_dim", type=int, default=None, help="predictor width (paper: 384)")
    p.add_argument("--loss", choices=["smooth_l1", "l2"], default="smooth_l1")
    p.add_argument("--warmup", type=float, default=None, help="warm-up epochs (linear start_lr -> lr)")
    p.add_argument("--start_lr", type=float, default=None)
    p.add_argument("--final_lr", type=float, default=None)
    p.add_argument("--weight_decay", type=float, nargs=2, default=(0.04, 0.4), help="cosine schedule start end")
    p.add_argument("--ema", type=float, nargs=2, default=(0.996, 1.0), help="EMA momentum, linear start end")
    p.add_argument("--ipe_scale", type=float, default=1.0,
                   help="stretch the schedules by this factor (I-JEPA used 1.25 for some runs)")
    p.add_argument("--grad_clip", type=float, default=0.0, help="clip the gradient norm (0: off, as in I-JEPA)")
    p.add_argument("--log_every", type=int, default=None)
    p.add_argument("--ckpt_every", type=int, default=None, help="steps between checkpoints (and at each epoch end)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (GPU)")
    p.add_argument("--dump_rank_state", action="store_true",
                   help="each process writes out_dir/rank<N>.json (weight checksums, images and masks it saw) at "
                        "the end: for checking a distributed set-up")
    p.add_argument("--init", choices=["meta", "rescaled"], default="meta",
                   help="weight init: Meta I-JEPA's (meta), or with the per-layer residual rescale (rescaled)")
    p.add_argument("--probe_every", type=int, default=0,
                   help="every N steps (and at steps 0 and the last) a quick linear probe of the target encoder "
                        "(probe.quick_probe): its AUROC is logged as probe_auroc (0: off)")
    p.add_argument("--probe_csv", default=DEMO_CSV,
                   help="labelled images for --probe_every: columns path, pneumonia (0/1), patient "
                        "(default: the bundled Kermany sample)")
    masks_lib.add_mask_args(p)
    p.set_defaults(min_keep=None)  # from the preset: a 112 px demo grid (8x8) cannot keep I-JEPA's 10 patches
    common.add_common_args(p, "pretrain", batch_size=None, epochs=None, lr=None, model=None, img_size=None)
    args = p.parse_args(argv)
    args.preset = args.preset or ("paper" if args.data_dir else "demo")
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.data_dir is None:
        args.data_dir = [os.path.join(SAMPLE, d) for d in ("nih14", "kermany", "reports")]
    if args.model not in VIT_CONFIGS:
        raise UserError(f"--model {args.model}: choose from {', '.join(VIT_CONFIGS)}")
    heads = VIT_CONFIGS[args.model][2]
    if args.pred_dim % heads or (args.pred_dim // heads) % 2:
        raise UserError(f"--pred_dim {args.pred_dim} must split into {heads} heads of even width ({args.model} has "
                        f"{heads} heads; the predictor uses as many)")
    if args.img_size % args.patch_size:
        raise UserError(f"--img_size {args.img_size} is not a multiple of --patch_size {args.patch_size}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# the JEPA objective: shared with bench.py, so the benchmark measures exactly this code

class JEPA(nn.Module):
    """Context encoder + predictor as one module, so DDP wraps (and all-reduces) both with one hook set."""

    def __init__(self, encoder, predictor):
        super().__init__()
        self.encoder, self.predictor = encoder, predictor

    def forward(self, imgs, masks_enc, masks_pred):
        return self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)


def build(args, device):
    encoder = build_vit(args.model, img_size=args.img_size, patch_size=args.patch_size, attn=args.attn)
    predictor = Predictor(encoder.grid, encoder.embed_dim, args.pred_dim, args.pred_depth, encoder.num_heads,
                          attn=args.attn)
    init_weights(encoder, getattr(args, "init", "meta"))
    init_weights(predictor, getattr(args, "init", "meta"))
    target = copy.deepcopy(encoder).requires_grad_(False)
    return JEPA(encoder, predictor).to(device), target.to(device)


@torch.no_grad()
def targets(target_encoder, imgs, masks_enc, masks_pred):
    """Layer-normed target features at the target patches, laid out like the predictor's output. Also returns the
    std across the batch of the per-image mean target feature: near 0 means the representation has collapsed."""
    h = target_encoder(imgs)
    h = F.layer_norm(h, (h.size(-1),))
    std = h.float().mean(1).std(0).mean()
    h = apply_masks(h, masks_pred)
    return repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc)), std


def jepa_loss(jepa, target_encoder, imgs, masks_enc, masks_pred, loss="smooth_l1"):
    h, std = targets(target_encoder, imgs, masks_enc, masks_pred)
    z = jepa(imgs, masks_enc, masks_pred)
    fn = F.smooth_l1_loss if loss == "smooth_l1" else F.mse_loss
    return fn(z.float(), h.float()), std


def make_optimizer(jepa):
    """AdamW; biases and 1-D parameters (norms) get no weight decay (group 1 is excluded from the wd schedule)."""
    decay, no_decay = [], []
    for n, p in jepa.named_parameters():
        if p.requires_grad:
            (no_decay if n.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "wd_exclude": True}],
                             lr=0.0, foreach=True)


def schedule(step, total, warmup, args):
    """lr (linear warm-up, then cosine to final_lr), weight decay (cosine up) and EMA momentum (linear) at `step`.
    Pure functions of the step: a resumed run picks them up exactly, with no scheduler state to restore."""
    total = max(1, int(total * args.ipe_scale))
    if step < warmup:
        lr = args.start_lr + (args.lr - args.start_lr) * step / max(1, warmup)
    else:
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        lr = args.final_lr + (args.lr - args.final_lr) * 0.5 * (1 + math.cos(math.pi * t))
    t = min(1.0, step / total)
    wd0, wd1 = args.weight_decay
    wd = wd1 + (wd0 - wd1) * 0.5 * (1 + math.cos(math.pi * t))
    m0, m1 = args.ema
    return lr, wd, m0 + (m1 - m0) * t


def set_hparams(opt, lr, wd):
    for g in opt.param_groups:
        g["lr"] = lr
        if not g.get("wd_exclude"):
            g["weight_decay"] = wd


@torch.no_grad()
def ema_update(target, encoder, m):
    """target <- m * target + (1 - m) * encoder, one fused call over all parameters."""
    tp = [p for p in target.parameters()]
    ep = [p.detach() for p in encoder.parameters()]
    torch._foreach_lerp_(tp, ep, 1.0 - m)


# ----------------------------------------------------------------------------------------------------------------
# data

class StepBatches:
    """Batch sampler yielding, for each step of one epoch, this rank's [(index, global_step), ...]. Passing the step
    with each index lets the dataset seed its crop and the collator its masks by step: a resumed run sees the same
    pixels and masks as an uninterrupted one, whatever the number of DataLoader workers."""

    def __init__(self, indices, batch_size, first_step, start_in_epoch=0):
        self.indices, self.bs, self.first_step, self.start = indices, batch_size, first_step, start_in_epoch

    def __len__(self):
        return len(self.indices) // self.bs - self.start

    def __iter__(self):
        for s in range(self.start, len(self.indices) // self.bs):
            yield [(int(i), self.first_step + s) for i in self.indices[s * self.bs:(s + 1) * self.bs]]


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    env = common.setup(args)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")

    # data: find and check everything before any model is built, so a bad path fails in seconds
    sources = data.parse_sources(args.data_dir)
    paths = data.concat_paths(sources)
    cache = None
    if args.cache_dir:  # rank 0 decodes once; the others wait, then open the same memory-mapped file
        if env.is_main:
            data.build_cache(paths, args.cache_dir, args.cache_size)
        env.barrier()
        cache = data.build_cache(paths, args.cache_dir, args.cache_size, progress=False)
    dataset = data.PretrainDataset(paths, args.img_size, crop_scale=tuple(args.crop_scale), cache=cache,
                                   seed=args.seed, verify=args.verify)
    sampler = data.MixSampler(sources, rank=env.rank, world=env.world, seed=args.seed, frontal_ratio=args.frontal_ratio)
    ipe = len(sampler) // args.batch_size
    if ipe == 0:
        raise UserError(f"{len(sampler)} images per process is less than one batch of {args.batch_size}: "
                        f"lower --batch_size or add images")
    total = args.max_steps or args.epochs * ipe
    warmup = int(args.warmup * ipe)
    collator = masks_lib.MaskCollator.from_args(args, (args.img_size // args.patch_size,) * 2, env.rank)
    env.print(f"{len(paths)} images from " + ", ".join(f"{s.name} ({len(s)}, weight {s.weight:g})" for s in sources)
              + (f"; {len(dataset.skipped)} unreadable, skipped" if dataset.skipped else ""))
    env.print(f"{args.preset} preset: {args.model}/{args.patch_size} at {args.img_size} px, "
              f"predictor {args.pred_depth}x{args.pred_dim}, batch {args.batch_size} x {env.world} process(es), "
              f"{ipe} steps/epoch, {total} steps, {env.device} {str(env.dtype).replace('torch.', '')}, attn {args.attn}")

    torch.manual_seed(args.seed)  # the same initial weights on every rank: the EMA target is not synced by DDP
    jepa, target = build(args, env.device)
    opt = make_optimizer(jepa)
    step = 0
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run")
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{ckpt_path} is unreadable ({e}); delete it or point --out_dir elsewhere")
        for k in ("model", "img_size", "patch_size", "pred_depth", "pred_dim", "batch_size", "seed"):
            if ck["args"].get(k) != getattr(args, k):
                raise UserError(f"--resume: checkpoint has {k}={ck['args'].get(k)} but this run has {getattr(args, k)}")
        jepa.encoder.load_state_dict(ck["encoder"])
        jepa.predictor.load_state_dict(ck["predictor"])
        target.load_state_dict(ck["target_encoder"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
        if ck["world"] != env.world:
            env.print(f"warning: checkpoint was written by {ck['world']} processes, this run has {env.world}: "
                      "training continues, but the data order differs from an uninterrupted run")
        torch.set_rng_state(ck["rng"]["torch"])
        env.print(f"resumed from {ckpt_path} at step {step}")
    log = common.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"), env.is_main,
                             truncate_after_step=step if args.resume else None)
    model = jepa
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(jepa, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                                    static_graph=True)
    target_fwd = target  # the compiled wrapper only runs forwards; checkpoints and EMA use the plain modules
    if args.compile:
        model, target_fwd = torch.compile(model), torch.compile(target)

    if env.is_main and step == 0:  # show the user what the masking does on their own images
        imgs = torch.stack([dataset[(i, 0)][0] for i in range(min(4, len(dataset)))])
        me, mp = collator.sample(len(imgs), 0)
        masks_lib.save_mask_preview(imgs, me, mp, collator.grid, os.path.join(args.out_dir, "masks.png"))

    def save(step):
        if not env.is_main:
            return
        common.atomic_save({"encoder": jepa.encoder.state_dict(), "predictor": jepa.predictor.state_dict(),
                            "target_encoder": target.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
                            "world": env.world, "rng": {"torch": torch.get_rng_state()}}, ckpt_path)
        save_encoder(target, os.path.join(args.out_dir, "encoder.safetensors"), step=step, model=args.model)

    def probe_now(step):  # --probe_every: is the target encoder getting better than it started? (not timed)
        if not (env.is_main and args.probe_every and (step % args.probe_every == 0 or step == total)):
            return {}
        took = common.Timer()
        auroc = quick_probe(target, args.probe_csv)
        timer.t += took.lap()  # leave the probe's seconds out of img_per_s
        return {"probe_auroc": auroc}

    timer = common.Timer()
    if step == 0 and args.probe_every:  # step 0: the same-architecture random encoder, the floor to beat
        log.log(step=0, **probe_now(0))
    bar = tqdm(total=total, initial=step, disable=not env.is_main, dynamic_ncols=True, desc="pretrain")
    jepa.train()
    timer, last_good, last_log = common.Timer(), step, step
    seen, mask_sums = [], []
    while step < total:
        epoch, in_epoch = divmod(step, ipe)
        batches = StepBatches(sampler.epoch_indices(epoch), args.batch_size, epoch * ipe, in_epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collator,
                                             num_workers=args.num_workers, pin_memory=env.device.type == "cuda")
        for imgs, masks_enc, masks_pred in loader:
            if args.dump_rank_state:
                i = step - epoch * ipe
                seen += [int(j) for j in batches.indices[i * args.batch_size:(i + 1) * args.batch_size]]
                mask_sums.append(int(sum(m.sum() for m in masks_enc + masks_pred)))
            imgs = imgs.to(env.device, non_blocking=True)
            masks_enc = [m.to(env.device, non_blocking=True) for m in masks_enc]
            masks_pred = [m.to(env.device, non_blocking=True) for m in masks_pred]
            lr, wd, mom = schedule(step, total, warmup, args)
            set_hparams(opt, lr, wd)
            with env.autocast():
                loss, tstd = jepa_loss(model, target_fwd, imgs, masks_enc, masks_pred, args.loss)
            bad = torch.tensor(float(not torch.isfinite(loss)), device=env.device)
            if env.distributed:  # every rank must agree to stop, or the others hang in the next all-reduce
                torch.distributed.all_reduce(bad)
            if bad.item() > 0:
                raise UserError(f"loss became {loss.item()} at step {step}; the last good checkpoint is {ckpt_path} "
                                f"(step {last_good}). Lower --lr or check the data, then --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(jepa.parameters(), args.grad_clip)
            opt.step()
            ema_update(target, jepa.encoder, mom)
            step += 1
            bar.update(1)
            if step % args.log_every == 0 or step == total or (args.probe_every and step % args.probe_every == 0):
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                dt, last_log = timer.lap() / (step - last_log), step
                row = dict(step=step, epoch=epoch, loss=loss.item(), lr=lr, wd=wd, momentum=mom,
                           img_per_s=args.batch_size * env.world / dt, target_std=tstd.item(),
                           mem_mb=round(memory_mb(env.device)), ctx_len=masks_enc[0].shape[1], tgt_len=masks_pred[0].shape[1])
                row.update(probe_now(step))
                log.log(**row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.1e}", img_s=f"{row['img_per_s']:.0f}",
                                **({"probe_auroc": f"{row['probe_auroc']:.3f}"} if "probe_auroc" in row else {}))
            if step % args.ckpt_every == 0 or step % ipe == 0 or step == total:
                save(step)
                last_good = step
            if step >= total:
                break
    bar.close()
    if args.dump_rank_state:
        def checksum(m):
            return float(sum(p.double().sum() * (k + 1) for k, p in enumerate(m.parameters())))
        common.write_json({"rank": env.rank, "world": env.world, "seen": seen, "mask_checksums": mask_sums,
                           "encoder_checksum": checksum(jepa.encoder), "predictor_checksum": checksum(jepa.predictor),
                           "target_checksum": checksum(target)}, os.path.join(args.out_dir, f"rank{env.rank}.json"))
    if dataset.skipped:  # per process (and per DataLoader worker when workers > 0)
        names = sorted(dataset.skipped)
        print(f"rank {env.rank}: skipped {len(names)} unreadable file(s): {', '.join(names[:10])}"
              + (" ..." if len(names) > 10 else ""), file=sys.stderr)
    env.print(f"done: {step} steps; checkpoint {ckpt_path}; encoder {os.path.join(args.out_dir, 'encoder.safetensors')}")


if __name__ == "__main__":
    common.run(main)
