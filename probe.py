"""
Linear probe: is a frozen encoder's global embedding linearly predictive of findings? (the paper's Tables 3 and 6)

    python probe.py                                    # demo: bundled Kermany X-rays, pneumonia vs normal, CPU
    python probe.py --encoder out/pretrain/encoder.safetensors --csv /data/nih14/labels.csv \\
        --subject_col patient_id --label_cols Atelectasis,Cardiomegaly,Effusion    # 5-fold CV by patient
    python probe.py --dataset vindr --data_dir /data/vindr-cxr/1.0.0   # official test set, the paper's six findings
    python probe.py --dataset rsna --data_dir /data/rsna-pneumonia     # stage_2_train_* files, 5-fold CV by patient
    python probe.py --csv train.csv --val_csv val.csv --test_csv test.csv --label_cols a,b   # fixed splits
    python probe.py --augment --epochs 20 ...         # the paper's training-time augmentations, through the encoder
    python probe.py --compare out/probe_a out/probe_b # paired bootstrap over the test images: is A better than B?
    python probe.py --table out/probe_a out/probe_b   # the paper's Table 3: one row per encoder
    torchrun --nproc_per_node 4 probe.py ...          # images embedded by all ranks; rank 0 trains the heads

The paper's protocol: the encoder is frozen; its global embedding (mean of the final patch tokens for JEPA
encoders, CLS where the encoder has one; --last_layers N concatenates N final layers) feeds one linear layer:
sigmoid + BCE for multi-label findings, softmax + CE for multi-class and binary ones; AdamW, lr 5e-5, cosine
schedule, batch 96, 100 epochs (but at least --min_steps steps: small data sets would stop far from convergence).
Images are split by subject, never by image: k-fold cross-validation (--folds) or a fixed --test_csv; inside each
training part a subject-disjoint validation part (or --val_csv) picks the epoch.

Embeddings are computed once and cached under --feature_cache (keyed by encoder, images and preprocessing): heads
train in seconds, reruns skip the encoder. --augment sends augmented training images through it every epoch instead.

Writes to --out_dir (default out/probe): results.json (per class and Agg. AUPRC / AUROC: mean, std, per fold;
settings; encoder), results.csv, predictions.csv (per test image and fold: what --compare reads), pr_curves.png,
log.jsonl; --compare writes compare.json.
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
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from tqdm import tqdm

import common
import data
from common import UserError
from encoders import DEFAULT_EXPORT, add_encoder_args, load_encoder_from_args

DEMO_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", "kermany", "labels.csv")

# VinDr-CXR: the paper's six findings, spelled as in image_labels_{train,test}.csv (matched case-insensitively)
VINDR_SIX = ["Lung Opacity", "Cardiomegaly", "Pleural thickening", "Aortic enlargement", "Pulmonary fibrosis",
             "Pleural effusion"]

# --augment strengths: small, label-preserving changes of a chest X-ray
AUG = dict(flip_p=0.5, rotate_deg=10.0, scale=(0.9, 1.1), translate=0.05, crop_area=(0.8, 1.0),
           brightness=0.1, contrast=(0.9, 1.1), noise_std=0.02)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data (default: the bundled Kermany sample, label `pneumonia`, subject `patient`)")
    g.add_argument("--csv", default=None, help="table of samples: image path, subject, label columns")
    g.add_argument("--image_root", default=None, help="folder the CSV's image paths are relative to")
    g.add_argument("--path_col", default="path")
    g.add_argument("--subject_col", default=None, help="subject / patient id column (default: subject)")
    g.add_argument("--label_cols", default=None, help="comma-separated: several 0/1 columns = multi-label, "
                   "one 0/1 column = binary, one column of class names = multi-class")
    g.add_argument("--val_csv", default=None, help="fixed validation set (replaces the inner validation split)")
    g.add_argument("--test_csv", default=None, help="fixed test set (replaces k-fold cross-validation)")
    g.add_argument("--dataset", default=None, choices=["vindr", "rsna"], help="a published layout under --data_dir")
    g.add_argument("--data_dir", default=None, help="root folder of --dataset (e.g. .../vindr-cxr/1.0.0)")
    g.add_argument("--vindr_consensus", default="majority", choices=["majority", "any"],
                   help="how VinDr's three readers per training image are combined (see load_vindr)")
    g = p.add_argument_group("protocol")
    g.add_argument("--task", default="auto", choices=["auto", "multilabel", "multiclass", "binary"])
    g.add_argument("--folds", type=int, default=5, help="k of k-fold cross-validation by subject")
    g.add_argument("--val_frac", type=float, default=0.15, help="share of a training part's subjects for selection")
    g.add_argument("--select", default="loss", choices=["loss", "auprc"], help="best epoch by val loss or AUPRC")
    g.add_argument("--repeats", type=int, default=1,
                   help="fixed test set: heads with this many seeds (inner validation split, batch order)")
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--min_steps", type=int, default=1000, help="train at least this many steps (0: off): small data "
                   "stops far from convergence after 100 epochs at lr 5e-5; the paper's data sets get >10k steps")
    g.add_argument("--feat_norm", default="standardize", choices=["standardize", "none"],
                   help="standardise features with the training part's mean / std (fixed: still linear)")
    g.add_argument("--last_layers", type=int, default=1, help="concatenate the embedding of this many final layers")
    g.add_argument("--augment", action="store_true", help="training-time augmentations through the encoder")
    g.add_argument("--extract_batch_size", type=int, default=32)
    g.add_argument("--feature_cache", default=None, help="embedding cache folder (default: OUT_DIR/features)")
    g.add_argument("--name", default=None, help="the encoder's row label in the table")
    g = p.add_argument_group("comparing two runs")
    g.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                   help="two predictions.csv (or run folders): paired bootstrap, one-tailed 'A better than B'")
    g.add_argument("--n_boot", type=int, default=1000)
    g.add_argument("--table", nargs="+", default=None, metavar="RUN",
                   help="print one table (a row per run folder / results.json) for encoders probed on the same data")
    add_encoder_args(p)
    common.add_common_args(p, "probe", batch_size=96, epochs=100, lr=5e-5, model="vit_base", img_size=224)
    args = p.parse_args(argv)
    if args.folds < 2:
        raise UserError("--folds must be at least 2")
    if not 0 < args.val_frac < 1:
        raise UserError("--val_frac must be between 0 and 1")
    return args


# ----------------------------------------------------------------------------------------------------------------
# data: every source becomes image paths, subjects, a label matrix and index parts (pool / val / test)

class Table:
    """labels: (N, C) float 0/1 (one-hot for multi-class; one column for binary). parts: index arrays 'pool'
    (cross-validated, or the training part when a test set is fixed) and optional fixed 'val' and 'test'."""

    def __init__(self, paths, subjects, labels, classes, task, part_of, source):
        self.paths, self.subjects = list(paths), np.asarray(subjects, dtype=str)
        self.labels, self.classes, self.task, self.source = np.asarray(labels, np.float32), list(classes), task, source
        part_of = np.asarray(part_of)
        self.parts = {k: np.flatnonzero(part_of == k) for k in ("pool", "val", "test") if (part_of == k).any()}


def _as_01(value, where):
    v = str(value).strip()
    if v not in ("0", "1", "0.0", "1.0"):
        raise UserError(f"{where}: label {value!r} is not 0 or 1 (multi-label and binary columns hold 0/1)")
    return float(v)


def load_csvs(args):
    """The generic CSV format of CONVENTIONS.md (and the bundled demo)."""
    if args.csv is None and (args.val_csv or args.test_csv):
        raise UserError("--val_csv / --test_csv need --csv for the training data")
    demo = args.csv is None
    subject_col = args.subject_col or ("patient" if demo else "subject")
    if not args.label_cols and not demo:
        raise UserError("--csv needs --label_cols (the CSV's label columns, comma-separated)")
    cols = [c.strip() for c in args.label_cols.split(",") if c.strip()] if args.label_cols else ["pneumonia"]
    where, values, paths, subjects, part_of = [], [], [], [], []
    for part, path in (("pool", DEMO_CSV if demo else args.csv), ("val", args.val_csv), ("test", args.test_csv)):
        for i, r in enumerate(data.read_csv(path, required=[args.path_col, subject_col] + cols) if path else []):
            where.append(f"{path} row {i + 2}")
            values.append([(r[c] or "").strip() for c in cols])
            paths.append(data.resolve(path, args.image_root, r[args.path_col]))
            subjects.append(r[subject_col])
            part_of.append(part)
    task = args.task
    if task == "auto":
        binary = {v for vals in values for v in vals} <= {"0", "1", "0.0", "1.0"}
        task = "multilabel" if len(cols) > 1 else ("binary" if binary else "multiclass")
    if task == "binary" and len(cols) != 1:
        raise UserError("--task binary needs exactly one 0/1 label column")
    if task == "multiclass" and len(cols) == 1:  # one column of class names
        classes = sorted({vals[0] for vals in values})
        labels = [[float(vals[0] == c) for c in classes] for vals in values]
    else:
        classes, labels = cols, [[_as_01(v, w) for v in vals] for w, vals in zip(where, values)]
        if task == "multiclass" and any(sum(l) != 1 for l in labels):
            raise UserError("--task multiclass with several columns needs exactly one 1 per row (one-hot columns)")
    return Table(paths, subjects, labels, classes, task, part_of, f"bundled {DEMO_CSV}" if demo else args.csv)


def load_vindr(args):
    """VinDr-CXR as published on PhysioNet: ROOT/{train,test}/<image_id>.dicom and ROOT/annotations/
    image_labels_{train,test}.csv with columns image_id, rad_id and one 0/1 column per finding.

    The dataset's documentation: each training image was labelled independently by three radiologists (one row
    each), each test image by the consensus of five (one row). It prescribes no rule for fusing the three training
    reads, so we take the majority: a finding is positive when more than half of an image's readers marked it
    (2 of 3); --vindr_consensus any makes one reader enough. VinDr has no patient id: subject = image_id."""
    root = args.data_dir or args.image_root
    if not root:
        raise UserError("--dataset vindr needs --data_dir (the folder holding train/, test/ and annotations/)")
    wanted = [c.strip() for c in args.label_cols.split(",")] if args.label_cols else VINDR_SIX
    ids, labels, part_of = [], [], []
    for part, split in (("pool", "train"), ("test", "test")):
        f = os.path.join(root, "annotations", f"image_labels_{split}.csv")
        rows = data.read_csv(f, required=["image_id"])
        lower = {h.lower(): h for h in rows[0]}  # VinDr writes 'Pleural thickening', papers 'Pleural Thickening'
        absent = [w for w in wanted if w.lower() not in lower]
        if absent:
            raise UserError(f"{f}: no column(s) {absent}; it has {sorted(rows[0])}")
        votes = {}  # image_id -> one 0/1 vector per reader
        for r in rows:
            votes.setdefault(r["image_id"], []).append([_as_01(r[lower[w.lower()]], f) for w in wanted])
        for image_id, v in votes.items():
            n_pos = np.sum(v, axis=0)
            labels.append(n_pos * 2 > len(v) if args.vindr_consensus == "majority" else n_pos >= 1)
            ids.append((split, image_id))
            part_of.append(part)
    paths = [os.path.join(root, split, f"{i}.dicom") for split, i in ids]
    return Table(paths, [i for _, i in ids], labels, wanted, "multilabel", part_of, f"VinDr-CXR {root}")


def load_rsna(args):
    """RSNA Pneumonia Detection Challenge: ROOT/stage_2_train_labels.csv (patientId, x, y, width, height, Target;
    one row per box, so a patient with two opacities has two rows) and ROOT/stage_2_train_images/<patientId>.dcm.
    One image per patientId, labelled Target (max over its rows). Only the training files carry labels: the
    protocol is k-fold cross-validation by patient."""
    root = args.data_dir or args.image_root
    if not root:
        raise UserError("--dataset rsna needs --data_dir (the folder holding stage_2_train_labels.csv)")
    f = os.path.join(root, "stage_2_train_labels.csv")
    target = {}
    for r in data.read_csv(f, required=["patientId", "Target"]):
        target[r["patientId"]] = max(target.get(r["patientId"], 0.0), _as_01(r["Target"], f))
    paths = [os.path.join(root, "stage_2_train_images", f"{i}.dcm") for i in target]
    return Table(paths, list(target), [[t] for t in target.values()], ["Pneumonia"], "binary", ["pool"] * len(paths),
                 f"RSNA Pneumonia {root}")


def load_table(args):
    table = {"vindr": load_vindr, "rsna": load_rsna}.get(args.dataset, load_csvs)(args)
    missing = [p for p in table.paths if not os.path.exists(p)]
    if missing:
        raise UserError(f"{len(missing)} of {len(table.paths)} images not found, e.g. {missing[0]} "
                        f"(check --image_root / --data_dir)")
    return table


def make_splits(table, args):
    """(train, val, test) index arrays per fold, subject-disjoint (checked). Without a fixed test set: k-fold CV of
    the pool by subject; each training part then gives --val_frac of its subjects to model selection."""
    subj, pool = table.subjects, table.parts["pool"]

    def inner(train, seed):
        if "val" in table.parts:
            return train, table.parts["val"]
        tr, va = data.split_by_subject(subj[train], fractions=(1 - args.val_frac, args.val_frac), seed=seed)
        return train[tr], train[va]

    if "test" in table.parts:
        splits = [(*inner(pool, args.seed + r), table.parts["test"]) for r in range(args.repeats)]
    else:
        folds = data.kfold_by_subject(subj[pool], k=args.folds, seed=args.seed)
        splits = [(*inner(pool[tr], args.seed + k), pool[te]) for k, (tr, te) in enumerate(folds)]
    for tr, va, te in splits:
        try:
            data.check_disjoint(subj, tr, va, te)
        except UserError as e:  # e.g. one patient in both --csv and --test_csv
            raise UserError(f"subject leak between train (part 0), validation (part 1) and test (part 2): {e}")
        if min(len(tr), len(va), len(te)) == 0:
            raise UserError(f"an empty split (train {len(tr)}, val {len(va)}, test {len(te)} images): too few subjects")
    return splits


# ----------------------------------------------------------------------------------------------------------------
# features: the frozen encoder's global embedding, once per image (cached) or per augmented batch

class Images(torch.utils.data.Dataset):
    def __init__(self, paths, preprocess):
        self.paths, self.pre = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):  # a bad file is reported by the main process in one line, not as a worker traceback
        try:
            return self.pre(data.read_image(self.paths[i])), ""
        except data.ImageReadError as e:  # a placeholder of the right shape, so the batch still collates
            return torch.zeros(len(self.pre.mean), self.pre.img_size, self.pre.img_size), str(e)


def image_batches(paths, preprocess, batch_size, args):
    for x, err in torch.utils.data.DataLoader(Images(paths, preprocess), batch_size=batch_size,
                                              num_workers=args.num_workers):
        if any(err):
            raise UserError([e for e in err if e][0])
        yield x


def cache_file(info, table, args, env):
    """Named by everything that changes an embedding: the encoder (file identity, or the random-init recipe), the
    images, the preprocessing, the layers pooled and the precision."""
    enc, path = info["source"], args.encoder or (DEFAULT_EXPORT if info["format"] != "random-init" else None)
    if path and os.path.exists(path):  # a retrained file (or folder of files) at the same path gets a new key
        files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
        enc = [(os.path.realpath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = json.dumps([enc, args.model, args.patch_size, info["img_size"], info["mean"], info["std"],
                      args.last_layers, str(env.dtype), sorted(table.paths)])
    return os.path.join(args.feature_cache or os.path.join(args.out_dir, "features"),
                        hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")


@torch.no_grad()
def embed(vit, x, env, args):
    with env.autocast():
        return vit.global_embedding(x.to(env.device, non_blocking=True), last_layers=args.last_layers).float()


def extract_features(vit, info, table, args, env):
    """(N, D) embeddings of table.paths in order, cached. Under torchrun each rank embeds every world-th image and
    rank 0 gathers them (the other ranks get None)."""
    path = cache_file(info, table, args, env)
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        if cached["paths"] == table.paths:
            env.print(f"features: reusing {path}")
            return cached["feats"]
    pre = data.Preprocess(info["img_size"], info["mean"], info["std"])
    mine = list(range(env.rank, len(table.paths), env.world))
    feats, bar = [], tqdm(total=len(mine), desc="embedding images", disable=not env.is_main)
    for x in image_batches([table.paths[i] for i in mine], pre, args.extract_batch_size, args):
        feats.append(embed(vit, x, env, args).cpu())
        bar.update(len(x))
    bar.close()
    feats = torch.cat(feats)
    if env.distributed:
        gathered = [None] * env.world
        torch.distributed.all_gather_object(gathered, (mine, feats.numpy()))
        if not env.is_main:
            return None
        feats = torch.empty(len(table.paths), feats.shape[1])
        for idx, f in gathered:
            feats[idx] = torch.from_numpy(f)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    common.atomic_save({"paths": table.paths, "feats": feats, "source": info["source"]}, path)
    env.print(f"features: {tuple(feats.shape)} cached in {path}")
    return feats


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
# the linear head

def loss_fn(logits, y, task):
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits, y[:, 0].long() if task == "binary" else y.argmax(1))


def probabilities(logits, task):
    if task == "multilabel":
        return torch.sigmoid(logits)
    return logits.softmax(-1)[:, 1:] if task == "binary" else logits.softmax(-1)  # binary: P(positive)


def train_head(batches, steps_per_epoch, Xva, Yva, n_classes, task, args, env, log, fold):
    """AdamW + cosine over all steps; after each epoch the validation part is scored and the best epoch's weights
    (lowest loss, or highest macro AUPRC with --select auprc) are returned with that epoch."""
    head = nn.Linear(Xva.shape[1], 2 if task == "binary" else n_classes).to(env.device)
    # zero start: at lr 5e-5 the weights move ~1e-2 in 100s of steps, less than a random init's spread
    # (~1/sqrt(D)), which would drown the learned direction; the loss is convex, so zero is a fine start
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.max_steps or max(args.epochs * steps_per_epoch, args.min_steps)
    best, step = None, 0
    for epoch in range(math.ceil(total / steps_per_epoch)):
        head.train()
        losses = []
        for x, y in batches(epoch):
            for gr in opt.param_groups:  # cosine from lr to 0 over the whole run
                gr["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = loss_fn(head(x), y, task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
        head.eval()
        with torch.no_grad():
            logits = head(Xva)
            val_loss = loss_fn(logits, Yva, task).item()
            val_ap = _nanmean(fast_metrics(Yva.cpu().numpy(), probabilities(logits, task).cpu().numpy())[0])
        score = -val_loss if args.select == "loss" or not np.isfinite(val_ap) else val_ap
        if best is None or score > best[0]:
            best = (score, epoch, {k: v.clone() for k, v in head.state_dict().items()})
        log.log(step=step, loss=float(np.mean(losses)), fold=fold, epoch=epoch, val_loss=val_loss,
                val_auprc=val_ap if np.isfinite(val_ap) else None, lr=opt.param_groups[0]["lr"])
        if step >= total:
            break
    head.load_state_dict(best[2])
    return head.eval(), best[1]


# ----------------------------------------------------------------------------------------------------------------
# metrics: scikit-learn for the reported numbers; a vectorised equivalent for thousands of bootstrap resamples

def metrics(Y, P):
    """Per class AUPRC (average precision) and AUROC from scikit-learn; 'Agg.' = their mean over the classes with
    both positives and negatives here (a class without positives has no AUPRC / AUROC: NaN)."""
    ok = [0 < Y[:, c].sum() < len(Y) for c in range(Y.shape[1])]
    ap = [float(average_precision_score(Y[:, c], P[:, c])) if ok[c] else math.nan for c in range(Y.shape[1])]
    auc = [float(roc_auc_score(Y[:, c], P[:, c])) if ok[c] else math.nan for c in range(Y.shape[1])]
    return {"auprc": ap, "auroc": auc, "agg_auprc": _nanmean(ap), "agg_auroc": _nanmean(auc)}


def json_safe(o):
    """NaN (a metric undefined for a class without positives) as null: results.json stays strict JSON."""
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return None if isinstance(o, float) and not math.isfinite(o) else o


def _nanmean(v):
    v = np.asarray(v, dtype=float)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else math.nan


def fast_metrics(Y, P):
    """scikit-learn's AUPRC and AUROC (ties included) for all classes at once in float64 numpy: AUROC = Mann-Whitney
    U with average ranks; AP = sum over distinct thresholds of (recall step) x precision. NaN where undefined."""
    Y, P = np.asarray(Y, np.float64), np.asarray(P, np.float64)
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
                w.writerow([table.paths[i], table.subjects[i], fold] + [int(v) for v in table.labels[i]]
                           + [f"{v:.6g}" for v in p])
    common.write_json(json_safe(res), os.path.join(out_dir, "results.json"))


PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#ad494a", "#637939", "#de9ed6", "#843c39", "#5254a3"]


def draw_pr_curves(Y, P, classes, title, path, W=760, H=560):
    """Precision-recall curves, one per class (test predictions pooled over folds), drawn with PIL."""
    L, R, T, B = 70, 230, 40, 60  # margins; the legend sits in the right one
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default(size=13)
    xy = lambda r, p: (L + r * (W - L - R), T + (1 - p) * (H - T - B))
    for t in np.linspace(0, 1, 6):  # grid, ticks and their labels
        d.line([xy(t, 0), xy(t, 1)], fill="#e8e8e8")
        d.line([xy(0, t), xy(1, t)], fill="#e8e8e8")
        d.text((xy(t, 0)[0] - 10, H - B + 8), f"{t:.1f}", fill="black", font=font)
        d.text((L - 35, xy(0, t)[1] - 7), f"{t:.1f}", fill="black", font=font)
    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    d.text((L + (W - L - R) / 2 - 20, H - 25), "Recall", fill="black", font=font)
    d.text((8, T - 22), "Precision", fill="black", font=font)
    d.text((L + 60, 8), title[:90], fill="black", font=font)
    for c, name in enumerate(classes):
        y, p = Y[:, c], P[:, c]
        if not 0 < y.sum() < len(y):
            continue
        prec, rec, _ = precision_recall_curve(y, p)
        pts = [xy(rec[0], prec[0])]
        for k in range(1, len(rec)):  # steps, like scikit-learn's PrecisionRecallDisplay
            pts += [xy(rec[k], prec[k - 1]), xy(rec[k], prec[k])]
        color, ly = PALETTE[c % len(PALETTE)], T + 18 * c
        d.line(pts, fill=color, width=2)
        d.line([W - R + 15, ly + 7, W - R + 35, ly + 7], fill=color, width=3)
        d.text((W - R + 40, ly), f"{name[:18]} (AP {average_precision_score(y, p):.2f})", fill="black", font=font)
    img.save(path)


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
        y, p = [float(r["label_" + c]) for c in classes], [float(r["prob_" + c]) for c in classes]
        by_path.setdefault(r["path"], (y, []))[1].append(p)
    paths = sorted(by_path)
    Y, P = np.array([by_path[k][0] for k in paths]), np.array([np.mean(by_path[k][1], 0) for k in paths])
    return path, paths, classes, Y, P


def compare(args):
    pa, paths, cls, Ya, Pa = load_predictions(args.compare[0])
    pb, paths_b, cls_b, Yb, Pb = load_predictions(args.compare[1])
    if cls != cls_b:
        raise UserError(f"{pa} and {pb} predict different classes ({cls} vs {cls_b})")
    if paths != paths_b:
        raise UserError(f"{pa} and {pb} cover different test images ({len(set(paths) ^ set(paths_b))} not in both): "
                        f"run both encoders on the same data and splits")
    if not np.array_equal(Ya, Yb):
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
            return (_nanmean(a[m]), _nanmean(b[m])) if c is None else (a[m][c], b[m][c])
        return stat

    out = {"a": pa, "b": pb, "n_images": len(paths), "n_boot": args.n_boot, "metrics": {}}
    print(f"A = {pa}\nB = {pb}\npaired bootstrap over {len(paths)} test images, {args.n_boot} resamples")
    print(f"{'metric':7s} {'class':22s} {'A':>7s} {'B':>7s} {'A-B':>8s} {'95% CI of A-B':>18s} {'p(A>B)':>8s}")
    for m, name in enumerate(("auprc", "auroc")):
        out["metrics"][name] = {}
        for c, cname in list(enumerate(cls)) + [(None, "Agg.")]:
            r = common.paired_bootstrap(stat_for(m, c), len(paths), n_boot=args.n_boot, seed=args.seed)
            out["metrics"][name][cname] = r
            print(f"{name.upper():7s} {cname[:22]:22s} {r['a']:7.3f} {r['b']:7.3f} {r['delta']:+8.3f} "
                  f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] {r['p_one_tailed']:8.4f}")
    os.makedirs(args.out_dir, exist_ok=True)
    common.write_json(json_safe(out), os.path.join(args.out_dir, "compare.json"))
    print(f"one-tailed p = share of resamples where A is not better; wrote {args.out_dir}/compare.json")
    return out


def unit_of(protocol):
    return "seed" if protocol == "fixed test set" else "fold"


def table_of_runs(runs):
    res = [json.load(open(os.path.join(r, "results.json") if os.path.isdir(r) else r)) for r in runs]
    if any(r["classes"] != res[0]["classes"] for r in res):
        raise UserError("--table: the runs have different classes; tabulate runs on the same data together")
    for metric in ("auprc", "auroc"):
        print_table(res, res[0]["classes"], metric, len(res[0]["per_fold"]), unit_of(res[0]["protocol"]))
    return res


def run_folds(feats, table, splits, vit, info, args, env, log):
    """Train, select and test one head per split; returns per-fold metrics and (fold, test indices, probabilities)."""
    X, Y = feats.to(env.device), torch.from_numpy(table.labels).to(env.device)
    # --augment works on [0, 1] images and normalises after augmenting, with the encoder's own statistics
    raw = data.Preprocess(info["img_size"], [0.0] * len(info["mean"]), [1.0] * len(info["std"]))
    mean, std = (torch.tensor(info[k], device=env.device).view(1, -1, 1, 1) for k in ("mean", "std"))
    bs, per_fold, preds = args.batch_size, [], []
    for k, (tr, va, te) in enumerate(splits):
        g = torch.Generator().manual_seed(args.seed + 1000 * k)
        # standardised with the training part's statistics: a fixed affine map, so the probe stays linear, but AdamW
        # at lr 5e-5 no longer depends on the raw scale of each encoder's features
        mu, sd = (X[tr].mean(0), X[tr].std(0).clamp_min(1e-6)) if args.feat_norm == "standardize" else (0.0, 1.0)
        Xs = (X - mu) / sd

        def batches(epoch):  # one epoch of (features, labels) of the training part, in a fresh order
            order = tr[torch.randperm(len(tr), generator=g).numpy()]
            if not args.augment:
                for i in range(0, len(order), bs):
                    yield Xs[order[i:i + bs]], Y[order[i:i + bs]]
                return
            for i, x in enumerate(image_batches([table.paths[j] for j in order], raw, bs, args)):
                f = embed(vit, (augment(x.to(env.device), g) - mean) / std, env, args)
                yield (f - mu) / sd, Y[order[i * bs:(i + 1) * bs]]

        head, best_epoch = train_head(batches, math.ceil(len(tr) / bs), Xs[va], Y[va], len(table.classes), table.task,
                                      args, env, log=log, fold=k)
        with torch.no_grad():
            P = probabilities(head(Xs[te]), table.task).cpu().numpy()
        m = metrics(table.labels[te], P)
        per_fold.append({"fold": k, "n_train": len(tr), "n_val": len(va), "n_test": len(te), "best_epoch": best_epoch,
                         **m})
        preds.append((k, te, P))
        env.print(f"fold {k}: train {len(tr)} val {len(va)} test {len(te)} images, best epoch {best_epoch}: "
                  f"Agg. AUPRC {m['agg_auprc']:.3f} AUROC {m['agg_auroc']:.3f}")
    return per_fold, preds


# ----------------------------------------------------------------------------------------------------------------
# the quick probe pretraining runs during training (pretrain.py --probe_every): seconds, not the full protocol

_QUICK_IMAGES = {}  # (csv, label, subject, img_size) -> (images, labels, subjects): decoded once per process


def quick_probe(vit, csv_path=DEMO_CSV, label_col="pneumonia", subject_col="patient", folds=5, batch_size=64):
    """Cross-validated AUROC of a logistic regression (scikit-learn) on the frozen `vit`'s global embedding for
    the 0/1 column `label_col` of `csv_path` (default: the bundled Kermany sample, pneumonia vs normal). Folds are
    fixed and by subject (data.kfold_by_subject, seed 0), so two calls on two encoders see the same splits; the
    images are resized (no crop) to the encoder's resolution and decoded only once per process. Returns the mean
    AUROC over folds (folds whose test part holds one class only are left out). A sanity signal during
    pretraining: the full protocol (probe.py itself) is what to report."""
    from sklearn.linear_model import LogisticRegression  # imported here: only runs that probe pay for it
    from sklearn.preprocessing import StandardScaler
    key = (os.path.abspath(csv_path), label_col, subject_col, vit.grid[0] * vit.patch_size)
    if key not in _QUICK_IMAGES:
        rows = data.read_csv(csv_path, required=["path", label_col, subject_col])
        pre = data.Preprocess(key[3])
        try:
            x = torch.stack([pre(data.read_image(data.resolve(csv_path, None, r["path"]))) for r in rows])
        except data.ImageReadError as e:
            raise UserError(f"quick probe: {e}")
        y = np.array([_as_01(r[label_col], f"{csv_path} row {i + 2}") for i, r in enumerate(rows)], np.int64)
        if len(set(y.tolist())) < 2:
            raise UserError(f"quick probe: {csv_path} column {label_col} has one class only; AUROC needs both")
        _QUICK_IMAGES[key] = (x, y, [r[subject_col] for r in rows])
    x, y, subjects = _QUICK_IMAGES[key]
    was_training = vit.training
    vit.eval()
    with torch.no_grad():
        feats = torch.cat([vit.global_embedding(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])
    vit.train(was_training)
    feats = feats.numpy().astype(np.float64)
    aucs = []
    for train, test in data.kfold_by_subject(subjects, k=folds, seed=0):
        if len(set(y[test].tolist())) < 2 or len(set(y[train].tolist())) < 2:
            continue
        scaler = StandardScaler().fit(feats[train])
        clf = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(feats[train]), y[train])
        aucs.append(roc_auc_score(y[test], clf.predict_proba(scaler.transform(feats[test]))[:, 1]))
    return float(np.mean(aucs)) if aucs else float("nan")


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    if args.compare:
        return compare(args)
    if args.table:
        return table_of_runs(args.table)
    env = common.setup(args)
    t0 = time.time()
    table = load_table(args)
    splits = make_splits(table, args)
    vit, info = load_encoder_from_args(args)
    vit.to(env.device)
    name = args.name or (os.path.basename(args.encoder) if args.encoder else info["source"].split(" (")[0])
    env.print(f"encoder: {info['source']}")
    env.print(f"data: {table.source}: {len(table.paths)} images, {len(set(table.subjects))} subjects, "
              f"{table.task} {table.classes}; {len(splits)} split(s); {info['img_size']} px, mean {info['mean']} "
              f"std {info['std']}")
    feats = extract_features(vit, info, table, args, env)
    if not env.is_main:
        return None  # the heads are tiny: rank 0 trains them all
    os.makedirs(args.out_dir, exist_ok=True)
    log = common.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"))
    threads = torch.get_num_threads()
    # a linear head's tiny matmuls gain nothing from threads, which only add synchronisation (10x slower on a busy CPU)
    torch.set_num_threads(1 if env.device.type == "cpu" and not args.augment else threads)
    try:
        per_fold, preds = run_folds(feats, table, splits, vit, info, args, env, log)
    finally:
        torch.set_num_threads(threads)
    res = {"name": name, "encoder": info["source"], "encoder_format": info["format"], "task": table.task,
           "classes": table.classes, **summarise(per_fold, table.classes), "per_fold": per_fold,
           "protocol": "fixed test set" if "test" in table.parts else f"{args.folds}-fold cross-validation by subject",
           "data": {"source": table.source, "n_images": len(table.paths), "n_subjects": len(set(table.subjects)),
                    "positives": {c: int(table.labels[:, i].sum()) for i, c in enumerate(table.classes)}},
           "preprocess": {k: info[k] for k in ("img_size", "mean", "std")}, "feature_dim": int(feats.shape[1]),
           "settings": vars(args), "time_s": round(time.time() - t0, 1)}
    for metric in ("auprc", "auroc"):
        print_table([res], table.classes, metric, len(splits), unit_of(res["protocol"]))
    print(f"encoder: {info['source']}")
    write_outputs(res, table, preds, args.out_dir)
    draw_pr_curves(np.concatenate([table.labels[te] for _, te, _ in preds]), np.concatenate([P for *_, P in preds]),
                   table.classes, f"{name}: {table.source}", os.path.join(args.out_dir, "pr_curves.png"))
    print(f"wrote results.json, results.csv, predictions.csv, pr_curves.png to {args.out_dir}")
    return res


if __name__ == "__main__":
    common.run(main)
