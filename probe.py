"""
Linear probe: is a frozen encoder's global embedding linearly predictive of findings? (the paper's Tables 3 and 6)

    python probe.py                                    # demo: bundled Kermany X-rays, pneumonia vs normal, CPU
    python probe.py --encoder out/pretrain/encoder.safetensors --csv /data/nih14/labels.csv \\
        --subject_col patient_id --label_cols Atelectasis,Cardiomegaly,Effusion    # 5-fold CV by patient
    python probe.py --dataset vindr --data_dir /data/vindr-cxr/1.0.0   # official split, six findings, 5 seeds
    python probe.py --dataset rsna --data_dir /data/rsna-pneumonia     # 60/20/20 by patient (--protocol cv: 5-fold)
    python probe.py --dataset chexpert --data_dir /data/CheXpert-v1.0 --uncertain ones   # valid.csv as the test set
    python probe.py --dataset nih --data_dir /data/nih14     # also mimic_cxr, padchest: the archives' own label files
    python probe.py --csv train.csv --val_csv val.csv --test_csv test.csv --label_cols a,b   # fixed splits
    python probe.py --csv t.csv --label_cols finding --task multiclass   # one column of class names
    python probe.py --preset paper [--augment] ...    # the paper's AdamW head (and how far from converged it stops)
    python probe.py --encoder A.safetensors --baseline random   # and a random encoder of A's architecture, compared
    python probe.py --compare out/probe_a out/probe_b # paired bootstrap over the test images: is A better than B?
    python probe.py --table out/probe_a out/probe_b   # the paper's Table 3: one row per encoder
    torchrun --nproc_per_node 4 probe.py ...          # images embedded by all ranks; rank 0 trains the heads

One linear layer on the frozen global embedding (sigmoid + BCE per finding, softmax + CE for classes) is a convex
problem, so by default it is solved (L-BFGS to convergence, the L2 strength per finding chosen on a validation
part): an unconverged head, like the paper's AdamW one (--preset paper, which reports how far it stopped), ranks
the optimiser, not the features. Images are split by subject; writes results.json, results.csv, predictions.csv
(what --compare reads), pr_curves.png and log.jsonl to --out_dir.
"""
import dataclasses
import hashlib
import json
import math
import os
import time
from itertools import islice
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

import archives
import base
import data
import downstream
import figures
from base import UserError, nanmean
from downstream import (fast_metrics, fit_converged, fit_lbfgs, head_loss, known_counts, objective, predict,
                        selection_folds, val_scores)
from encoders import DEFAULT_EXPORT
from model import VIT_CONFIGS

DEMO_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", "kermany", "labels.csv")
# converged (the default): the convex head solved to its optimum; paper: the paper's AdamW recipe for the head.
# Both build a random encoder (no --encoder, no pretraining export) as the paper's ViT-B/14 at 224 px.
PRESETS = {"converged": dict(head="lbfgs", model="vit_base", img_size=224, batch_size=96, epochs=100, lr=5e-5),
           "paper": dict(head="sgd", model="vit_base", img_size=224, batch_size=96, epochs=100, lr=5e-5)}
UNCERTAIN_LAYOUTS = ("chexpert", "mimic_cxr")  # the layouts whose labels have -1 (uncertain): --uncertain applies
VAL_FRAC = 0.15  # share of a training part's subjects that picks the SGD head's epoch (no fixed validation part)
EXTRACT_BATCH = 64  # images per forward pass of the frozen encoder
AUG = dict(flip_p=0.5, rotate_deg=10.0, scale=(0.9, 1.1), translate=0.05, crop_area=(0.8, 1.0),  # --augment:
           brightness=0.1, contrast=(0.9, 1.1), noise_std=0.02)  # small, label-preserving changes of a chest X-ray


def get_args(argv=None):
    p = base.ArgumentParser(__doc__)
    g = downstream.add_data_args(p, "data (default: the bundled Kermany sample, label `pneumonia`, subject "
                                 "`patient`)", ["vindr", "rsna", "chexpert", "mimic_cxr", "nih", "padchest"],
                                 "image path, subject, label columns")
    g.add_argument("--label_cols", help="comma-separated: several 0/1 columns = multi-label, one 0/1 column = "
                   "binary, one column of class names = multi-class (with --task multiclass)")
    g.add_argument("--vindr_consensus", default="majority", choices=["majority", "any"],
                   help="how VinDr's three readers per training image are combined (see archives.load_vindr)")
    g.add_argument("--uncertain", default="ignore", choices=list(archives.UNCERTAIN),
                   help="chexpert, mimic_cxr: uncertain (-1) labels, by the CheXpert paper's names: ignore (left "
                        "out of the loss and the metric for that image), zeros (negative) or ones (positive); blank "
                        "(not mentioned) is negative")
    g.add_argument("--mimic_labeler", default="chexpert", choices=["chexpert", "negbio"],
                   help="mimic_cxr: which of MIMIC-CXR-JPG's label files (mimic-cxr-2.0.0-LABELER.csv.gz)")
    g = p.add_argument_group("protocol")
    g.add_argument("--task", default="auto", choices=["auto", "multilabel", "multiclass", "binary"])
    g.add_argument("--protocol", default="auto", choices=["auto", "fixed", "split", "cv"],
                   help="auto: fixed with a test set (--repeats seeds), split for RSNA (--split), cv otherwise")
    g.add_argument("--split", default="0.6,0.2,0.2", help="--protocol split: train,val,test shares of the subjects")
    g.add_argument("--folds", type=int, default=5, help="k of k-fold cross-validation by subject")
    g.add_argument("--repeats", type=int, default=5, help="fixed / split: heads trained with this many seeds")
    g.add_argument("--select", default="loss", choices=["loss", "auprc"],
                   help="the L2 strength (or the SGD head's epoch) by validation loss or AUPRC")
    g.add_argument("--weight_decay", type=float, default=0.01,
                   help="SGD head: AdamW's weight decay, also the L2 strength of the objective its gap is measured on")
    g.add_argument("--last_layers", type=int, default=1, help="concatenate the embedding of this many final layers")
    g.add_argument("--augment", action="store_true", help="SGD head: the paper's augmentations, through the encoder")
    g.add_argument("--feature_cache", help="embedding cache folder (default: OUT_DIR/features)")
    g = p.add_argument_group("comparing runs")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two predictions.csv (or run folders): paired bootstrap, one-tailed 'A better than B'")
    g.add_argument("--table", nargs="+", metavar="RUN",
                   help="print one table (a row per run folder / results.json) for encoders probed on the same data")
    downstream.add_eval_args(p)
    base.add_common_args(p, "probe")
    base.add_preset_arg(p, PRESETS, "converged (default): the head solved to its optimum; paper: the paper's AdamW "
                                    "head (lr 5e-5, batch 96, 100 epochs)")
    args = base.apply_preset(p.parse_args(argv), PRESETS, "converged")
    base.check(args, *base.COMMON_RULES, *downstream.ENCODER_RULES, "folds >= 2", "repeats >= 1",
               "weight_decay >= 0", "last_layers >= 1", models=VIT_CONFIGS)
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

def csv_samples(args):
    """The generic CSV format of docs/CONVENTIONS.md (and the bundled demo): samples with 'labels' {column: text}."""
    files, demo = downstream.csv_parts(args, DEMO_CSV), args.csv is None
    if not args.label_cols and not demo:
        raise UserError("--csv needs --label_cols (the CSV's label columns, comma-separated)")
    cols = [c.strip() for c in args.label_cols.split(",") if c.strip()] if args.label_cols else ["pneumonia"]
    if len(set(cols)) != len(cols):
        raise UserError(f"--label_cols {args.label_cols!r} names a column twice")
    spec = {"path": args.path_col, "subject": args.subject_col or ("patient" if demo else "subject"),
            **{f"label:{c}": c for c in cols}}
    out = []
    for part, path in files:
        rows = archives.read_csv_samples(path, args.image_root, spec, part=part,
                                         subject_given=args.subject_col is not None)[0]
        for i, s in enumerate(rows):
            s["labels"], s["where"] = {c: s.pop(f"label:{c}") for c in cols}, f"{path} row {i + 2}"
        out += rows
    return out, f"bundled {DEMO_CSV}" if demo else args.csv


def load_table(args):
    """paths, subjects, labels (N, C) float 0/1 (one-hot for multi-class), classes, task, source and parts: index
    arrays 'pool' (split or cross-validated; the training part when a test set is fixed), fixed 'val' / 'test'."""
    samples, source = archives.load(args.dataset, args) if args.dataset else csv_samples(args)
    task, classes, labels = archives.label_matrix(samples, args.task)
    part_of = np.array([s["part"] if s["part"] in ("val", "test") else "pool" for s in samples])
    missing = [s["path"] for s in samples if not os.path.exists(s["path"])]
    if missing:
        raise UserError(f"{len(missing)} of {len(samples)} images not found, e.g. {missing[0]} "
                        f"(check --image_root / --data_dir)")
    return SimpleNamespace(paths=[s["path"] for s in samples], subjects=np.array([s["subject"] for s in samples], str),
                           labels=np.asarray(labels, np.float32), classes=list(classes), task=task, source=source,
                           parts={k: np.flatnonzero(part_of == k) for k in ("pool", "val", "test") if k in part_of})


# ----------------------------------------------------------------------------------------------------------------
# splits: subject-disjoint (train, val, test) index arrays per fold or seed

def protocol_of(table, args):
    if args.protocol != "auto":
        if (args.protocol == "fixed") != ("test" in table.parts):
            raise UserError(f"--protocol {args.protocol} and the data disagree: 'fixed' is for a test set (--test_csv "
                            f"or an official split), 'split' / 'cv' make one (and would leave a given one unused)")
        return args.protocol
    return "fixed" if "test" in table.parts else "split" if args.dataset == "rsna" else "cv"


def make_splits(table, args):
    subj, pool, parts, proto = table.subjects, table.parts["pool"], table.parts, protocol_of(table, args)

    def inner(train, seed):  # the fixed validation part, else a subject-disjoint share of the training part
        if "val" in parts:
            return train, parts["val"]
        tr, va = data.split_by_subject(subj[train], fractions=(1 - VAL_FRAC, VAL_FRAC), seed=seed)
        return train[tr], train[va]

    if proto == "fixed":
        splits = [(*inner(pool, args.seed + r), parts["test"]) for r in range(args.repeats)]
    elif proto == "split":  # one subject split (the seed's); the heads then vary with the repeat's seed
        tr, va, te = data.split_by_subject(subj[pool], args.split_fracs, seed=args.seed)
        splits = [(pool[tr], parts["val"] if "val" in parts else pool[va], pool[te])] * args.repeats
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
    images (path, size, modification time), the preprocessing, the layers pooled and the precision."""
    enc, path = info.source, args.encoder or (DEFAULT_EXPORT if info.format != "random-init" else None)
    if path and os.path.exists(path):  # a retrained file (or folder of files) at the same path gets a new key
        files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
        enc = [info.format] + downstream.file_identity(files)
    key = json.dumps([enc, args.model, args.patch_size, info.img_size, info.mean, info.std,
                      info.crop_frac, args.last_layers, str(env.dtype),
                      sorted(downstream.file_identity(table.paths))])
    return os.path.join(args.feature_cache or os.path.join(args.out_dir, "features"),
                        hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")


@torch.no_grad()
def embed(vit, x, env, args):
    with env.autocast():
        return vit.global_embedding(x.to(env.device, non_blocking=True), last_layers=args.last_layers).float()


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
    cos, sin = c * torch.cos(a) / s, c * torch.sin(a) / s
    shift = [u(-1, 1) * (1 - c) + u(-2 * AUG["translate"], 2 * AUG["translate"]) for _ in "xy"]
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[0]], 1), torch.stack([sin * flip, cos, shift[1]], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(*AUG["contrast"]).view(B, 1, 1, 1) + mean + u(-1, 1).view(B, 1, 1, 1) * AUG["brightness"]
    return (x + AUG["noise_std"] * torch.randn(x.shape, generator=g).to(x.device)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# the linear head: solved to convergence (downstream.fit_converged, the default) or trained as the paper did (AdamW)

GAP_TOL = 1e-3  # an SGD head whose train objective stops further than this above the optimum is flagged


def train_sgd(batches, X, Y, tr, va, task, norm, args, env, log, fold):
    """The paper's head: AdamW with a cosine lr, batches() an epoch; the best epoch on the validation part (by
    --select) kept. Then its gap: its train objective (lam = --weight_decay, on the un-augmented training features)
    against the optimum of that same objective."""
    K = Y.shape[1]
    W, b = (torch.zeros(s, dtype=torch.float32, device=env.device, requires_grad=True) for s in ((X.shape[1], K), K))
    opt = torch.optim.AdamW([W, b], lr=args.lr, weight_decay=args.weight_decay)
    per_epoch = math.ceil(len(tr) / args.batch_size)
    total, best, step = args.max_steps or args.epochs * per_epoch, None, 0
    for epoch in range(math.ceil(total / per_epoch)):
        losses = []
        for x, y in islice(batches(), total - step):  # the last epoch stops at step `total`
            opt.param_groups[0]["lr"] = base.cosine(step / total, args.lr, 0.0)
            loss = head_loss(x @ W + b, y, task, known_counts(y, task))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        Wd, bd = W.detach().double(), b.detach().double()
        score, val_loss, val_ap = val_scores(predict(Wd, bd, X, va, task, norm), Y[va].numpy(), task, args.select)
        if best is None or score.mean() > best[0]:
            best = (score.mean(), epoch, Wd, bd)
        log.log(step=step, loss=float(np.mean(losses)), fold=fold, epoch=epoch, val_loss=val_loss,
                val_auprc=val_ap if np.isfinite(val_ap) else None, lr=opt.param_groups[0]["lr"])
    _, epoch, W, b = best
    base.refuse_nonfinite([W, b], "the head")
    lam = torch.full((K,), args.weight_decay, dtype=torch.float64, device=env.device)
    f = float(objective(W, b, X, Y, tr, task, lam, norm))
    optimum = fit_lbfgs(X, Y, tr, task, lam, norm, (W, b))[2]["objective"]
    return W, b, {"solver": "adamw", "best_epoch": epoch, "objective": f, "optimum": optimum, "gap": f - optimum,
                  "converged": f - optimum <= GAP_TOL}


# ----------------------------------------------------------------------------------------------------------------
# metrics: scikit-learn for the reported numbers; a vectorised equivalent for thousands of bootstrap resamples

def metrics(Y, P):
    """Per class AUPRC (average precision) and AUROC over the rows where that class is labelled (NaN: not), NaN
    for a class without both positives and negatives there; 'Agg.' = their mean over the classes that have them."""
    ap, auc = [], []
    for c in range(Y.shape[1]):
        known = np.isfinite(Y[:, c])
        y, p = Y[known, c], P[known, c]
        ok = 0 < y.sum() < len(y)
        ap.append(float(average_precision_score(y, p)) if ok else math.nan)
        auc.append(float(roc_auc_score(y, p)) if ok else math.nan)
    return {"auprc": ap, "auroc": auc, "agg_auprc": nanmean(ap), "agg_auroc": nanmean(auc)}


# ----------------------------------------------------------------------------------------------------------------
# outputs: the paper's table, results.json / .csv, predictions.csv, PR curves; how the run differs from the paper

def summarise(per_fold, classes):
    def stat(v):  # std over folds with ddof=0; a fold where the metric is undefined (no positives) is left out
        f = np.asarray(v, dtype=float)[np.isfinite(v)]
        return {"mean": float(f.mean()) if len(f) else math.nan, "std": float(f.std()) if len(f) else math.nan,
                "folds": [float(x) for x in v]}

    out = {m: {c: stat([f[m][i] for f in per_fold]) for i, c in enumerate(classes)} for m in ("auprc", "auroc")}
    out["agg"] = {m: stat([f["agg_" + m] for f in per_fold]) for m in ("auprc", "auroc")}
    return out


def cell(s):  # a table cell (also compare.py's): mean ± std, '-' where undefined
    return "-" if s["mean"] is None or not np.isfinite(s["mean"]) else f"{s['mean']:.3f}±{s['std']:.3f}"


def unit_of(protocol):
    return "fold" if "cross-validation" in protocol else "seed"


def print_table(runs, metric):
    """Laid out like the paper's Table 3: a row per run (its results), a column per class and Agg."""
    cols, n = runs[0]["classes"] + ["Agg."], len(runs[0]["per_fold"])
    w = [max([24] + [len(r["name"]) for r in runs])] + [max(11, len(c)) for c in cols]
    print(f"\n{metric.upper()} (mean ± std over {n} {unit_of(runs[0]['protocol'])}{'s' * (n > 1)})")
    print(" | ".join(s.ljust(k) for s, k in zip(["Encoder"] + cols, w)))
    print("-+-".join("-" * k for k in w))
    for r in runs:
        cells = [cell(r[metric][c]) for c in cols[:-1]] + [cell(r["agg"][metric])]
        print(" | ".join(s.ljust(k) for s, k in zip([r["name"]] + cells, w)))


def write_outputs(res, table, preds, out_dir):
    results = [["encoder", "metric", "class", "mean", "std"] + [f"fold_{k}" for k in range(len(preds))]]
    for m in ("auprc", "auroc"):
        for c, s in [*res[m].items(), ("Agg.", res["agg"][m])]:
            results.append([res["name"], m, c, s["mean"], s["std"]] + s["folds"])
    predictions = [["path", "subject", "fold"] + [f"{k}_{c}" for k in ("label", "prob") for c in table.classes]]
    for fold, idx, P in preds:
        for i, p in zip(idx, P):
            labels = ["" if np.isnan(v) else int(v) for v in table.labels[i]]  # blank: not labelled
            predictions.append([table.paths[i], table.subjects[i], fold] + labels + [repr(float(v)) for v in p])
    for name, rows in (("results.csv", results), ("predictions.csv", predictions)):
        downstream.write_csv(rows, os.path.join(out_dir, name))
    base.write_json(res, os.path.join(out_dir, "results.json"))
    Y, P = np.concatenate([table.labels[te] for _, te, _ in preds]), np.concatenate([P for *_, P in preds])
    figures.draw_pr_curves(Y, P, table.classes, f"{res['name']}: {table.source}",
                           os.path.join(out_dir, "pr_curves.png"))


def deviations(args, proto):
    """What this run does differently from the paper's section 6 protocol (printed and in results.json)."""
    return [text for when, text in (
        (True, "features standardised with the training part's mean / std (a fixed affine map, still linear)"),
        (args.head == "lbfgs", "head: L2-regularised logistic regression solved to convergence by L-BFGS, the L2 "
         "strength per label chosen on the validation part (without a fixed one: 5-fold cross-validation by subject "
         "in the training part), refitted on training + validation (the paper: AdamW, lr 5e-5, 100 epochs; --preset "
         "paper); no training-time augmentation"),
        (args.augment, "training-time augmentations through the frozen encoder: " + ", ".join(
            f"{k} {v}" for k, v in AUG.items())),
        (args.head == "sgd" and args.max_steps is not None,
         f"--max_steps {args.max_steps} head steps (the paper: {args.epochs} epochs)"),
        (args.dataset == "vindr",
         f"VinDr training labels: {args.vindr_consensus} of the three readers (the paper does not say)"),
        (args.dataset == "rsna" and proto != "split",
         f"RSNA with --protocol {proto} (the paper: a 60/20/20 split by subject)"),
        (proto in ("fixed", "split") and args.repeats != 5, f"{args.repeats} seed(s) (the paper: 5)")) if when]


def convergence(per_fold, head):
    """How far each fold's head stopped from the optimum of its own objective, and a warning past GAP_TOL."""
    heads = [f["head"] for f in per_fold]
    if head == "lbfgs":
        g, ok = max(h["grad_max"] for h in heads), all(h["converged"] for h in heads)
        return {"solver": "lbfgs", "grad_max": g, "gap": 0.0, "converged": ok, "note":
                f"head converged in every fold (largest gradient entry {g:.1e})" if ok else f"WARNING: L-BFGS stopped "
                f"with a gradient entry of {g:.1e} > {downstream.GRAD_TOL:g}: the head may not be at its optimum"}
    gap, per = max(h["gap"] for h in heads), "; ".join(f"{h['objective']:.4f} vs {h['optimum']:.4f}" for h in heads)
    return {"solver": "adamw", "objective": [h["objective"] for h in heads], "optimum": [h["optimum"] for h in heads],
            "gap": gap, "converged": gap <= GAP_TOL, "note": f"head train objective vs its optimum, per fold: {per}"
            + ("" if gap <= GAP_TOL else f". WARNING: the head stopped up to {gap:.3f} above the optimum of its own "
               f"objective (more than {GAP_TOL:g}): its scores rank the optimiser as much as the features; the "
               "default head (--preset converged) solves it")}


# ----------------------------------------------------------------------------------------------------------------
# comparing two runs: a paired bootstrap over the same test images (the paper's Table 6)

def load_predictions(path):
    """(path, image paths, classes, labels, probabilities); an image's rows from several seeds are averaged."""
    path = os.path.join(path, "predictions.csv") if os.path.isdir(path) else path
    rows = data.read_csv(path, required=["path"])
    classes = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    if not classes or any("label_" + c not in rows[0] for c in classes):
        raise UserError(f"{path}: no label_* / prob_* columns; pass a predictions.csv written by probe.py")
    by_path = {}
    for i, r in enumerate(rows, start=2):
        y = [data.number(r["label_" + c], f"{path} row {i}") for c in classes]  # blank: unlabelled
        by_path.setdefault(r["path"], (y, []))[1].append([data.number(r["prob_" + c], f"{path} row {i}")
                                                          for c in classes])
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
    memo = {}  # both runs' metrics per resample, computed once for every row's test

    def stat_for(m, c):  # c None: Agg., the mean over classes
        def stat(idx):
            key = hashlib.sha1(np.ascontiguousarray(idx)).digest()
            if key not in memo:
                memo[key] = (fast_metrics(Ya[idx], Pa[idx]), fast_metrics(Yb[idx], Pb[idx]))
            a, b = (r[m] for r in memo[key])
            return (nanmean(a), nanmean(b)) if c is None else (a[c], b[c])
        return stat

    stats = {(m, cname): stat_for(i, c) for i, m in enumerate(("auprc", "auroc"))
             for c, cname in list(enumerate(cls)) + [(None, "Agg.")]}
    return downstream.paired_compare(args, pa, pb, stats, len(paths))


# ----------------------------------------------------------------------------------------------------------------
# a run: per fold or seed a head fitted, selected and tested on the features; the quick probe of pretraining

def run_folds(feats, table, splits, vit, info, args, env, log):
    """Per split a head fitted, selected and tested: per-fold metrics and (fold, test indices, probabilities)."""
    X, Y, bs, per_fold, preds = feats, torch.from_numpy(table.labels), args.batch_size, [], []
    # --augment works on [0, 1] images and normalises after augmenting, with the encoder's own statistics
    raw = dataclasses.replace(info, mean=[0.0] * len(info.mean), std=[1.0] * len(info.std))
    mean, std = (torch.tensor(v, device=env.device).view(1, -1, 1, 1) for v in (info.mean, info.std))
    for k, (tr, va, te) in enumerate(splits):
        g = torch.Generator().manual_seed(args.seed + 1000 * k)
        # standardised by the rows the head is finally fitted on: one L2 grid (or AdamW lr) suits every encoder
        rows = tr if args.head == "sgd" else np.concatenate([tr, va])
        norm = (X[rows].mean(0), X[rows].std(0).clamp_min(1e-6))

        def batches():  # one epoch of the training part in a fresh order: (features, labels) on the device
            order = tr[torch.randperm(len(tr), generator=g).numpy()]
            parts = [order[i:i + bs] for i in range(0, len(order), bs)]
            if not args.augment:
                for r in parts:
                    yield ((X[r] - norm[0]) / norm[1]).to(env.device), Y[r].to(env.device)
                return
            images = downstream.image_batches([table.paths[j] for j in order], raw, bs, args.num_workers)
            for (x, _), r in zip(images, parts):
                f = embed(vit, (augment(x.to(env.device), g) - mean) / std, env, args)
                yield (f - norm[0].to(env.device)) / norm[1].to(env.device), Y[r].to(env.device)

        if args.head == "lbfgs":
            fixed_val = "val" in table.parts or protocol_of(table, args) == "split"
            folds = selection_folds(tr, va, table.subjects, fixed_val, args.seed + k)
            W, b, head = fit_converged(X, Y, folds, table.task, norm, env.device, args.select, log, k)
            how = (f"L2 {', '.join(f'{v:.0e}' for v in sorted(set(head['l2'])))} by {head['l2_chosen_by']}, "
                   f"{head['iterations']} L-BFGS iterations")
        else:
            W, b, head = train_sgd(batches, X, Y, tr, va, table.task, norm, args, env, log, k)
            how = f"best epoch {head['best_epoch']}, train objective {head['objective']:.4f} vs optimum " \
                  f"{head['optimum']:.4f}"
        P = predict(W, b, X, te, table.task, norm)
        m = metrics(table.labels[te], P)
        per_fold.append({"fold": k, "n_train": len(tr), "n_val": len(va), "n_test": len(te), "head": head, **m})
        preds.append((k, te, P))
        env.print(f"fold {k}: train {len(tr)} val {len(va)} test {len(te)} images, {how}: "
                  f"Agg. AUPRC {m['agg_auprc']:.3f} AUROC {m['agg_auroc']:.3f}")
    return per_fold, preds


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    if args.compare:
        return compare(args)
    if args.table:  # the paper's Table 3 for several runs on the same data
        runs = [data.read_json(os.path.join(r, "results.json") if os.path.isdir(r) else r) for r in args.table]
        if any(r["classes"] != runs[0]["classes"] for r in runs):
            raise UserError("--table: the runs have different classes; tabulate runs on the same data together")
        for metric in ("auprc", "auroc"):
            print_table(runs, metric)
        return runs
    env, t0 = base.setup(args), time.time()
    table = load_table(args)
    splits, proto = make_splits(table, args), protocol_of(table, args)
    protocol = {"fixed": f"fixed test set, {args.repeats} seed(s)", "cv": f"{args.folds}-fold cross-validation by "
                "subject", "split": f"{args.split} split by subject, {args.repeats} seed(s)"}[proto]
    vit, info, name = downstream.load_frozen_encoder(args, env)
    vit.to(env.device)
    env.print(f"encoder: {info.source}\ndata: {table.source}: {len(table.paths)} images, "
              f"{len(set(table.subjects))} subjects, {table.task} {table.classes}; {len(splits)} split(s); "
              f"{info.img_size} px, mean {info.mean} std {info.std}")
    feats = downstream.encode_images(table.paths, info, lambda x: embed(vit, x, env, args), env, EXTRACT_BATCH,
                                     args.num_workers, cache=cache_file(info, table, args, env))
    if not env.is_main:
        return None  # the heads are tiny: rank 0 trains them all
    base.write_args(args, args.out_dir)
    threads = torch.get_num_threads()
    # a small head's matmuls gain nothing from threads, which only add synchronisation (10x slower on a busy CPU)
    torch.set_num_threads(1 if env.device.type == "cpu" and not args.augment and len(feats) < 20000 else threads)
    try:
        per_fold, preds = run_folds(feats, table, splits, vit, info, args, env,
                                    base.JsonlLogger(os.path.join(args.out_dir, "log.jsonl")))
    finally:
        torch.set_num_threads(threads)
    res = {"name": name, "encoder": info.source, "encoder_format": info.format, "task": table.task,
           "classes": table.classes, **summarise(per_fold, table.classes), "per_fold": per_fold,
           "protocol": protocol, "convergence": convergence(per_fold, args.head), "deviations": deviations(args, proto),
           "data": {"source": table.source, "n_images": len(table.paths), "n_subjects": len(set(table.subjects)),
                    "positives": {c: int(np.nansum(table.labels[:, i])) for i, c in enumerate(table.classes)},
                    "unlabelled": {c: int(np.isnan(table.labels[:, i]).sum()) for i, c in enumerate(table.classes)},
                    **({"uncertain": args.uncertain} if args.dataset in UNCERTAIN_LAYOUTS else {})},
           "preprocess": {k: getattr(info, k) for k in ("img_size", "mean", "std", "crop_frac")},
           "feature_dim": int(feats.shape[1]), "settings": vars(args), "time_s": round(time.time() - t0, 1)}
    for metric in ("auprc", "auroc"):
        print_table([res], metric)
    print(f"encoder: {info.source}\n{res['convergence']['note']}\nprotocol: {protocol}; deviations from the "
          f"paper: {'; '.join(res['deviations']) or 'none'}")
    write_outputs(res, table, preds, args.out_dir)
    print(f"wrote results.json, results.csv, predictions.csv, pr_curves.png to {args.out_dir}")
    res["baseline"] = downstream.run_baseline(main, args, argv)
    return res


if __name__ == "__main__":
    base.run(main)
