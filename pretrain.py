"""
RadJEPa pretraining: I-JEPA latent prediction on chest X-rays.

    python pretrain.py                                   # demo: small ViT on the bundled X-rays, CPU, minutes
    torchrun --nproc_per_node 8 pretrain.py --data_dir /data/mimic /data/chexpert:2 --cache_dir /fast/cache
    python pretrain.py --data_dir ARCHIVE --resume       # continue a killed run exactly where it stopped
    srun python pretrain.py --data_dir ARCHIVE --resume auto   # SLURM, no torchrun; continue if there is a checkpoint

Per image, one large context block and 4 target blocks of patches are drawn (masks.py). The context encoder sees
only the context patches; the predictor, a narrow transformer, predicts the target encoder's layer-normed
features at the target positions; the loss is smooth-L1 (or L2) in latent space; the target encoder is an EMA of
the context encoder. No pixels are reconstructed, no negatives, no view augmentations: just a random resized crop
(I-JEPA's area 0.3-1 in the paper preset; the demo trains on whole images, docs/ablations.md says why).

Without --data_dir the "demo" preset runs (vit_tiny at 112 px on sample_data/); with it the "paper" preset
(ViT-B/14 at 224 px, Meta's I-JEPA recipe). Any flag given explicitly overrides the preset.

Writes to --out_dir (default out/pretrain): log.jsonl (one line per step), checkpoint.pt (full training state for
--resume), encoder.safetensors and hf/ (the target encoder alone, for probe.py / segment.py / report.py, and as a
Hugging Face IJepaModel), masks.png (what the masking looks like on your data). runsafe.py keeps that work from being
lost or poisoned (finite, atomic checkpoints; no overwrite without --resume / --overwrite; a lock; SIGTERM / SIGUSR1
checkpoint and exit 128 + signal): the README's "Runs that cannot be lost or poisoned" has the details. Launch with
python, torchrun (one or many nodes), or srun without torchrun (ranks from SLURM's variables).
"""
import copy
import hashlib
import logging
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import archives
import base
import data
import encoders
import imagecache
import masks as masks_lib
import monitor
from monitor import KERMANY, quick_probe
from base import UserError
from model import INIT_SCHEMES, VIT_CONFIGS, Predictor, VisionTransformer, apply_masks, build_vit, \
    default_attention, repeat_interleave_batch, resize_pos_embed
from runsafe import Run, on_main, worker_init
from weights import Checkpoint, strip_prefixes, tensor_dict

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data")
# RADJEPA_DUMP_RANK_STATE=1: each process writes out_dir/rank<N>.json at the end (weight checksums, images and masks
# it saw), for checking a distributed set-up (the tests compare ranks with it)
DUMP_RANK_STATE = os.environ.get("RADJEPA_DUMP_RANK_STATE") == "1"

# Flags whose default depends on the preset; every one can still be given explicitly.
PRESETS = {
    "paper": dict(model="vit_base", img_size=224, batch_size=128, epochs=300, warmup=40, lr=1e-3, start_lr=2e-4,
                  final_lr=1e-6, pred_depth=12, pred_dim=384, log_every=10, ckpt_every=1000, crop_scale=(0.3, 1.0),
                  monitor_every=1000),
    # demo: the recipe that beat a same-architecture random encoder per CPU-minute (docs/ablations.md): the
    # paper's lr 1e-3 is for batch 2048; at batch 16 it destroys the random features faster than it builds new ones.
    # Whole images (crop area 1): in a few hundred steps, zoomed-in crops teach features for a scale the
    # evaluations never show (they see the whole, centre-cropped image). An 8x8 grid cannot keep 10 patches a block.
    "demo": dict(model="vit_tiny", img_size=112, batch_size=16, epochs=12, warmup=1, lr=2.5e-4, start_lr=2.5e-5,
                 final_lr=1e-6, pred_depth=4, pred_dim=96, min_keep=4, log_every=1, ckpt_every=50,
                 crop_scale=(1.0, 1.0), monitor_every=48),
}


def get_args(argv=None):
    p = base.ArgumentParser(__doc__)
    archives.add_source_args(p)  # --data_dir (default: the bundled sample_data), --exclude_subjects
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="defaults for the flags below (default: demo without --data_dir, paper with it)")
    p.add_argument("--frontal_ratio", type=float, default=None,
                   help="resample so frontal:lateral is this ratio in every source that knows its views (NAME=PATH "
                        "archives, CSVs with a view column; paper: 3)")
    p.add_argument("--cache_dir", default=None, help="read images from the cache prepare.py built here from the same "
                                                     "--data_dir (python prepare.py --data_dir ... --cache_dir DIR)")
    p.add_argument("--verify", action="store_true",
                   help="decode every file before training and drop the unreadable ones up front")
    p.add_argument("--crop_scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random resized crop area range (paper preset: 0.3 1, I-JEPA's; demo: 1 1, whole images)")
    p.add_argument("--pred_depth", type=int, default=None, help="predictor depth (paper: 12)")
    p.add_argument("--pred_dim", type=int, default=None, help="predictor width (paper: 384)")
    p.add_argument("--loss", choices=["smooth_l1", "l2"], default="smooth_l1")
    p.add_argument("--init", choices=list(INIT_SCHEMES), default="meta",
                   help="weight init: meta (every Linear std 0.02, as Meta's I-JEPA training) or rescaled (plus the "
                        "per-layer shrink of each block's output layers); see model.init_weights")
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
    p.add_argument("--keep_ckpts", type=int, default=1,
                   help="keep the last K checkpoints (checkpoint.pt and checkpoint_step<N>.pt for the older ones)")
    p.add_argument("--resume", nargs="?", const="yes", default=None, choices=["yes", "auto"],
                   help="continue from out_dir/checkpoint.pt; `--resume auto`: continue if it exists, else start")
    p.add_argument("--allow_change", nargs="+", default=[], metavar="FLAG",
                   help="with --resume: flags that may differ from the checkpoint's on purpose (e.g. lr after a "
                        "divergence); others that change the run are refused")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an out_dir that holds a checkpoint (deletes its checkpoints, export and log)")
    p.add_argument("--init_from", default=None, metavar="PATH",
                   help="start a new run from these weights (I-JEPA, RadJEPa, Hugging Face ijepa, this project's "
                        "exports and checkpoints): target, context encoder and predictor where the file has them")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (GPU)")
    p.add_argument("--probe_every", type=int, default=0,
                   help="every N steps (and at steps 0 and the last) a quick linear probe of the target encoder "
                        "(monitor.quick_probe): its AUROC is logged as probe_auroc (0: off)")
    p.add_argument("--monitor_every", type=int, default=None,
                   help="every N steps (and at steps 0 and the last) RankMe and LiDAR of the target encoder on a "
                        "fixed set of the run's images, logged (0: off; paper preset 1000, demo 48; monitor.py)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also mirror log.jsonl to TensorBoard in out_dir/tensorboard (needs the tensorboard package)")
    p.add_argument("--probe_csv", default=KERMANY,
                   help="labelled images for --probe_every: columns path, pneumonia (0/1), patient "
                        "(default: the bundled Kermany sample)")
    masks_lib.add_mask_args(p)
    p.set_defaults(min_keep=None)  # the demo preset's (an 8x8 grid cannot keep 10), else masks.DEFAULTS
    base.add_common_args(p, "pretrain")
    args = p.parse_args(argv)
    base.apply_preset(args, PRESETS, "paper" if args.data_dir else "demo")
    if args.data_dir is None:
        args.data_dir = [os.path.join(SAMPLE, d) for d in ("nih14", "kermany", "reports")]
    base.check(args, *base.COMMON_RULES, "log_every >= 1", "ckpt_every >= 1", "keep_ckpts >= 1", "pred_depth >= 1",
               "pred_dim >= 1", "probe_every >= 0", "monitor_every >= 0", "frontal_ratio > 0", "ipe_scale > 0",
               "start_lr >= 0", "final_lr >= 0", "warmup >= 0", "grad_clip >= 0", models=VIT_CONFIGS)
    base.ordered_pair(args, "crop_scale", 1e-9, 1.0)
    base.ordered_pair(args, "ema", 0.0, 1.0)
    base.ordered_pair(args, "weight_decay")
    heads = VIT_CONFIGS[args.model][2]
    if args.pred_dim % heads or (args.pred_dim // heads) % 2:
        raise UserError(f"--pred_dim {args.pred_dim} must split into {heads} heads of even width ({args.model} has "
                        f"{heads} heads; the predictor uses as many)")
    if args.img_size % args.patch_size:
        raise UserError(f"--img_size {args.img_size} is not a multiple of --patch_size {args.patch_size}")
    if args.overwrite and args.resume:
        raise UserError("--overwrite and --resume contradict each other: choose one")
    if args.allow_change and not args.resume:
        raise UserError("--allow_change only applies with --resume")
    masks_lib.MaskCollator.from_args(args, (args.img_size // args.patch_size,) * 2)  # its checks, before any work
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
    init = getattr(args, "init", "meta")  # model.init_weights scheme (--init)
    encoder = build_vit(args.model, img_size=args.img_size, patch_size=args.patch_size, attn=args.attn, init=init)
    predictor = Predictor(encoder.grid, encoder.embed_dim, args.pred_dim, args.pred_depth, encoder.num_heads,
                          attn=args.attn, init=init)
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


def init_from(path, jepa, target):
    """--init_from: a new run (fresh optimiser and schedules) from the weights of any encoder file this project
    loads whose architecture the run's ViT is: Meta's I-JEPA checkpoints, the RadJEPa release, Hugging Face ijepa
    folders, this project's exports and checkpoints. The target encoder is the file's (its EMA encoder where it has
    one); the context encoder is its 'encoder' where it has one, else a copy; the predictor is its 'predictor' where
    it fits, else built fresh; position embeddings are resized (bicubic) to the run's grid.
    Returns the start-up line."""
    enc, info = encoders.load_encoder(path, attn="sdpa")
    c, want = enc.config, jepa.encoder.config
    if type(enc) is not VisionTransformer or c["cls_token"] or c["num_register_tokens"] or c["layer_scale"]:
        raise UserError(f"--init_from {path}: a {info.format} encoder (class token, registers or layer scale) "
                        "is not the JEPA ViT pretrain.py trains; start from I-JEPA, RadJEPa or this project's weights")
    diff = [f"{k} {c[k]} (the run's {want[k]})" for k in ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio",
                                                       "qkv_bias", "in_chans", "eps") if c[k] != want[k]]
    if diff:
        raise UserError(f"--init_from {path}: its encoder does not fit the run's ViT: {', '.join(diff)}; choose "
                        "--model / --patch_size to match it")

    def fitted(state):  # a ViT state dict with its positions on the run's grid
        return {**state, "pos_embed": resize_pos_embed(state["pos_embed"], enc.grid, jepa.encoder.grid)}
    target.load_state_dict(fitted(enc.state_dict()))
    raw = Checkpoint(path).obj if os.path.isfile(path) else {}
    parts = {k: strip_prefixes(tensor_dict(raw[k], path), ("module.", "_orig_mod."), path) for k in ("encoder",
             "predictor") if isinstance(raw, dict) and isinstance(raw.get(k), dict) and "target_encoder" in raw}
    jepa.encoder.load_state_dict(fitted(parts["encoder"]) if "encoder" in parts else target.state_dict())
    predictor = "built fresh (none in the file)"
    if "predictor" in parts:  # its fixed sin-cos positions are the run's grid's
        state = {k: v for k, v in parts["predictor"].items() if k != "predictor_pos_embed"}
        own = {k: v for k, v in jepa.predictor.state_dict().items() if k != "predictor_pos_embed"}
        if {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in own.items()}:
            jepa.predictor.load_state_dict(state, strict=False)
            predictor = "from its predictor"
        else:
            predictor = "built fresh (the file's predictor has another depth or width than --pred_depth / --pred_dim)"
    grids = f"; position embeddings resized {enc.grid[0]}x{enc.grid[1]} -> {jepa.encoder.grid[0]}x" \
            f"{jepa.encoder.grid[1]}" if tuple(enc.grid) != tuple(jepa.encoder.grid) else ""
    return (f"init from {info.source}: target encoder from it, context encoder "
            f"{'from its encoder' if 'encoder' in parts else 'a copy of it'}, predictor {predictor}{grids}")


def make_optimizer(jepa):
    """AdamW; biases and 1-D parameters (norms) get no weight decay (group 1 is excluded from the wd schedule).
    Fused: one kernel per parameter, no host sync under an fp16 GradScaler; on a CPU 3.5x faster than foreach."""
    decay, no_decay = [], []
    for n, p in jepa.named_parameters():
        if p.requires_grad:
            (no_decay if n.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "wd_exclude": True}],
                             lr=0.0, fused=True)


def schedule(step, total, warmup, args):
    """lr (linear warm-up, then cosine to final_lr), weight decay (cosine up) and EMA momentum (linear) at `step`.
    Pure functions of the step: a resumed run picks them up exactly, with no scheduler state to restore."""
    total = max(1, int(total * args.ipe_scale))
    if step < warmup:
        lr = args.start_lr + (args.lr - args.start_lr) * step / max(1, warmup)
    else:
        lr = base.cosine((step - warmup) / max(1, total - warmup), args.lr, args.final_lr)
    t = min(1.0, step / total)
    m0, m1 = args.ema
    return lr, base.cosine(t, *args.weight_decay), m0 + (m1 - m0) * t


def set_hparams(opt, lr, wd):
    for g in opt.param_groups:
        g["lr"] = lr
        if not g.get("wd_exclude"):
            g["weight_decay"] = wd


@torch.no_grad()
def ema_update(target, encoder, m):
    """target <- m * target + (1 - m) * encoder, one fused call over all parameters."""
    torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in encoder.parameters()], 1.0 - m)


# ----------------------------------------------------------------------------------------------------------------
# data

class StepBatches:
    """Batch sampler yielding, for every step from first_step to total (across epochs, so one DataLoader serves the
    whole run and its workers persist), this rank's [(index, global_step), ...]. Passing the step with each index
    lets the dataset seed its crop and the collator its masks by step: a resumed run sees the same pixels and masks
    as an uninterrupted one, whatever the number of DataLoader workers."""

    def __init__(self, sampler, batch_size, ipe, first_step, total):
        self.sampler, self.bs, self.ipe, self.first, self.total = sampler, batch_size, ipe, first_step, total
        self._epoch, self._indices = None, None

    def __len__(self):
        return max(0, self.total - self.first)

    def indices(self, step):
        epoch, s = divmod(step, self.ipe)
        if epoch != self._epoch:
            self._epoch, self._indices = epoch, self.sampler.epoch_indices(epoch)
        return self._indices[s * self.bs:(s + 1) * self.bs]

    def __iter__(self):
        for step in range(self.first, self.total):
            yield [(int(i), step) for i in self.indices(step)]


class Collate:
    """The mask collator, plus the files this DataLoader worker skipped since its last batch: a worker's dataset is
    a copy, so this is how the end-of-run summary counts every skip."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, batch):
        info = torch.utils.data.get_worker_info()
        new = sorted(info.dataset.skipped - info.dataset.reported) if info is not None else []
        if new:
            info.dataset.reported.update(new)
        return (*self.collator(batch), new)


def native_bf16_cpu():
    """True on CPUs with bf16 matrix instructions (AMX, AVX512-BF16), where bf16 autocast is the faster default;
    elsewhere bf16 matmul is emulated (measured 9x slower than fp32 on an AVX2 CPU) and fp32 stays the default."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


NEVER = 2 ** 62  # "no bad step yet", for the first-non-finite-step tracker of the training loop


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    env = base.setup(args)
    if args.dtype is None and env.device.type == "cpu" and native_bf16_cpu():
        env.dtype = torch.bfloat16  # loss trajectory measured equal to fp32's within noise (README, Speed)
    args.dtype = base.DTYPE_NAMES[env.dtype]  # saved, and compared on --resume
    args.attn = args.attn or default_attention(env.device, env.dtype)
    run = Run(args, env)  # lock out_dir; resume, start, or refuse to touch a checkpoint

    # data: find and check everything before any model is built, so a bad path fails in seconds
    sources = archives.pretrain_sources(args.data_dir, args.exclude_subjects)
    paths = data.concat_paths(sources)
    run.data = {"images": len(paths), "list": hashlib.sha1("\0".join(paths).encode()).hexdigest()}
    # opened, never built here (no rank waits for another); a missing, unfinished or mismatched cache is an error
    cache = imagecache.open_cache(args.cache_dir, paths, imagecache.min_stored_side(args.img_size, args.crop_scale)) \
        if args.cache_dir else None
    dataset = data.PretrainDataset(paths, args.img_size, crop_scale=tuple(args.crop_scale), cache=cache,
                                   seed=args.seed, verify=args.verify, min_side=2 * args.patch_size)
    sampler = data.MixSampler(sources, rank=env.rank, world=env.world, seed=args.seed,
                              frontal_ratio=args.frontal_ratio)
    ipe = len(sampler) // args.batch_size
    if ipe == 0:
        raise UserError(f"{len(sampler)} images per process is less than one batch of {args.batch_size}: "
                        f"lower --batch_size or add images")
    total = args.max_steps or args.epochs * ipe
    collator = masks_lib.MaskCollator.from_args(args, (args.img_size // args.patch_size,) * 2, env.rank)
    env.print(f"{len(paths)} images from " + ", ".join(f"{s.name} ({len(s)}, weight {s.weight:g})" for s in sources)
              + (f"; {len(dataset.skipped)} unreadable, skipped" if dataset.skipped else ""))
    ratio = f"--frontal_ratio {args.frontal_ratio:g}" if args.frontal_ratio else "no --frontal_ratio"
    env.print(f"sources (the paper's Table 1; one epoch's draws after the weights and {ratio}):\n"
              + data.source_table(sources, sampler))
    env.print(f"{args.preset} preset: {args.model}/{args.patch_size} at {args.img_size} px, "
              f"predictor {args.pred_depth}x{args.pred_dim}, crop area {args.crop_scale[0]:g}-{args.crop_scale[1]:g}, "
              f"{ipe} steps/epoch, {total} steps, {env.device} {args.dtype}, attn {args.attn}")
    env.print(f"global batch {args.batch_size * env.world} = {args.batch_size} per process x {env.world} process(es), "
              f"peak lr {args.lr:g} (warm-up from {args.start_lr:g} over {int(args.warmup * ipe)} steps, cosine to "
              f"{args.final_lr:g}); the lr is not rescaled with the batch "
              "(Meta's I-JEPA: 2048 = 128 x 16 GPUs at 1e-3)")

    torch.manual_seed(args.seed)  # the same initial weights on every rank: the EMA target is not synced by DDP
    jepa, target = build(args, env.device)
    opt = make_optimizer(jepa)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.dtype == torch.float16)  # fp16 needs loss scaling
    if args.init_from and not run.resume:
        env.print(init_from(args.init_from, jepa, target))
    step = run.restore(jepa, target, opt, scaler, total)
    log = base.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"), env.is_main, step if run.resume else None)
    if env.is_main:  # the settings as resolved (preset values included), readable beside the run's outputs
        base.write_args(args, args.out_dir)
        if args.tensorboard:
            log.mirror = monitor.TensorBoard(os.path.join(args.out_dir, "tensorboard"))
    if step >= total:
        env.print(f"done: the run in {args.out_dir} is already at step {step} of {total}; give a larger --max_steps "
                  "or --epochs to continue it")
        return
    if step == 0:  # show the user what the masking does on their own images
        def preview():
            imgs = torch.stack([dataset[(i, 0)][0] for i in range(min(4, len(dataset)))])
            me, mp = collator.sample(len(imgs), 0)
            masks_lib.save_mask_preview(imgs, me, mp, collator.grid, os.path.join(args.out_dir, "masks.png"))
        on_main(env, preview)
    batches = StepBatches(sampler, args.batch_size, ipe, step, total)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=Collate(collator),
                                         num_workers=args.num_workers, pin_memory=env.device.type == "cuda",
                                         worker_init_fn=worker_init)
    watch = monitor.Monitor(dataset, collator) if args.monitor_every and env.is_main else None
    step, stop, skipped = train(args, env, run, jepa, target, opt, scaler, loader, batches, log, step, total, ipe,
                                watch)
    if stop:
        env.print(f"stopped by {signal.Signals(stop).name} at step {step}: checkpoint {run.ckpt}; continue with the "
                  "same command plus --resume (or --resume auto)")
        raise SystemExit(128 + stop)
    skipped |= dataset.skipped  # main process (and every file when num_workers is 0); workers' came with batches
    if env.distributed:
        every = [None] * env.world
        dist.all_gather_object(every, sorted(skipped))
        skipped = set().union(*map(set, every))
    if skipped:
        names = sorted(skipped)
        env.print(f"skipped {len(names)} file(s), unreadable or under 2 patches, in all processes: "
                  + ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""), file=sys.stderr)
    env.print(f"done: {step} steps; checkpoint {run.ckpt}; "
              f"encoder {os.path.join(args.out_dir, 'encoder.safetensors')}")


def train(args, env, run, jepa, target, opt, scaler, loader, batches, log, step, total, ipe, watch):
    """The training loop: one I-JEPA step per batch; the log, the label-free signals (RankMe, LiDAR) and the quick
    probe, checkpoints (and curves.png) and stop signals at their steps. Returns (step reached, stop signal or 0,
    files skipped in DataLoader workers)."""
    model, target_fwd = jepa, target  # the compiled wrapper only runs forwards; checkpoints and EMA use the plain ones
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(jepa, device_ids=[env.device.index] if env.device.type == "cuda"
                                                    else None, static_graph=True)
    if args.compile:
        model, target_fwd = torch.compile(model), torch.compile(target)

    def due(every, step):
        return env.is_main and every and (step % every == 0 or step == total)

    def signals(step):  # is the target encoder learning? (label-free: --monitor_every; a quick probe: --probe_every)
        out = watch(target) if watch is not None and due(args.monitor_every, step) else {}
        return {**out, **({"probe_auroc": quick_probe(target, args.probe_csv)} if due(args.probe_every, step) else {})}

    if step == 0 and (args.probe_every or args.monitor_every):  # the same-architecture random encoder: the floor
        on_main(env, lambda: log.log(step=0, **signals(0)))
    jepa.train()
    t_last, last_log, warmup = time.perf_counter(), step, int(args.warmup * ipe)
    seen, mask_sums, skipped, stop = [], [], set(), 0
    first_bad = torch.full((), NEVER, dtype=torch.long, device=env.device)  # first step with a non-finite loss
    with tqdm(total=total, initial=step, disable=not env.is_main, dynamic_ncols=True, desc="pretrain") as bar:
        for imgs, masks_enc, masks_pred, new_skips in loader:
            skipped.update(new_skips)
            epoch = step // ipe
            if DUMP_RANK_STATE:
                seen += [int(j) for j in batches.indices(step)]
                mask_sums.append(int(sum(m.sum() for m in masks_enc + masks_pred)))
            imgs = imgs.to(env.device, non_blocking=True)
            masks_enc = [m.to(env.device, non_blocking=True) for m in masks_enc]
            masks_pred = [m.to(env.device, non_blocking=True) for m in masks_pred]
            lr, wd, mom = schedule(step, total, warmup, args)
            set_hparams(opt, lr, wd)
            with env.autocast():
                loss, tstd = jepa_loss(model, target_fwd, imgs, masks_enc, masks_pred, args.loss)
            # no host sync here: the flag stays on the device and is read at log and checkpoint steps
            first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(loss), NEVER, step + 1))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(jepa.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            ema_update(target, jepa.encoder, mom)
            step += 1
            bar.update(1)
            stop = run.stopper.agreed()
            log_now = step % args.log_every == 0 or step == total or any(
                every and step % every == 0 for every in (args.probe_every, args.monitor_every))
            save_now = stop or step % args.ckpt_every == 0 or step % ipe == 0 or step == total
            if log_now or save_now:
                if env.distributed:
                    dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
                if int(first_bad) < NEVER:
                    raise UserError(f"the loss became non-finite at step {int(first_bad)}; nothing after "
                                    f"{run.saved_note()} was written. Lower --lr or check the data, then --resume "
                                    "--allow_change lr (or start over with --overwrite)")
            if log_now:
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                row = dict(step=step, epoch=epoch, loss=loss.item(), lr=lr, wd=wd, momentum=mom,
                           img_per_s=args.batch_size * env.world * (step - last_log) / (now - t_last),
                           target_std=tstd.item(), mem_mb=round(memory_mb(env.device)),
                           ctx_len=masks_enc[0].shape[1], tgt_len=masks_pred[0].shape[1])
                if scaler.is_enabled():
                    row["loss_scale"] = scaler.get_scale()
                row.update(signals(step))
                t_last, last_log = time.perf_counter(), step  # the signals' seconds stay out of the next img_per_s
                log.log(**row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.1e}", img_s=f"{row['img_per_s']:.0f}",
                                **({"probe_auroc": f"{row['probe_auroc']:.3f}"} if "probe_auroc" in row else {}))
            if save_now:
                run.save(step, jepa, target, opt, scaler, total)
                if env.is_main:
                    monitor.draw_curves(log.path, os.path.join(args.out_dir, "curves.png"))
            if stop:
                break
    if DUMP_RANK_STATE and not stop:
        def checksum(m):
            return float(sum(p.double().sum() * (k + 1) for k, p in enumerate(m.parameters())))
        base.write_json({"rank": env.rank, "world": env.world, "seen": seen, "mask_checksums": mask_sums,
                         "encoder_checksum": checksum(jepa.encoder), "predictor_checksum": checksum(jepa.predictor),
                         "target_checksum": checksum(target)}, os.path.join(args.out_dir, f"rank{env.rank}.json"))
    return step, stop, skipped


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s: %(message)s")
    base.run(main)
