"""
Linear probe: is a frozen encoder's global embedding linearly predictive of findings? (the paper's Tables 3 and 6)

    python probe.py                                    # demo: bundled Kermany X-rays, pneumonia vs normal, CPU
    python probe.py --encoder out/pretrain/encoder.safetensors --csv /data/nih14/labels.csv \\
        --subject_col patient_id --label_cols Atelectasis,Cardiomegaly,Effusion    # 5-fold CV by patient
    python probe.py --dataset vindr --data_dir /data/vindr-cxr/1.0.0   # official split, six findings, 5 seeds
    python probe.py --dataset rsna --data_dir /data/rsna-pneumonia     # 60/20/20 by patient (--protocol cv: 5-fold)
    python probe.py --csv train.csv --val_csv val.csv --test_csv test.csv --label_cols a,b   # fixed splits
    python probe.py --csv t.csv --label_cols finding --task multiclass   # one column of class names
    python probe.py --preset paper ...                # the paper's AdamW head (and how far from converged it stops)
    python probe.py --preset paper --augment ...      # with the paper's augmentations, through the frozen encoder
    python probe.py --encoder A.safetensors --baseline random   # and a random encoder of A's architecture, compared
    python probe.py --compare out/probe_a out/probe_b # paired bootstrap over the test images: is A better than B?
    python probe.py --table out/probe_a out/probe_b   # the paper's Table 3: one row per encoder
    torchrun --nproc_per_node 4 probe.py ...          # images embedded by all ranks; rank 0 trains the heads

The paper's protocol: the encoder is frozen; its global embedding (mean of the final patch tokens for JEPA
encoders, CLS where the encoder has one; --last_layers N concatenates N final layers) of the centre-cropped,
resized image feeds one linear layer: sigmoid + BCE per finding (binary and multi-label), softmax + CE for
multi-class. On frozen features that is a convex problem, so by default it is solved as one: L2-regularised
logistic regression by full-batch L-BFGS to convergence (float64, features streamed to the device in chunks), the
L2 strength chosen per finding on the validation part from a grid (as DINOv2's linear evaluation sweeps its
learning rates; without a fixed validation part by 5-fold cross-validation by subject inside the training part),
then refitted on training + validation. --preset paper trains the head as the paper did instead
(AdamW, lr 5e-5, cosine, batch 96, 100 epochs, best epoch on the validation part; --augment only there) and
reports how far its train loss stopped from the optimum of the same objective. Encoder rankings need a converged
head: an unconverged one ranks the optimiser, not the features. Images are split by subject, never by image.
Protocols (--protocol):
  fixed  a published or given test set (VinDr-CXR's official 15,000 / 3,000 split, --test_csv): heads trained with
         --repeats seeds (default 5), mean ± std over the seeds
  split  --split train/val/test shares by subject (RSNA: 60/20/20, the paper), --repeats seeds
  cv     --folds k-fold cross-validation by subject (the default for a plain --csv and the bundled demo)
The L2 strength is chosen on a fixed validation part (published, --val_csv, or the split protocol's), otherwise by
5-fold cross-validation by subject inside the training part; the SGD head's epoch on a subject-disjoint validation
part of the training part (or the fixed one).

Labels: several 0/1 columns = multi-label, one 0/1 column = binary; anything else in a label column (blank, -1,
NaN, words) is an error unless --task multiclass says the column holds class names. Embeddings are cached under
--feature_cache, keyed by the encoder, the images (path, size, modification time) and the preprocessing.

Writes to --out_dir (default out/probe): results.json (per class and Agg. AUPRC / AUROC: mean, std, per fold or
seed; protocol and its deviations; settings; encoder), results.csv, predictions.csv (per test image and fold: what
--compare reads), pr_curves.png, log.jsonl; --compare writes compare.json.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

import archives
import base
import data
import downstream
import figures
from base import UserError, nanmean
from encoders import DEFAULT_EXPORT
from model import VIT_CONFIGS

DEMO_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", "kermany", "labels.csv")
# converged (the default): the convex head solved to its optimum; paper: the paper's AdamW recipe for the head.
# Both build a random encoder (no --encoder, no pretraining export) as the paper's ViT-B/14 at 224 px.
PRESETS = {"converged": dict(head="lbfgs", model="vit_base", img_size=224, batch_size=96, epochs=100, lr=5e-5),
           "paper": dict(head="sgd", model="vit_base", img_size=224, batch_size=96, epochs=100, lr=5e-5)}
VAL_FRAC = 0.15  # share of a training part's subjects that picks the SGD head's epoch (no fixed validation part)
EXTRACT_BATCH = 64  # images per forward pass of the frozen encoder

# --augment strengths: small, label-preserving changes of a chest X-ray
AUG = dict(flip_p=0.5, rotate_deg=10.0, scale=(0.9, 1.1), translate=0.05, crop_area=(0.8, 1.0),
           brightness=0.1, contrast=(0.9, 1.1), noise_std=0.02)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = downstream.add_data_args(p, "data (default: the bundled Kermany sample, label `pneumonia`, subject "
                                 "`patient`)", ["vindr", "rsna"], "image path, subject, label columns")
    g.add_argument("--label_cols", default=None, help="comma-separated: several 0/1 columns = multi-label, "
                   "one 0/1 column = binary, one column of class names = multi-class (with --task multiclass)")
    g.add_argument("--vindr_consensus", default="majority", choices=["majority", "any"],
                   help="how VinDr's three readers per training image are combined (see archives.load_vindr)")
    g = p.add_argument_group("protocol")
    g.add_argument("--task", default="auto", choices=["auto", "multilabel", "multiclass", "binary"])
    g.add_argument("--protocol", default="auto", choices=["auto", "fixed", "split", "cv"],
                   help="auto: fixed with a test set, split for RSNA, cv otherwise (see above)")
    g.add_argument("--split", default="0.6,0.2,0.2", help="--protocol split: train,val,test shares of the subjects")
    g.add_argument("--folds", type=int, default=5, help="k of k-fold cross-validation by subject")
    g.add_argument("--repeats", type=int, default=5, help="fixed / split: heads trained with this many seeds")
    g.add_argument("--select", default="loss", choices=["loss", "auprc"],
                   help="the L2 strength (or the SGD head's epoch) by validation loss or AUPRC")
    g.add_argument("--weight_decay", type=float, default=0.01,
                   help="SGD head: AdamW's weight decay, also the L2 strength of the objective its gap is measured on")
    g.add_argument("--last_layers", type=int, default=1, help="concatenate the embedding of this many final layers")
    g.add_argument("--augment", action="store_true",
                   help="SGD head only: the paper's training-time augmentations, through the frozen encoder")
    g.add_argument("--feature_cache", default=None, help="embedding cache folder (default: OUT_DIR/features)")
    g = p.add_argument_group("comparing runs")
    g.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                   help="two predictions.csv (or run folders): paired bootstrap, one-tailed 'A better than B'")
    g.add_argument("--table", nargs="+", default=None, metavar="RUN",
                   help="print one table (a row per run folder / results.json) for encoders probed on the same data")
    downstream.add_eval_args(p)
    base.add_common_args(p, "probe")
    base.add_preset_arg(p, PRESETS, "converged (default): the head solved to its optimum; paper: the paper's AdamW "
                                    "head (lr 5e-5, batch 96, 100 epochs)")
    args = base.apply_preset(p.parse_args(argv), PRESETS, "converged")
    base.check(args, *base.COMMON_RULES, "folds >= 2", "repeats >= 1", "weight_decay >= 0", "last_layers >= 1",
               "n_boot >= 1", models=VIT_CONFIGS)
    if args.augment and args.head != "sgd":
        raise UserError("--augment trains through the encoder, one mini-batch at a time: it needs the SGD head "
                        "(--preset paper)")
    try:
        args.split_fracs = [float(v) for v in args.split.split(",")]
        assert len(args.split_fracs) == 3 and min(args.split_fracs) > 0
    except (ValueError, AssertionError):
        raise UserError(f"--split {args.split!r}: three positive shares train,val,test (e.g. 0.6,0.2,0.2)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# data: every source gives generic samples (archives.py); here they become paths, subjects, a label matrix, parts

class Table:
    """labels: (N, C) float 0/1 (one-hot for multi-class; one column for binary). parts: index arrays 'pool'
    (split or cross-validated, or the training part when a test set is fixed) and optional fixed 'val' and 'test'."""

    def __init__(self, paths, subjects, labels, classes, task, part_of, source):
        self.paths, self.subjects = list(paths), np.asarray(subjects, dtype=str)
        self.labels, self.classes, self.task, self.source = np.asarray(labels, np.float32), list(classes), task, source
        part_of = np.asarray(part_of)
        self.parts = {k: np.flatnonzero(part_of == k) for k in ("pool", "val", "test") if (part_of == k).any()}


def csv_samples(args):
    """The generic CSV format of docs/CONVENTIONS.md (and the bundled demo): samples with 'labels' {column: text}."""
    if args.csv is None and (args.val_csv or args.test_csv):
        raise UserError("--val_csv / --test_csv need --csv for the training data")
    demo = args.csv is None
    if not args.label_cols and not demo:
        raise UserError("--csv needs --label_cols (the CSV's label columns, comma-separated)")
    cols = [c.strip() for c in args.label_cols.split(",") if c.strip()] if args.label_cols else ["pneumonia"]
    if len(set(cols)) != len(cols):
        raise UserError(f"--label_cols {args.label_cols!r} names a column twice")
    spec = {"path": args.path_col, "subject": args.subject_col or ("patient" if demo else "subject")}
    out = []
    for part, path in (("train", DEMO_CSV if demo else args.csv), ("val", args.val_csv), ("test", args.test_csv)):
        if path:
            rows, _ = archives.read_csv_samples(path, args.image_root, {**spec, **{f"label:{c}": c for c in cols}},
                                                part=None if part == "train" else part)
            for i, s in enumerate(rows):
                s["labels"], s["where"] = {c: s.pop(f"label:{c}") for c in cols}, f"{path} row {i + 2}"
            out += rows
    return out, f"bundled {DEMO_CSV}" if demo else args.csv


def load_table(args):
    samples, source = archives.load(args.dataset, args) if args.dataset else csv_samples(args)
    task, classes, labels = archives.label_matrix(samples, args.task)
    part_of = [{"val": "val", "test": "test"}.get(s["part"], "pool") for s in samples]
    table = Table([s["path"] for s in samples], [s["subject"] for s in samples], labels, classes, task, part_of,
                  source)
    missing = [p for p in table.paths if not os.path.exists(p)]
    if missing:
        raise UserError(f"{len(missing)} of {len(table.paths)} images not found, e.g. {missing[0]} "
                        f"(check --image_root / --data_dir)")
    return table


def protocol_of(table, args):
    if args.protocol != "auto":
        if (args.protocol == "fixed") != ("test" in table.parts):
            raise UserError(f"--protocol {args.protocol} and the data disagree: 'fixed' is for a test set (--test_csv "
                            f"or an official split), 'split' / 'cv' make one (and would leave a given one unused)")
        return args.protocol
    return "fixed" if "test" in table.parts else "split" if args.dataset == "rsna" else "cv"


def make_splits(table, args):
    """(train, val, test) index arrays per fold or seed, subject-disjoint (checked); see the protocols above."""
    subj, pool, proto = table.subjects, table.parts["pool"], protocol_of(table, args)

    def inner(train, seed):
        if "val" in table.parts:
            return train, table.parts["val"]
        tr, va = data.split_by_subject(subj[train], fractions=(1 - VAL_FRAC, VAL_FRAC), seed=seed)
        return train[tr], train[va]

    if proto == "fixed":
        test = table.parts["test"]
        splits = [(*inner(pool, args.seed + r), test) for r in range(args.repeats)]
    elif proto == "split":  # one subject split (the seed's); the heads then vary with the repeat's seed
        tr, va, te = data.split_by_subject(subj[pool], args.split_fracs, seed=args.seed)
        splits = [(pool[tr], pool[va] if "val" not in table.parts else table.parts["val"], pool[te])] * args.repeats
    else:
        folds = data.kfold_by_subject(subj[pool], k=args.folds, seed=args.seed)
        splits = [(*inner(pool[tr], args.seed + k), pool[te]) for k, (tr, te) in enumerate(folds)]
    for tr, va, te in splits:
        data.check_disjoint(subj, tr, va, te)  # e.g. one patient in both --csv and --test_csv
        if min(len(tr), len(va), len(te)) == 0:
            raise UserError(f"an empty split (train {len(tr)}, val {len(va)}, test {len(te)} images): too few subjects")
    return splits


# ----------------------------------------------------------------------------------------------------------------
# features: the frozen encoder's global embedding, once per image (cached) or per augmented batch

def cache_file(info, table, args, env):
    """Named by everything that changes an embedding: the encoder (file identity, or the random-init recipe), the
    images (path, size and modification time: a file rewritten in place gets a new key), the preprocessing, the
    layers pooled and the precision."""
    enc, path = info["source"], args.encoder or (DEFAULT_EXPORT if info["format"] != "random-init" else None)
    if path and os.path.exists(path):  # a retrained file (or folder of files) at the same path gets a new key
        files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
        enc = [info["format"]] + downstream.file_identity(files)
    key = json.dumps([enc, args.model, args.patch_size, info["img_size"], info["mean"], info["std"],
                      info.get("crop_frac", 1.0), args.last_layers, str(env.dtype),
                      sorted(downstream.file_identity(table.paths))])
    return os.path.join(args.feature_cache or os.path.join(args.out_dir, "features"),
                        hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")


@torch.no_grad()
def embed(vit, x, env, args):
    with env.autocast():
        return vit.global_embedding(x.to(env.device, non_blocking=True), last_layers=args.last_layers).float()


def extract_features(vit, info, table, args, env):
    """(N, D) embeddings of table.paths in order, cached (downstream.encode_images); None on ranks other than 0."""
    return downstream.encode_images(table.paths, info, lambda x: embed(vit, x, env, args), env, EXTRACT_BATCH,
                                args.num_workers, cache=cache_file(info, table, args, env))


def augment(x, g):
    """The paper's training-time augmentations on a batch x (B, C, H, W) in [0, 1], per image: horizontal flip,
    small affine (rotation, scale, translation) and a random crop, folded into one affine resampling; then
    brightness / contrast jitter and Gaussian noise. Random numbers come from the CPU generator g (reproducible)."""
    B = x.shape[0]

    def u(lo, hi):
        return (lo + (hi - lo) * torch.rand(B, generator=g)).to(x.device)

    a, s = u(-AUG["rotate_deg"], AUG["rotate_deg"]) * math.pi / 180, u(*AUG["scale"])
    c = u(*AUG["crop_area"]).sqrt()  # side of the crop as a fraction of the image's
    flip = torch.where(u(0, 1) < AUG["flip_p"], -1.0, 1.0)
    # affine_grid maps output coordinates in [-1, 1] to input ones: in = c R(a) / s (flip x, y) + offset, so c < 1
    # reads a crop, s > 1 zooms in, and the offset moves the crop (inside the image) plus a small translation
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = c * torch.cos(a) / s * flip, -c * torch.sin(a) / s
    theta[:, 1, 0], theta[:, 1, 1] = c * torch.sin(a) / s * flip, c * torch.cos(a) / s
    for k in (0, 1):
        theta[:, k, 2] = u(-1, 1) * (1 - c) + u(-2 * AUG["translate"], 2 * AUG["translate"])
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(*AUG["contrast"]).view(B, 1, 1, 1) + mean + u(-1, 1).view(B, 1, 1, 1) * AUG["brightness"]
    return (x + AUG["noise_std"] * torch.randn(x.shape, generator=g).to(x.device)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# the linear head: one objective, solved to convergence (L-BFGS, the default) or trained as the paper did (AdamW)
#
# Objective: the sum over labels of each label's mean loss over the rows where it is known (sigmoid + BCE; NaN =
# not labelled), or the mean softmax CE (multi-class), + sum_c lam_c / 2 * ||W[:, c]||^2 (biases free). Labels
# decouple, so column c is label c's own logistic regression (scikit-learn's C = 1 / (lam_c * n_c)) and lam is
# chosen per label; multi-class shares one lam.

# The L2 strengths (downstream.L2_GRID) are swept strongest first; the sweep stops once downstream.PATIENCE strengths in a
# row improve no label.
GAP_TOL = 1e-3  # an SGD head whose train objective stops further than this above the optimum is flagged
CHUNK = 65536  # rows per transfer to the device: the objective streams any number of cached features


def head_loss(logits, y, task, counts):
    """The data term of the objective above on one block of rows; counts: known rows per label of the whole set
    being averaged over (so that blocks, or mini-batches, add up to its mean)."""
    if task == "multiclass":
        return F.cross_entropy(logits, y.argmax(1), reduction="sum") / counts[0]
    known = ~torch.isnan(y)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none")
    return (torch.where(known, loss, 0.0).sum(0) / counts.clamp_min(1)).sum()


def known_counts(y, task):
    return (~torch.isnan(y).any(1)).sum().reshape(1) if task == "multiclass" else (~torch.isnan(y)).sum(0)


def probabilities(logits, task):
    return logits.softmax(-1) if task == "multiclass" else torch.sigmoid(logits)


def objective(W, b, X, Y, rows, task, lam, norm, grad=True):
    """Objective of the head (W, b) on X[rows] (standardised by norm = (mean, std)), streamed to W's device in
    CHUNK-row blocks; with grad, its gradient is accumulated into W.grad and b.grad."""
    counts = known_counts(Y[rows], task).to(W)
    total = torch.zeros((), dtype=W.dtype, device=W.device)
    for i in range(0, len(rows), CHUNK):
        r = rows[i:i + CHUNK]
        x = ((X[r] - norm[0]) / norm[1]).to(W.device, W.dtype)
        with torch.set_grad_enabled(grad):
            loss = head_loss(x @ W + b, Y[r].to(W.device, W.dtype), task, counts)
        if grad:
            loss.backward()
        total += loss.detach()
    with torch.set_grad_enabled(grad):
        pen = 0.5 * (lam * (W * W).sum(0)).sum()
    if grad:
        pen.backward()
    return total + pen.detach()


def fit_lbfgs(X, Y, rows, task, lam, norm, init):
    """Minimise the objective from init = (W, b) (a warm start) by L-BFGS to convergence (downstream.lbfgs). Returns
    (W, b, convergence facts)."""
    W, b = (t.detach().clone().requires_grad_(True) for t in init)
    facts = downstream.lbfgs([W, b], lambda: objective(W, b, X, Y, rows, task, lam, norm))
    return W.detach(), b.detach(), facts


def predict(W, b, X, rows, task, norm):
    with torch.no_grad():
        return torch.cat([probabilities(((X[rows[i:i + CHUNK]] - norm[0]) / norm[1]).to(W) @ W + b, task)
                          for i in range(0, len(rows), CHUNK)]).cpu().numpy()


def val_scores(P, y, task, select):
    """Per label (one value for multi-class) the validation score to maximise, minus the loss or the AUPRC, of
    probabilities P for labels y; and the mean loss and AUPRC for the log."""
    y = np.asarray(y, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if task == "multiclass":
            loss = np.array([-np.mean(np.log(np.clip(P[np.arange(len(y)), y.argmax(1)], 1e-300, None)))])
        else:
            p = np.clip(P, 1e-15, 1 - 1e-15)
            loss = np.nanmean(-(y * np.log(p) + (1 - y) * np.log(1 - p)), axis=0)
    ap = fast_metrics(y, P)[0]
    if select == "auprc":
        ap = [nanmean(ap)] if task == "multiclass" else ap
        return np.where(np.isfinite(ap), ap, -loss), float(np.mean(loss)), nanmean(ap)
    return -loss, float(np.mean(loss)), nanmean(ap)


def selection_folds(tr, va, subjects, fixed_val, seed):
    """Where the L2 strength is scored: a fixed validation part as it is (published, --val_csv, the 'split'
    protocol's); otherwise 5-fold cross-validation by subject inside the training part (train + the inner split),
    its validation predictions pooled: a 15% split of a few hundred images is too noisy to choose by."""
    if fixed_val:
        return [(tr, va)]
    pool = np.concatenate([tr, va])
    k = min(5, len(set(subjects[pool])))
    if k < 2:
        raise UserError(f"the training part holds {k} subject(s): too few to choose the head's L2 strength")
    return [(pool[a], pool[b]) for a, b in data.kfold_by_subject(subjects[pool], k=k, seed=seed)]


def fit_converged(X, Y, folds, task, norm, device, select="loss", log=None, fold=0):
    """The default head: for each strength of downstream.L2_GRID (strongest first, each fit warm-starting the next) the
    optimum on the training rows of every selection fold, scored on their validation rows pooled; per label the
    best strength; then the optimum at those strengths on all rows of the folds. Returns (W, b, head facts)."""
    D, K = X.shape[1], Y.shape[1]
    zero = (torch.zeros(D, K, dtype=torch.float64, device=device), torch.zeros(K, dtype=torch.float64, device=device))
    inits, held = [zero] * len(folds), np.concatenate([va for _, va in folds])
    best, since = None, 0
    for step, l2 in enumerate(downstream.L2_GRID, start=1):
        lam = torch.full((K,), float(l2), dtype=torch.float64, device=device)
        fits = [fit_lbfgs(X, Y, tr, task, lam, norm, init) for (tr, _), init in zip(folds, inits)]
        inits = [(W, b) for W, b, _ in fits]
        P = np.concatenate([predict(W, b, X, va, task, norm) for (W, b, _), (_, va) in zip(fits, folds)])
        score, val_loss, val_ap = val_scores(P, Y[held].numpy(), task, select)
        better = np.ones(len(score), bool) if best is None else score > best[0]
        best = (score, np.full(len(score), l2)) if best is None else \
            (np.where(better, score, best[0]), np.where(better, l2, best[1]))
        since = 0 if better.any() else since + 1
        if log is not None:
            log.log(step=step, fold=fold, l2=float(l2), loss=float(np.mean([f["objective"] for *_, f in fits])),
                    val_loss=val_loss, val_auprc=val_ap if np.isfinite(val_ap) else None,
                    iterations=sum(f["iterations"] for *_, f in fits))
        if since >= downstream.PATIENCE:
            break
    chosen = np.broadcast_to(best[1], (K,)) if task == "multiclass" else best[1]
    lam = torch.tensor(chosen, dtype=torch.float64, device=device)
    rows = np.unique(np.concatenate([np.concatenate(f) for f in folds]))
    W, b, facts = fit_lbfgs(X, Y, rows, task, lam, norm, inits[0])
    how = "the validation part" if len(folds) == 1 else f"{len(folds)}-fold cross-validation by subject"
    return W, b, {"solver": "lbfgs", "l2": [float(v) for v in chosen], "l2_chosen_by": how, **facts}


def train_sgd(batches, steps_per_epoch, X, Y, tr, va, task, norm, args, env, log, fold):
    """The paper's head: AdamW + cosine over all steps; after each epoch the validation part is scored and the
    best epoch's weights (by --select) are kept. Then its gap: its train objective (lam = --weight_decay, on the
    un-augmented training features) against the optimum of that same objective."""
    D, K = X.shape[1], Y.shape[1]
    W = torch.zeros(D, K, dtype=torch.float32, device=env.device, requires_grad=True)
    b = torch.zeros(K, dtype=torch.float32, device=env.device, requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=args.lr, weight_decay=args.weight_decay)
    total = args.max_steps or args.epochs * steps_per_epoch
    best, step = None, 0
    for epoch in range(math.ceil(total / steps_per_epoch)):
        losses = []
        for x, y in batches(epoch):
            for gr in opt.param_groups:  # cosine from lr to 0 over the whole run
                gr["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = head_loss(x @ W + b, y, task, known_counts(y, task))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
        P = predict(W.detach().double(), b.detach().double(), X, va, task, norm)
        score, val_loss, val_ap = val_scores(P, Y[va].numpy(), task, args.select)
        if best is None or score.mean() > best[0]:
            best = (score.mean(), epoch, W.detach().double().clone(), b.detach().double().clone())
        log.log(step=step, loss=float(np.mean(losses)), fold=fold, epoch=epoch, val_loss=val_loss,
                val_auprc=val_ap if np.isfinite(val_ap) else None, lr=opt.param_groups[0]["lr"])
        if step >= total:
            break
    _, epoch, W, b = best
    lam = torch.full((K,), args.weight_decay, dtype=torch.float64, device=env.device)
    f = float(objective(W, b, X, Y, tr, task, lam, norm, grad=False))
    optimum = fit_lbfgs(X, Y, tr, task, lam, norm, (W, b))[2]["objective"]
    return W, b, {"solver": "adamw", "best_epoch": epoch, "objective": f, "optimum": optimum, "gap": f - optimum,
                  "converged": f - optimum <= GAP_TOL}


# ----------------------------------------------------------------------------------------------------------------
# metrics: scikit-learn for the reported numbers; a vectorised equivalent for thousands of bootstrap resamples

def metrics(Y, P):
    """Per class AUPRC (average precision) and AUROC from scikit-learn over the rows where that class is labelled
    (NaN: not labelled); 'Agg.' = their mean over the classes with both positives and negatives there (a class
    without positives has no AUPRC / AUROC: NaN)."""
    ap, auc = [], []
    for c in range(Y.shape[1]):
        known = np.isfinite(Y[:, c])
        y, p = Y[known, c], P[known, c]
        ok = 0 < y.sum() < len(y)
        ap.append(float(average_precision_score(y, p)) if ok else math.nan)
        auc.append(float(roc_auc_score(y, p)) if ok else math.nan)
    return {"auprc": ap, "auroc": auc, "agg_auprc": nanmean(ap), "agg_auroc": nanmean(auc)}


def fast_metrics(Y, P):
    """scikit-learn's AUPRC and AUROC (ties included) for all classes at once in float64 numpy: AUROC = Mann-Whitney
    U with average ranks; AP = sum over distinct thresholds of (recall step) x precision. NaN where undefined. A
    column with unlabelled rows (NaN) is scored over its labelled rows."""
    Y, P = np.asarray(Y, np.float64), np.asarray(P, np.float64)
    if np.isnan(Y).any():
        cols = [fast_metrics(Y[np.isfinite(Y[:, c]), c:c + 1], P[np.isfinite(Y[:, c]), c:c + 1])
                for c in range(Y.shape[1])]
        return np.array([a[0] for a, _ in cols]), np.array([u[0] for _, u in cols])
    n, pos = len(Y), Y.sum(0)
    valid = (pos > 0) & (pos < n)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = ((rankdata(P, axis=0) * Y).sum(0) - pos * (pos + 1) / 2) / (pos * (n - pos))
    auroc[~valid] = np.nan
    ap = np.full(Y.shape[1], np.nan)
    for c in np.flatnonzero(valid):
        order = np.argsort(-P[:, c], kind="mergesort")
        p, y = P[order, c], Y[order, c]
        last = np.r_[np.flatnonzero(np.diff(p)), n - 1]  # the last item of each run of tied scores
        tp = np.cumsum(y)[last]
        ap[c] = np.sum(np.diff(np.r_[0.0, tp / pos[c]]) * tp / (last + 1))
    return ap, auroc


# ----------------------------------------------------------------------------------------------------------------
# outputs: the paper's table, results.json / .csv, predictions.csv, PR curves

def summarise(per_fold, classes):
    def stat(v):  # std over folds with ddof=0; a fold where the metric is undefined (no positives) is left out
        f = np.asarray(v, dtype=float)[np.isfinite(v)]
        return {"mean": float(f.mean()) if len(f) else math.nan, "std": float(f.std()) if len(f) else math.nan,
                "folds": [float(x) for x in v]}

    out = {m: {c: stat([f[m][i] for f in per_fold]) for i, c in enumerate(classes)} for m in ("auprc", "auroc")}
    out["agg"] = {m: stat([f["agg_" + m] for f in per_fold]) for m in ("auprc", "auroc")}
    return out


def print_table(rows, classes, metric, n_folds, unit="fold"):
    """Laid out like the paper's Table 3: a row per encoder, a column per class and Agg., cells mean ± std."""
    cols = classes + ["Agg."]
    w = [max([24] + [len(r["name"]) for r in rows])] + [max(11, len(c)) for c in cols]
    cell = lambda s: "-" if s["mean"] is None or not np.isfinite(s["mean"]) else f"{s['mean']:.3f}±{s['std']:.3f}"
    print(f"\n{metric.upper()} (mean ± std over {n_folds} {unit}{'s' * (n_folds > 1)})")
    print(" | ".join(s.ljust(k) for s, k in zip(["Encoder"] + cols, w)))
    print("-+-".join("-" * k for k in w))
    for r in rows:
        cells = [cell(r[metric][c]) for c in classes] + [cell(r["agg"][metric])]
        print(" | ".join(s.ljust(k) for s, k in zip([r["name"]] + cells, w)))


def write_outputs(res, table, preds, out_dir):
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["encoder", "metric", "class", "mean", "std"] + [f"fold_{k}" for k in range(len(preds))])
        for m in ("auprc", "auroc"):
            for c in res["classes"] + ["Agg."]:
                s = res["agg"][m] if c == "Agg." else res[m][c]
                w.writerow([res["name"], m, c, s["mean"], s["std"]] + s["folds"])
    with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "subject", "fold"] + [f"{k}_{c}" for k in ("label", "prob") for c in table.classes])
        for fold, idx, P in preds:
            for i, p in zip(idx, P):
                w.writerow([table.paths[i], table.subjects[i], fold] + ["" if np.isnan(v) else int(v) for v in
                                                                        table.labels[i]] + [repr(float(v)) for v in p])
    base.write_json(res, os.path.join(out_dir, "results.json"))


# ----------------------------------------------------------------------------------------------------------------
# comparing two encoders: a paired bootstrap over the same test images (the paper's Table 6)

def load_predictions(path):
    path = os.path.join(path, "predictions.csv") if os.path.isdir(path) else path
    rows = data.read_csv(path, required=["path"])
    classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    if not classes or any("label_" + c not in rows[0] for c in classes):
        raise UserError(f"{path}: no label_* / prob_* columns; pass a predictions.csv written by probe.py")
    by_path = {}  # an image's rows from several seeds (--repeats) are averaged into one prediction
    for r in rows:
        y = [float(r["label_" + c]) if r["label_" + c] != "" else math.nan for c in classes]  # blank: unlabelled
        p = [float(r["prob_" + c]) for c in classes]
        by_path.setdefault(r["path"], (y, []))[1].append(p)
    paths = sorted(by_path)
    Y, P = np.array([by_path[k][0] for k in paths]), np.array([np.mean(by_path[k][1], 0) for k in paths])
    return path, paths, classes, Y, P


def compare(args):
    pa, paths, cls, Ya, Pa = load_predictions(args.compare[0])
    pb, paths_b, cls_b, Yb, Pb = load_predictions(args.compare[1])
    if cls != cls_b:
        raise UserError(f"{pa} and {pb} predict different classes ({cls} vs {cls_b})")
    downstream.same_items(pa, paths, pb, paths_b)
    if not np.array_equal(Ya, Yb, equal_nan=True):
        raise UserError(f"{pa} and {pb} disagree on the labels of the same images")
    memo = {}

    def all_metrics(idx):  # both runs' metrics on one resample, computed once and shared by every test below
        key = hashlib.sha1(np.ascontiguousarray(idx)).digest()
        if key not in memo:
            memo[key] = (fast_metrics(Ya[idx], Pa[idx]), fast_metrics(Yb[idx], Pb[idx]))
        return memo[key]

    def stat_for(m, c):  # c None: Agg., the mean over classes
        def stat(idx):
            a, b = all_metrics(idx)
            return (nanmean(a[m]), nanmean(b[m])) if c is None else (a[m][c], b[m][c])
        return stat

    stats = {(m, cname): stat_for(i, c) for i, m in enumerate(("auprc", "auroc"))
             for c, cname in list(enumerate(cls)) + [(None, "Agg.")]}
    return downstream.paired_compare(args, pa, pb, stats, len(paths))


def unit_of(protocol):
    return "fold" if "cross-validation" in protocol else "seed"


def deviations(args, proto):
    """What this run does differently from the paper's section 6 protocol (printed and in results.json)."""
    out = ["features standardised with the training part's mean / std (a fixed affine map, still linear)"]
    if args.head == "lbfgs":
        out.append("head: L2-regularised logistic regression solved to convergence by L-BFGS, the L2 strength per "
                   "label chosen on the validation part (without a fixed one: 5-fold cross-validation by subject in "
                   "the training part), refitted on training + validation (the paper: AdamW, lr "
                   "5e-5, 100 epochs; --preset paper); no training-time augmentation")
    elif args.augment:
        out.append("training-time augmentations through the frozen encoder: " + ", ".join(f"{k} {v}" for k, v in
                                                                                         AUG.items()))
    if args.max_steps is not None and args.head == "sgd":
        out.append(f"--max_steps {args.max_steps} head steps (the paper: {args.epochs} epochs)")
    if args.dataset == "vindr":
        out.append(f"VinDr training labels: {args.vindr_consensus} of the three readers (the paper does not say)")
    if args.dataset == "rsna" and proto != "split":
        out.append(f"RSNA with --protocol {proto} (the paper: a 60/20/20 split by subject)")
    if proto in ("fixed", "split") and args.repeats != 5:
        out.append(f"{args.repeats} seed(s) (the paper: 5)")
    return out


def table_of_runs(runs):
    res = [json.load(open(os.path.join(r, "results.json") if os.path.isdir(r) else r)) for r in runs]
    if any(r["classes"] != res[0]["classes"] for r in res):
        raise UserError("--table: the runs have different classes; tabulate runs on the same data together")
    for metric in ("auprc", "auroc"):
        print_table(res, res[0]["classes"], metric, len(res[0]["per_fold"]), unit_of(res[0]["protocol"]))
    return res


def run_folds(feats, table, splits, vit, info, args, env, log):
    """Fit, select and test one head per split; returns per-fold metrics and (fold, test indices, probabilities)."""
    X, Y = feats, torch.from_numpy(table.labels)
    # --augment works on [0, 1] images and normalises after augmenting, with the encoder's own statistics
    raw = {**info, "mean": [0.0] * len(info["mean"]), "std": [1.0] * len(info["std"])}
    mean, std = (torch.tensor(info[k], device=env.device).view(1, -1, 1, 1) for k in ("mean", "std"))
    bs, per_fold, preds = args.batch_size, [], []
    for k, (tr, va, te) in enumerate(splits):
        g = torch.Generator().manual_seed(args.seed + 1000 * k)
        # standardised with the training part's statistics: a fixed affine map, so the probe stays linear, and one
        # L2 grid (or one AdamW lr) suits every encoder whatever the raw scale of its features
        rows = tr if args.head == "sgd" else np.concatenate([tr, va])  # what the head is finally fitted on
        norm = (X[rows].mean(0), X[rows].std(0).clamp_min(1e-6))
        dev = lambda t: t.to(env.device, torch.float32)  # noqa: E731

        def batches(epoch):  # one epoch of (features, labels) of the training part, in a fresh order
            order = tr[torch.randperm(len(tr), generator=g).numpy()]
            if not args.augment:
                for i in range(0, len(order), bs):
                    yield dev((X[order[i:i + bs]] - norm[0]) / norm[1]), dev(Y[order[i:i + bs]])
                return
            for i, (x, _) in enumerate(downstream.image_batches([table.paths[j] for j in order], raw, bs,
                                                            args.num_workers)):
                f = embed(vit, (augment(x.to(env.device), g) - mean) / std, env, args)
                yield (f - dev(norm[0])) / dev(norm[1]), dev(Y[order[i * bs:(i + 1) * bs]])

        if args.head == "lbfgs":
            folds = selection_folds(tr, va, table.subjects, "val" in table.parts or protocol_of(table, args) == "split",
                                    args.seed + k)
            W, b, head = fit_converged(X, Y, folds, table.task, norm, env.device, args.select, log, k)
        else:
            W, b, head = train_sgd(batches, math.ceil(len(tr) / bs), X, Y, tr, va, table.task, norm, args, env, log, k)
        P = predict(W, b, X, te, table.task, norm)
        m = metrics(table.labels[te], P)
        per_fold.append({"fold": k, "n_train": len(tr), "n_val": len(va), "n_test": len(te), "head": head, **m})
        preds.append((k, te, P))
        how = (f"L2 {', '.join(f'{v:.0e}' for v in sorted(set(head['l2'])))} by {head['l2_chosen_by']}, "
               f"{head['iterations']} L-BFGS iterations"
               if args.head == "lbfgs" else f"best epoch {head['best_epoch']}, train objective {head['objective']:.4f} "
               f"vs optimum {head['optimum']:.4f}")
        env.print(f"fold {k}: train {len(tr)} val {len(va)} test {len(te)} images, {how}: "
                  f"Agg. AUPRC {m['agg_auprc']:.3f} AUROC {m['agg_auroc']:.3f}")
    return per_fold, preds


def convergence(per_fold, head):
    """How far each fold's head stopped from the optimum of its own objective, and a warning past GAP_TOL."""
    heads = [f["head"] for f in per_fold]
    if head == "lbfgs":
        out = {"solver": "lbfgs", "grad_max": max(h["grad_max"] for h in heads), "gap": 0.0,
               "converged": all(h["converged"] for h in heads)}
        out["note"] = (f"head converged in every fold (largest gradient entry {out['grad_max']:.1e})"
                       if out["converged"] else f"WARNING: L-BFGS stopped with a gradient entry of "
                       f"{out['grad_max']:.1e} > {downstream.GRAD_TOL:g}: the head may not be at its optimum")
        return out
    gaps = [h["gap"] for h in heads]
    out = {"solver": "adamw", "objective": [h["objective"] for h in heads], "optimum": [h["optimum"] for h in heads],
           "gap": max(gaps), "converged": max(gaps) <= GAP_TOL}
    per = "; ".join(f"{h['objective']:.4f} vs {h['optimum']:.4f}" for h in heads)
    out["note"] = (f"head train objective vs its optimum, per fold: {per}" + ("" if out["converged"] else
                   f". WARNING: the head stopped up to {max(gaps):.3f} above the optimum of its own objective (more "
                   f"than {GAP_TOL:g}): its scores rank the optimiser as much as the features; the default head "
                   "(--preset converged) solves it"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the quick probe pretraining runs during training (pretrain.py --probe_every): seconds, not the full protocol

_QUICK_IMAGES = {}  # (csv, label, subject, img_size) -> (images, labels, subjects): decoded once per process


def quick_probe(vit, csv_path=DEMO_CSV, label_col="pneumonia", subject_col="patient", folds=5, batch_size=64):
    """Cross-validated AUROC of the probe's converged head (fit_converged: the L2 strength chosen by 5-fold
    cross-validation by subject inside each training part, then refitted) on the frozen `vit`'s global embedding,
    for the 0/1 column `label_col` of `csv_path` (default: the bundled Kermany sample, pneumonia vs normal). Folds are fixed and by
    subject (data.kfold_by_subject, seed 0), so two calls on two encoders see the same splits; the images are resized
    (no crop) to the encoder's resolution and decoded only once per process. Returns the mean AUROC over folds
    (folds whose test part holds one class only are left out). A signal during pretraining: the full protocol
    (probe.py itself) is what to report."""
    key = (os.path.abspath(csv_path), label_col, subject_col, vit.grid[0] * vit.patch_size)
    if key not in _QUICK_IMAGES:
        rows = data.read_csv(csv_path, required=["path", label_col, subject_col])
        pre = data.Preprocess(key[3])
        try:
            x = torch.stack([pre(data.read_image(data.resolve(csv_path, None, r["path"]))) for r in rows])
        except data.ImageReadError as e:
            raise UserError(f"quick probe: {e}")
        y = np.array([archives.as_01(r[label_col], f"{csv_path} row {i + 2}") for i, r in enumerate(rows)], np.int64)
        if len(set(y.tolist())) < 2:
            raise UserError(f"quick probe: {csv_path} column {label_col} has one class only; AUROC needs both")
        _QUICK_IMAGES[key] = (x, y, np.array([r[subject_col] for r in rows]))
    x, y, subjects = _QUICK_IMAGES[key]
    was_training = vit.training
    vit.eval()
    with torch.no_grad():
        feats = torch.cat([vit.global_embedding(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])
    vit.train(was_training)
    Y, cpu = torch.tensor(y, dtype=torch.float32)[:, None], torch.device("cpu")
    aucs = []
    for k, (train, test) in enumerate(data.kfold_by_subject(subjects, k=folds, seed=0)):
        if len(set(y[test].tolist())) < 2 or len(set(y[train].tolist())) < 2:
            continue
        norm = (feats[train].mean(0), feats[train].std(0).clamp_min(1e-6))
        W, b, _ = fit_converged(feats, Y, selection_folds(train, train[:0], subjects, False, k), "binary", norm, cpu)
        aucs.append(roc_auc_score(y[test], predict(W, b, feats, test, "binary", norm)[:, 0]))
    return float(np.mean(aucs)) if aucs else float("nan")


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    if args.compare:
        return compare(args)
    if args.table:
        return table_of_runs(args.table)
    env = base.setup(args)
    t0 = time.time()
    table = load_table(args)
    splits, proto = make_splits(table, args), protocol_of(table, args)
    protocol = {"fixed": f"fixed test set, {args.repeats} seed(s)", "cv": f"{args.folds}-fold cross-validation by "
                "subject", "split": f"{args.split} split by subject, {args.repeats} seed(s)"}[proto]
    vit, info, name = downstream.load_frozen_encoder(args, env)
    vit.to(env.device)
    env.print(f"encoder: {info['source']}")
    env.print(f"data: {table.source}: {len(table.paths)} images, {len(set(table.subjects))} subjects, "
              f"{table.task} {table.classes}; {len(splits)} split(s); {info['img_size']} px, mean {info['mean']} "
              f"std {info['std']}")
    feats = extract_features(vit, info, table, args, env)
    if not env.is_main:
        return None  # the heads are tiny: rank 0 trains them all
    os.makedirs(args.out_dir, exist_ok=True)
    log = base.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"))
    threads = torch.get_num_threads()
    # a small head's matmuls gain nothing from threads, which only add synchronisation (10x slower on a busy CPU)
    torch.set_num_threads(1 if env.device.type == "cpu" and not args.augment and len(feats) < 20000 else threads)
    try:
        per_fold, preds = run_folds(feats, table, splits, vit, info, args, env, log)
    finally:
        torch.set_num_threads(threads)
    res = {"name": name, "encoder": info["source"], "encoder_format": info["format"], "task": table.task,
           "classes": table.classes, **summarise(per_fold, table.classes), "per_fold": per_fold,
           "protocol": protocol, "convergence": convergence(per_fold, args.head), "deviations": deviations(args, proto),
           "data": {"source": table.source, "n_images": len(table.paths), "n_subjects": len(set(table.subjects)),
                    "positives": {c: int(table.labels[:, i].sum()) for i, c in enumerate(table.classes)}},
           "preprocess": {k: info[k] for k in ("img_size", "mean", "std", "crop_frac")}, "feature_dim": int(feats.shape[1]),
           "settings": vars(args), "time_s": round(time.time() - t0, 1)}
    for metric in ("auprc", "auroc"):
        print_table([res], table.classes, metric, len(splits), unit_of(res["protocol"]))
    print(f"encoder: {info['source']}\n{res['convergence']['note']}\nprotocol: {protocol}; deviations from the "
          f"paper: {'; '.join(res['deviations']) or 'none'}")
    write_outputs(res, table, preds, args.out_dir)
    figures.draw_pr_curves(np.concatenate([table.labels[te] for _, te, _ in preds]), np.concatenate([P for *_, P in preds]),
                   table.classes, f"{name}: {table.source}", os.path.join(args.out_dir, "pr_curves.png"))
    print(f"wrote results.json, results.csv, predictions.csv, pr_curves.png to {args.out_dir}")
    res["baseline"] = downstream.run_baseline(main, args, argv)
    return res


if __name__ == "__main__":
    base.run(main)
