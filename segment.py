"""
Semantic segmentation on a frozen encoder: how much anatomy do its patch features hold? (the paper's Table 4)

    python segment.py                                  # demo: bundled real lung masks, left/right lung, CPU, minutes
    python segment.py --encoder out/pretrain/encoder.safetensors --csv /data/lungs/manifest.csv   # image,mask
    python segment.py --task zones --csv manifest.csv --boxes /data/chest-imagenome/silver_dataset/scene_graph
    python segment.py --task ribs --dataset vindr_rib --data_dir /data/VinDr-RibCXR   # its official split
    python segment.py --dataset mimic_lungs --data_dir /data/lung-segment-mimic-cxr/1.0.0   # PhysioNet's pairs
    python segment.py --encoder A.safetensors --baseline random   # and a random encoder of A's architecture
    python segment.py --decoder linear ...             # the linear baseline: one 1x1 conv on the last layer
    python segment.py --compare out/segment_a out/segment_b   # paired bootstrap over test images: A better than B?
    torchrun --nproc_per_node 4 segment.py ...         # DDP over the decoder (SyncBN); every rank validates

The encoder (encoders.load_encoder) is frozen; only the decoder trains: UPerNet on a BEiT-style feature pyramid
from blocks 4, 6, 8, 12 (39.3M parameters for a ViT-B, model.py) by the paper's recipe (the "paper" preset, the
default with data flags; README, Protocols), or the linear decoder (one 1x1 conv on the last block), a convex problem
solved to convergence by L-BFGS. Without data flags the "demo" preset runs (vit_tiny at 112 px, 15 epochs, batch 8).
Image and label map are centre-cropped and resized together; Dice is measured on the crop at its original
resolution. A loaded encoder runs at its own resolution (--enc_img_size overrides it; --img_size only shapes a random
one).

Tasks (class 0 = background; lung-mask value 127 = "ignore": excluded from loss and Dice):
  lungs  right_lung, left_lung from a lung mask image (>0 lung); the patient's RIGHT lung is on the image's LEFT
  lung   both lungs as one class (no laterality: flips allowed)
  zones  six lung zones (Chest ImaGenome bbox names) = per-image boxes intersected with the lung mask; --boxes is
         a folder of scene-graph JSONs or a CSV path,zone,x1,y1,x2,y2 (see archives.load_boxes, seglabels.zones_label)
  ribs   VinDr-RibCXR's R1..R10, L1..L10 (R = patient's right) from its polygon JSONs (see load_vindr_rib)

Writes to --out_dir (default out/segment): results.json (Dice per class and mean, settings, encoder),
per_image_dice.csv (what --compare reads), checkpoint.pt (best decoder), log.jsonl, overlays/*.png (truth | pred).
"""
import itertools
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import base
import downstream
import data
import archives
import figures
from base import UserError, nanmean
from archives import RIBS, ZONES
from seglabels import IGNORE, make_label, read_composed
from model import VIT_CONFIGS, LinearDecoder, SegModel, UPerNet, count_params

DEMO_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", "lungseg", "manifest.csv")
STILL_FALLING = 0.02    # a validation loss that fell more than this over the last quarter of the epochs: not converged
EVAL_BATCH = 16         # images per forward pass when validating and testing
SEG_CHUNK = 64          # images per transfer to the device when the linear decoder's objective is evaluated
SEG_GRAD_TOL = 1e-5     # the linear decoder's L-BFGS tolerance: its upsampled pixel loss is ill-conditioned, and
                        # the last decade of gradient (1e-5 -> 1e-6) moved validation Dice by < 0.1 at 5x the time

# foreground classes, and whether the task tells left from right (then a horizontal flip would swap the labels)
TASKS = {"lungs": (["right_lung", "left_lung"], True), "lung": (["lung"], False),
         "zones": ([z.replace(" lung zone", "").replace(" ", "_") for z in ZONES], True), "ribs": (RIBS, True)}

PRESETS = {"paper": dict(model="vit_base", img_size=224, batch_size=80, epochs=100, lr=5e-4),
           "demo": dict(model="vit_tiny", img_size=112, batch_size=8, epochs=15, lr=5e-4)}
AUG = dict(rotate_deg=10.0, scale=(0.9, 1.1), translate=0.05, shear=0.05, elastic=0.02, elastic_grid=5,
           brightness=0.1, contrast=(0.8, 1.2), gamma=(0.7, 1.5))


def get_args(argv=None):
    p = base.ArgumentParser(__doc__)
    g = downstream.add_data_args(p, "data (default: the bundled lungseg sample)", ["vindr_rib", "mimic_lungs"],
                                 "image path (or `image`), mask path, subject (absent: one subject per image)")
    g.add_argument("--task", default="lungs", choices=list(TASKS))
    g.add_argument("--mask_col", default="mask", help="mask image column (optional for --task zones)")
    g.add_argument("--boxes", default=None, help="--task zones: folder of scene-graph JSONs or a box CSV")
    g.add_argument("--box_scale", type=float, default=1.0, help="multiply box coordinates (images were resized)")
    g = p.add_argument_group("protocol")
    g.add_argument("--decoder", default="upernet", choices=["upernet", "linear"])
    g.add_argument("--layers", default=None, help="decoder's blocks, 1-based (default UPerNet 4,6,8,12; linear 12)")
    g.add_argument("--flip", default="auto", choices=["auto", "on", "off"], help="auto: only without left/right")
    g.add_argument("--no_augment", action="store_true", help="no training augmentations at all")
    g.add_argument("--dice_loss", type=float, default=0.0, help="weight of a soft Dice loss added to CE")
    g.add_argument("--n_overlays", type=int, default=8, help="test images drawn to overlays/")
    g = p.add_argument_group("comparing two runs")
    g.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                   help="two per_image_dice.csv (or run folders): paired bootstrap, one-tailed 'A better than B'")
    downstream.add_eval_args(p)
    base.add_common_args(p, "segment")
    base.add_preset_arg(p, PRESETS, "paper (the default with data flags) or demo (without), as described above")
    args = p.parse_args(argv)
    base.apply_preset(args, PRESETS, "paper" if args.csv or args.dataset else "demo")
    base.check(args, *base.COMMON_RULES, *downstream.ENCODER_RULES, "dice_loss >= 0", "box_scale > 0",
               "n_overlays >= 0", models=VIT_CONFIGS)
    if args.img_size % args.patch_size:
        raise UserError(f"--img_size {args.img_size} is not a multiple of --patch_size {args.patch_size}")
    lateral = TASKS[args.task][1]
    if args.flip == "on" and lateral:
        raise UserError(f"--flip on would swap left and right labels of --task {args.task}; drop --flip")
    args.use_flip = args.flip == "on" or (args.flip == "auto" and not lateral)
    if args.dataset == "mimic_lungs" and args.task not in ("lungs", "lung"):
        raise UserError("--dataset mimic_lungs has lung masks: --task lungs or lung")
    if (args.dataset == "vindr_rib") != (args.task == "ribs"):
        raise UserError("--task ribs and --dataset vindr_rib --data_dir ROOT (VinDr-RibCXR) go together")
    if args.task == "zones" and not args.boxes:
        raise UserError("--task zones needs --boxes (a folder of scene-graph JSONs or a CSV path,zone,x1,y1,x2,y2)")
    return args


def load_csv(path, args, boxes=None):
    """Samples of a manifest CSV (image, mask unless zones, subject: absent, each image is its own); with zone
    boxes, only the images that have them."""
    cols = data.read_csv(path)[0].keys()
    pc = args.path_col if args.path_col in cols else ("image" if args.path_col == "path" and "image" in cols else None)
    if pc is None:
        raise UserError(f"CSV {path} has no image column {args.path_col!r} (its columns: {', '.join(cols)}); "
                        f"pick it with --path_col")
    mc = args.mask_col if args.mask_col in cols else None
    if mc is None and args.task != "zones":
        raise UserError(f"CSV {path} has no mask column {args.mask_col!r}; pick it with --mask_col")
    subject = args.subject_col or ("none" if path == DEMO_CSV else "subject")  # the bundled masks: one per patient
    samples = archives.read_csv_samples(path, args.image_root, {"path": pc, "subject": subject, "mask": mc},
                                        path_keys=("path", "mask"), subject_given=args.subject_col is not None)[0]
    if boxes is not None:
        keys = [os.path.splitext(os.path.basename(s["path"]))[0] for s in samples]
        if not all(k in boxes for k in keys):
            print(f"warning: {sum(k not in boxes for k in keys)} image(s) of {path} have no zone boxes in --boxes and "
                  f"are left out")
        samples = [{**s, "boxes": boxes[k]} for s, k in zip(samples, keys) if k in boxes]
    if not samples:
        raise UserError(f"no usable samples in {path}")
    return samples


def load_parts(args):
    """{'train', 'val', 'test'} -> samples, subjects kept apart (downstream.split_samples: 70/15/15 by subject of what
    has no fixed part; the official splits and --val_csv / --test_csv where given)."""
    if args.dataset:
        pool, _ = archives.load(args.dataset, args)
    else:
        boxes = archives.load_boxes(args.boxes, args.box_scale) if args.task == "zones" else None
        pool = [{**s, "part": k} for k, f in downstream.csv_parts(args, DEMO_CSV) for s in load_csv(f, args, boxes)]
    parts = downstream.split_samples(pool, seed=args.seed)
    files = [f for k in parts for s in parts[k] for f in (s["path"], s.get("mask")) if f]
    bad = data.verify_images(files)  # upfront: a wrong --image_root fails here in one line, not in a worker
    if bad:
        raise UserError(f"{len(bad)} image / mask file(s) unreadable, e.g. {files[min(bad)]}: {bad[min(bad)]}")
    return parts


# ----------------------------------------------------------------------------------------------------------------
# dataset and augmentations (on the device, one batch at a time, identical for image and label)

class SegDataset(torch.utils.data.Dataset):
    """(image (1, S, S) in [0, 1], label (S, S) long): both centre-cropped to the same square (crop_frac of the
    shorter side), the image resized bilinearly, the label by nearest neighbour. full=True adds the cropped label at
    the original resolution (Dice is measured there)."""

    def __init__(self, samples, task, size, full=False, crop_frac=1.0):
        self.samples, self.task, self.size, self.full, self.frac = samples, task, size, full, crop_frac

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        try:
            img = read_composed(s["compose"]) if s.get("compose") else data.read_image(s["path"])
        except data.ImageReadError as e:
            raise UserError(str(e))
        t, l, side = downstream.center_box(*img.shape, self.frac)
        lab = torch.from_numpy(make_label(s, self.task, img.shape)[t:t + side, l:l + side].copy())
        x = data.resize(img[t:t + side, l:l + side], self.size)[None]
        y = F.interpolate(lab[None, None].float(), size=(self.size, self.size), mode="nearest-exact")[0, 0].long()
        return (x, y, lab.long()) if self.full else (x, y)


def collate(batch):  # full-resolution labels differ in size: they stay a list
    out = [torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])]
    return out + [[b[2] for b in batch]] if len(batch[0]) == 3 else out


def augment(x, y, flip):
    """Random affine (rotation, scale, shear, shift) + elastic warp as ONE sampling grid used for the image
    (bilinear) and the label (nearest, so class ids stay exact; outside the image = background), then gamma,
    contrast and brightness on the image. flip=True also mirrors half the batch (never for left/right tasks)."""
    B, _, H, W = x.shape
    dev, a = x.device, AUG
    u = lambda lo, hi: torch.empty(B, device=dev).uniform_(lo, hi)
    ang, sh = u(-1, 1) * math.radians(a["rotate_deg"]), u(-a["shear"], a["shear"])
    s = torch.exp(u(math.log(a["scale"][0]), math.log(a["scale"][1])))
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / s, -torch.sin(ang) / s + sh
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / s, torch.cos(ang) / s
    theta[:, :, 2] = torch.stack([u(-1, 1), u(-1, 1)], 1) * 2 * a["translate"]  # grid units: [-1, 1] = image
    if flip:
        theta[:, :, 0] *= torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0)[:, None]
    grid = F.affine_grid(theta, (B, 1, H, W), align_corners=False)
    # elastic: smooth random displacements (coarse noise upsampled bicubically), a few % of the image
    noise = torch.randn(B, 2, a["elastic_grid"], a["elastic_grid"], device=dev) * a["elastic"]
    grid = grid + F.interpolate(noise, size=(H, W), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0].long()
    v = lambda lo, hi: u(lo, hi)[:, None, None, None]
    x = x.clamp(0, 1) ** torch.exp(v(math.log(a["gamma"][0]), math.log(a["gamma"][1])))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * v(*a["contrast"]) + mean + v(-a["brightness"], a["brightness"])
    return x.clamp(0, 1), y


# ----------------------------------------------------------------------------------------------------------------
# loss and Dice

def seg_loss(logits, y, dice_weight=0.0):
    loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE)
    if dice_weight > 0:  # soft Dice over the foreground classes, ignore pixels masked out
        valid = (y != IGNORE)[:, None].float()
        prob = logits.float().softmax(1) * valid
        onehot = F.one_hot(y.clamp(max=logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
        inter, denom = (prob * onehot).sum((0, 2, 3)), (prob + onehot).sum((0, 2, 3))
        loss = loss + dice_weight * (1 - (2 * inter + 1) / (denom + 1))[1:].mean()
    return loss


def dice_per_class(pred, truth, n_fg):
    """Dice of each foreground class 1..n_fg for one image (integer HxW arrays), IGNORE pixels of truth excluded;
    NaN where the class is absent from both (no evidence either way: left out of the means)."""
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    valid = truth != IGNORE
    count = lambda v: np.bincount(v, minlength=n_fg + 1)[1:n_fg + 1].astype(np.float64)
    p, t, tp = count(pred[valid]), count(truth[valid]), count(truth[valid & (pred == truth)])
    with np.errstate(invalid="ignore"):
        return np.where(p + t > 0, 2 * tp / (p + t), np.nan)


@torch.no_grad()
def evaluate(model, loader, env, norm, n_fg, keep=0):
    """Mean CE loss at training resolution, per-image Dice at the ORIGINAL resolution (logits upsampled
    bilinearly), and up to `keep` (image, truth, prediction) triples for the overlays."""
    model.eval()
    loss_sum, n_pix, dice, kept = 0.0, 0, [], []
    for x, y, full in loader:
        x, y = x.to(env.device), y.to(env.device)
        with env.autocast():
            logits = model(norm(x))
        loss_sum += F.cross_entropy(logits.float(), y, ignore_index=IGNORE, reduction="sum").item()
        n_pix += int((y != IGNORE).sum())
        for i, t in enumerate(full):
            up = F.interpolate(logits[i:i + 1].float(), size=t.shape, mode="bilinear", align_corners=False)
            pred, t = up.argmax(1)[0].cpu().numpy(), t.numpy()
            dice.append(dice_per_class(pred, t, n_fg))
            if len(kept) < keep:
                kept.append((x[i, 0].cpu().numpy(), t, pred))
    return loss_sum / max(1, n_pix), np.array(dice).reshape(-1, n_fg), kept


# ----------------------------------------------------------------------------------------------------------------
# the decoders: UPerNet trained by the paper's recipe, the linear one solved

def train_upernet(model, eval_model, train_dl, val_dl, env, norm, n_fg, args, logger, save):
    """The paper's recipe: Adam, cosine over all steps, augmentations on the device; after each epoch the validation
    loss, the decoder with the lowest one kept (the test set is never looked at here). Its convergence: whether the
    validation loss was still falling over the last quarter of the epochs."""
    opt = torch.optim.Adam(model.decoder.parameters(), lr=args.lr)
    total = args.max_steps or args.epochs * len(train_dl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: base.cosine(t / total, 1.0, 0.0))
    best, best_epoch, step, epoch, curve = float("inf"), -1, 0, 0, []
    bar = tqdm(total=total, disable=not env.is_main, dynamic_ncols=True, desc="segment")
    while step < total:
        if env.distributed:
            train_dl.sampler.set_epoch(epoch)
        model.train()
        for x, y in itertools.islice(train_dl, total - step):
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if not args.no_augment:
                x, y = augment(x, y, args.use_flip)
            with env.autocast():
                logits = model(norm(x))
            loss = seg_loss(logits, y, args.dice_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            logger.log(step=step, epoch=epoch, loss=loss.item(), lr=sched.get_last_lr()[0])
        epoch += 1
        val_loss, val_dice, _ = evaluate(eval_model, val_dl, env, norm, n_fg)
        val_mean = float(nanmean(nanmean(val_dice, 0)))
        curve.append(val_loss)
        logger.log(step=step, epoch=epoch, loss=val_loss, val_loss=val_loss, val_dice=val_mean)
        if val_loss < best:
            best, best_epoch = val_loss, epoch
            save(epoch=epoch, step=step, val_loss=val_loss)
        env.print(f"epoch {epoch}: val loss {val_loss:.4f}, val Dice {val_mean:.4f}{' (best)' * (best_epoch == epoch)}")
    bar.close()
    q = max(1, len(curve) // 4)
    fall = (curve[-q - 1] - curve[-1]) / curve[-q - 1] if len(curve) > q else float("nan")
    still = best_epoch == epoch and fall > STILL_FALLING
    note = (f"decoder: validation loss {curve[-1]:.4f} at the last epoch; it fell {fall:.1%} over the last {q} epoch(s)"
            + (f". WARNING: still falling by more than {STILL_FALLING:.0%} at the end: more --epochs would likely "
               "change the Dice" if still else ""))
    return {"best_epoch": best_epoch, "epochs_run": epoch, "steps": step, "best_val_loss": best,
            "selected": f"best epoch {best_epoch} of {epoch} by validation loss",
            "convergence": {"solver": "adam", "val_loss": curve, "fall_last_quarter": fall, "converged": not still,
                            "note": note}}


@torch.no_grad()
def patch_features(model, ds, env, norm):
    """Last-layer patch features (N, D, h, w) of a data set's images (no augmentation) and their label maps (N, S,
    S, uint8), on the CPU."""
    feats, labels = [], []
    for x, y, *_ in torch.utils.data.DataLoader(ds, EVAL_BATCH, collate_fn=collate):
        with env.autocast():
            feats.append(model.features(norm(x.to(env.device)))[-1].float().cpu())
        labels.append(y.to(torch.uint8))
    return torch.cat(feats), torch.cat(labels)


def fit_linear(model, train_ds, val_ds, env, norm, args, logger, save):
    """The linear decoder is a convex problem on frozen features: a 1x1 conv (a per-patch linear map), upsampled
    bilinearly (linear too), under pixel cross-entropy. So it is solved, not trained: L-BFGS to convergence
    (downstream.lbfgs) for each L2 strength of downstream.L2_GRID on the un-augmented training images, the strength
    with the lowest validation loss kept (--max_steps caps the iterations per strength). Adam on this problem
    converges slowly and, at a high lr, not at all."""
    Ftr, Ytr = patch_features(model, train_ds, env, norm)
    Fva, Yva = patch_features(model, val_ds, env, norm)
    conv = model.decoder.conv_seg
    W = torch.zeros(conv.weight.shape[:2], dtype=torch.float64, device=env.device, requires_grad=True)
    b = torch.zeros(len(conv.bias), dtype=torch.float64, device=env.device, requires_grad=True)

    def backward(loss):  # under no_grad (the validation loss): only the value
        if loss.requires_grad:
            loss.backward()
        return loss.detach()

    def objective(Fs, Ys, lam):  # mean pixel CE over the labelled pixels + lam / 2 ||W||^2, gradients into W, b
        n, total = max(int((Ys != IGNORE).sum()), 1), 0.0
        for i in range(0, len(Fs), SEG_CHUNK):
            f, y = Fs[i:i + SEG_CHUNK].to(env.device, torch.float64), Ys[i:i + SEG_CHUNK].to(env.device).long()
            logits = F.interpolate(torch.einsum("ndhw,kd->nkhw", f, W) + b[:, None, None], size=y.shape[-2:],
                                   mode="bilinear", align_corners=False)
            total = total + backward(F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum") / n)
        return total + backward(0.5 * lam * (W * W).sum())

    best, iters = None, 0
    for step, l2 in enumerate(downstream.L2_GRID[::2], start=1):  # decades: the pixel loss is smooth in the strength
        facts = downstream.lbfgs([W, b], lambda: objective(Ftr, Ytr, float(l2)), SEG_GRAD_TOL, args.max_steps or 1000)
        with torch.no_grad():
            val_loss, iters = float(objective(Fva, Yva, 0.0)), iters + facts["iterations"]
        logger.log(step=step, l2=float(l2), loss=facts["objective"], val_loss=val_loss, iterations=facts["iterations"])
        env.print(f"L2 {l2:.0e}: train objective {facts['objective']:.4f} ({facts['iterations']} L-BFGS iterations), "
                  f"val loss {val_loss:.4f}")
        if best is not None and val_loss >= best[0]:
            break  # the validation loss is unimodal in the strength: the first worse one ends the sweep
        best = (val_loss, float(l2), facts, W.detach().clone(), b.detach().clone())
    val_loss, l2, facts, Wb, bb = best
    with torch.no_grad():
        conv.weight.copy_(Wb.view(conv.weight.shape))
        conv.bias.copy_(bb)
    save(l2=l2, val_loss=val_loss)
    note = (f"decoder: solved to convergence by L-BFGS (largest gradient entry {facts['grad_max']:.1e}), L2 {l2:.0e} "
            "by validation loss" if facts["converged"] else f"WARNING: L-BFGS stopped with a gradient entry of "
            f"{facts['grad_max']:.1e}: the linear decoder may not be at its optimum")
    return {"best_epoch": None, "epochs_run": 0, "steps": iters, "best_val_loss": val_loss,
            "selected": f"L2 {l2:.0e} by validation loss",
            "convergence": {"solver": "lbfgs", "l2": l2, **facts, "note": note}}


# ----------------------------------------------------------------------------------------------------------------
# outputs: the paper's table, results.json, per_image_dice.csv (overlays: figures.py)

def params_text(n):  # also compare.py's Table 4
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def print_table(title, name, decoder, n_params, classes, per_class, mean_dice, ci):
    """One row laid out like the paper's Table 4: encoder, decoder, its parameters, Dice x100 per class and mean."""
    downstream.print_rows(title, ["Encoder", "Decoder", "Params"] + classes + ["Mean Dice", "95% CI"], [
        [name, decoder, params_text(n_params)] + [f"{v * 100:.1f}" for v in per_class]
        + [f"{mean_dice * 100:.1f}", f"[{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]"]])


def load_per_image(p):
    path = os.path.join(p, "per_image_dice.csv") if os.path.isdir(p) else p
    rows = data.read_csv(path, required=("path", "mean"))
    classes = [c for c in rows[0] if c not in ("path", "subject", "mean")]
    if not classes:
        raise UserError(f"{path}: no class columns; pass a per_image_dice.csv written by segment.py")
    rows.sort(key=lambda r: r["path"])
    D = np.array([[data.number(r[c], f"{path}, {r['path']}, {c}") for c in classes] for r in rows])
    return path, [r["path"] for r in rows], classes, D


def compare(args):
    """--compare A B: a paired bootstrap over the test images, per class and of the mean Dice."""
    (pa, paths, cls, A), (pb, paths_b, cls_b, B) = map(load_per_image, args.compare)
    if cls != cls_b:
        raise UserError(f"{pa} and {pb} segment different classes ({cls} vs {cls_b})")
    downstream.same_items(pa, paths, pb, paths_b)

    def dice(D, idx, c):  # x100 as in the table; per class: mean over images; mean Dice (c None): mean over classes
        return 100 * (nanmean(nanmean(D[idx], 0)) if c is None else nanmean(D[idx, c]))
    stats = {("dice", name): lambda idx, c=c: (dice(A, idx, c), dice(B, idx, c))
             for c, name in list(enumerate(cls)) + [(None, "mean Dice")]}
    return downstream.paired_compare(args, pa, pb, stats, len(paths), digits=2)


def deviations(args):
    """What this run does differently from the paper's section 6 protocol (printed and in results.json)."""
    if args.decoder == "linear":
        out = ["a linear decoder on the last block, solved to convergence by L-BFGS on the un-augmented training "
               "images, its L2 strength by validation loss (the paper: UPerNet trained with Adam)"]
    else:
        out = [f"--{k} {getattr(args, k)} (the paper: {PRESETS['paper'][k]})" for k in ("batch_size", "epochs", "lr")
               if getattr(args, k) != PRESETS["paper"][k]]
    return out + [text for when, text in (
        (args.no_augment and args.decoder != "linear", "no training augmentations"),
        (args.dataset == "vindr_rib", "VinDr-RibCXR's official train split is split 82/18 by subject into train / "
         "validation"),
        (args.dataset == "mimic_lungs", "lung-segment-mimic-cxr has no official split: 70/15/15 by subject")) if when]


# ----------------------------------------------------------------------------------------------------------------
# the run

def build(vit, args, n_classes, env):
    """(model, eval_model): the frozen encoder and the decoder on the blocks it reads (UPerNet: 1/3, 1/2, 2/3 and all
    of the depth, as BEiT; linear: the last); under torchrun model's decoder is in DDP, eval_model's is not."""
    depth = len(vit.blocks)
    layers = [depth // 3, depth // 2, 2 * depth // 3, depth] if args.decoder == "upernet" else [depth]
    layers = [int(l) for l in args.layers.split(",")] if args.layers else layers
    if any(not 1 <= l <= depth for l in layers) or (args.decoder == "upernet" and len(layers) != 4):
        raise UserError(f"--layers {args.layers}: UPerNet takes 4 blocks, linear any; each within 1..{depth}")
    decoder = (UPerNet if args.decoder == "upernet" else LinearDecoder)(vit.embed_dim, n_classes).to(env.device)
    train_decoder = decoder
    if env.distributed:
        if env.device.type == "cuda":  # BEiT / mmseg use SyncBN across GPUs (PyTorch has it on GPU only)
            decoder = nn.SyncBatchNorm.convert_sync_batchnorm(decoder)
        ids = [env.device.index] if env.device.type == "cuda" else None
        train_decoder = nn.parallel.DistributedDataParallel(decoder, device_ids=ids)
    return SegModel(vit.to(env.device), train_decoder, layers), SegModel(vit, decoder, layers)


def loaders(parts, args, info, env):
    """Training (shuffled; a DistributedSampler under torchrun), validation and test loaders (+ full-size labels)."""
    size, frac = info.img_size, info.crop_frac
    train_ds = SegDataset(parts["train"], args.task, size, crop_frac=frac)
    if args.decoder == "upernet" and min(args.batch_size, len(train_ds) // env.world) < 2:
        raise UserError("UPerNet's BatchNorm needs at least 2 training images per batch and process")
    sampler = (torch.utils.data.DistributedSampler(train_ds, env.world, env.rank, shuffle=True, seed=args.seed)
               if env.distributed else None)
    # BatchNorm cannot train on a last batch of one image (1x1 pooled map): drop a remainder when there are batches
    train_dl = torch.utils.data.DataLoader(train_ds, args.batch_size, shuffle=sampler is None, sampler=sampler,
                                           num_workers=args.num_workers, collate_fn=collate,
                                           drop_last=len(train_ds) > args.batch_size * env.world,
                                           persistent_workers=args.num_workers > 0)
    val_dl, test_dl = (torch.utils.data.DataLoader(SegDataset(parts[k], args.task, size, True, frac), EVAL_BATCH,
                                                   num_workers=args.num_workers, collate_fn=collate)
                       for k in ("val", "test"))
    return train_dl, val_dl, test_dl


def main(argv=None):
    args = get_args(argv)
    if args.compare:
        return compare(args)
    env, t0 = base.setup(args), time.time()
    parts = load_parts(args)
    classes = TASKS[args.task][0]
    n_fg = len(classes)  # foreground classes; the decoder predicts n_fg + 1 with background
    vit, info, name = downstream.load_frozen_encoder(args, env)
    size = info.img_size  # a loaded encoder's own (or --enc_img_size); --img_size shaped a random one
    if size % vit.patch_size:
        raise UserError(f"image size {size} is not a multiple of the encoder's patch size {vit.patch_size}")
    model, eval_model = build(vit, args, n_fg + 1, env)
    decoder, layers, n_params = eval_model.decoder, eval_model.layers, count_params(eval_model.decoder)
    env.print(f"encoder: {info.source}")
    env.print(f"task {args.task}: {', '.join(classes)} | train {len(parts['train'])}, val {len(parts['val'])}, "
              f"test {len(parts['test'])} images | {args.decoder} decoder on blocks {layers}: {n_params:,} "
              f"parameters | {size} px, flips {'on' if args.use_flip else 'off'}")
    mean, std = (torch.tensor(v, device=env.device).view(1, -1, 1, 1) for v in (info.mean, info.std))
    norm = lambda x: (x.expand(-1, mean.shape[1], -1, -1) - mean) / std  # gray -> the encoder's channels
    train_dl, val_dl, test_dl = loaders(parts, args, info, env)

    if env.is_main:  # only rank 0 writes to out_dir
        base.write_args(args, args.out_dir)
    logger = base.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"), enabled=env.is_main)
    ckpt = os.path.join(args.out_dir, "checkpoint.pt")

    def save(**facts):  # the selected decoder, with what it was selected by
        base.refuse_nonfinite(decoder.state_dict().values(), "the decoder")
        if env.is_main:
            base.save_torch({"decoder": decoder.state_dict(), "task": args.task, "classes": classes,
                             "decoder_name": args.decoder, "layers": layers, "encoder": info.source, **facts}, ckpt)
    if args.decoder == "linear":
        fit = fit_linear(eval_model, train_dl.dataset, val_dl.dataset, env, norm, args, logger, save)
    else:
        fit = train_upernet(model, eval_model, train_dl, val_dl, env, norm, n_fg, args, logger, save)
    env.print(fit["convergence"]["note"])
    env.barrier()
    if not env.is_main:
        return None

    decoder.load_state_dict(torch.load(ckpt, map_location=env.device, weights_only=True)["decoder"])
    _, test_dice, kept = evaluate(eval_model, test_dl, env, norm, n_fg, keep=args.n_overlays)
    per_class = nanmean(test_dice, 0)
    mean_dice = nanmean(per_class)
    ci = base.bootstrap_ci(lambda idx: nanmean(nanmean(test_dice[idx], 0)), len(test_dice))["ci95"]
    print_table(f"Segmentation ({args.task}), Dice x100 on the test set ({len(test_dice)} images), {fit['selected']}; "
                f"encoder: {info.source}", name, "UPerNet" if args.decoder == "upernet" else "Linear", n_params,
                classes, per_class, mean_dice, ci)
    res = {"task": args.task, "encoder": info.source, "encoder_format": info.format, "name": name,
           "decoder": args.decoder, "decoder_params": n_params, "layers": layers, "img_size": size,
           "classes": classes, "test": {"n_images": len(test_dice), "mean_dice": mean_dice, "mean_dice_ci95": ci,
                                        "dice": dict(zip(classes, map(float, per_class)))},
           **{k: fit[k] for k in ("best_epoch", "epochs_run", "steps", "best_val_loss", "convergence")},
           "settings": vars(args),
           **{f"n_{k}": len(parts[k]) for k in parts}, "seconds": round(time.time() - t0, 1),
           "protocol": "70/15/15 by subject" if not args.dataset else f"{args.dataset} (archives.py)",
           "preprocess": {k: getattr(info, k) for k in ("img_size", "mean", "std", "crop_frac")},
           "deviations": deviations(args)}
    base.write_json(res, os.path.join(args.out_dir, "results.json"))
    downstream.write_csv([["path", "subject"] + classes + ["mean"]] + [
        [s["path"], s["subject"]] + ["" if np.isnan(v) else f"{v:.6f}" for v in d] + [f"{nanmean(d):.6f}"]
        for s, d in zip(parts["test"], test_dice)], os.path.join(args.out_dir, "per_image_dice.csv"))
    figures.save_overlays(kept, parts["test"], args.out_dir, test_dice)
    print(f"deviations from the paper: {'; '.join(res['deviations']) or 'none'}")
    print(f"wrote results.json, per_image_dice.csv, checkpoint.pt, overlays/ to {args.out_dir}")
    res["baseline"] = downstream.run_baseline(main, args, argv)
    return res


if __name__ == "__main__":
    base.run(main)
