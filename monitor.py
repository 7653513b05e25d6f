"""
What a pretraining run watches besides its loss (the JEPA loss falls, then levels off or rises by design, so it says
little about whether the encoder is learning), all without labels: RankMe and LiDAR of the target encoder on a
fixed set of images, and a picture of every logged curve.

    rank = rankme(Z)                                     # Z: (N, D) embeddings; exp(entropy of the singular values)
    lid = lidar(E)                                       # E: (n, q, D): q views of each of n images
    m = Monitor(dataset, collator, n=128, q=4); m(target)   # {"rankme": ..., "lidar": ...}
    auroc = quick_probe(target)                          # --probe_every: the probe's head on the bundled Kermany set
    draw_curves("out/pretrain/log.jsonl", "out/pretrain/curves.png")

RankMe (Garrido et al. 2023): the effective rank of the embedding matrix, exp(-sum p_k log p_k) with p the singular
values normalised to sum 1 (+ 1e-7), on the raw embeddings (no centring): how many directions the embeddings
really use. A collapse shows as a fall towards 1; it is an upper bound on what a linear probe can use, not a
measure of quality (random features have a high RankMe). LiDAR (Thilak et al. 2023, made for JEPAs): the same
effective rank of the LDA matrix Sigma_w^-1/2 Sigma_b Sigma_w^-1/2 of the surrogate task "tell the images apart
across their views": how many directions separate images rather than views of one image. The views are I-JEPA's
own corruption, a fresh context mask per view (the target encoder sees only the context patches, mean-pooled).
Both are computed in float64 on the embeddings every evaluation uses (the mean of the final-normed patch tokens).
"""
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import roc_auc_score

import archives
import data
from base import UserError, atomic_write
from downstream import fit_converged, predict, selection_folds

RANKME_EPS, LIDAR_EPS, LIDAR_DELTA = 1e-7, 1e-8, 1e-4  # the reference implementations' constants
MASK_STEP = 2 ** 40  # the LiDAR views' masks are the collator's at steps no run reaches: never a training batch's


def effective_rank(values, eps):
    """exp(entropy) of non-negative values normalised to sum 1 (+ eps after normalising, as RankMe writes it)."""
    v = np.clip(np.asarray(values, np.float64), 0, None)
    p = v / v.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def rankme(Z):
    """RankMe of embeddings Z (N, D): the effective rank of their singular values."""
    return effective_rank(torch.linalg.svdvals(torch.as_tensor(Z, dtype=torch.float64)).numpy(), RANKME_EPS)


def lidar(E, delta=LIDAR_DELTA):
    """LiDAR of embeddings E (n images, q views, D): the effective rank of the eigenvalues of
    Sigma_w^-1/2 Sigma_b Sigma_w^-1/2, with the unbiased between-image and within-image scatter matrices and
    delta * I added to the within one."""
    E = torch.as_tensor(E, dtype=torch.float64)
    n, q, d = E.shape
    mu_i = E.mean(1)
    between = (mu_i - mu_i.mean(0)).T @ (mu_i - mu_i.mean(0)) / (n - 1)
    r = (E - mu_i[:, None]).reshape(n * q, d)
    within = r.T @ r / (n * (q - 1)) + delta * torch.eye(d, dtype=torch.float64)
    w, V = torch.linalg.eigh(within)
    s = (V / w.sqrt()) @ V.T  # the symmetric inverse square root
    m = s @ between @ s
    return effective_rank(torch.linalg.eigvalsh((m + m.T) / 2).numpy(), LIDAR_EPS)


class Monitor:
    """RankMe and LiDAR of an encoder on a fixed set of the run's own images: the first n of the data set at step
    0's crops, and for LiDAR q context masks per image drawn from the run's mask collator (seeded, so every call
    sees the same views). The images are decoded once."""

    def __init__(self, dataset, collator, n=128, q=4, batch_size=64):
        n = min(n, len(dataset))
        self.x = torch.stack([dataset[(i, 0)][0] for i in range(n)])
        # q context masks per image; I-JEPA's collator cuts every mask of a batch to one length
        self.views = [collator.sample(n, step=MASK_STEP + k)[0][0] for k in range(q)]
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, encoder):
        was_training, device = encoder.training, next(encoder.parameters()).device
        encoder.eval()
        whole, views = [], []
        for i in range(0, len(self.x), self.batch_size):
            x = self.x[i:i + self.batch_size].to(device)
            whole.append(encoder(x).double().mean(1).cpu())
            views.append(torch.stack([encoder(x, masks=[m[i:i + len(x)].to(device)]).double().mean(1).cpu()
                                      for m in self.views], 1))
        encoder.train(was_training)
        return {"rankme": rankme(torch.cat(whole)), "lidar": lidar(torch.cat(views))}


# ----------------------------------------------------------------------------------------------------------------
# the quick probe (--probe_every): the probe's converged head on a small labelled set, in seconds

KERMANY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", "kermany", "labels.csv")
_QUICK_IMAGES = {}  # (csv, label, subject, img_size) -> (images, labels, subjects): decoded once per process


def quick_probe(vit, csv_path=KERMANY, label_col="pneumonia", subject_col="patient", folds=5, batch_size=64):
    """pretrain.py --probe_every's signal, in seconds: the mean AUROC over `folds` folds by subject (seed 0: the
    same for every encoder; folds with one class only left out) of the converged head on the frozen `vit`'s global
    embedding of `csv_path`'s images, resized to its resolution, for the 0/1 column `label_col`."""
    key = (os.path.abspath(csv_path), label_col, subject_col, vit.grid[0] * vit.patch_size)
    if key not in _QUICK_IMAGES:
        rows, pre = data.read_csv(csv_path, required=["path", label_col, subject_col]), data.Preprocess(key[3])
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
    Y, aucs = torch.tensor(y, dtype=torch.float32)[:, None], []
    for k, (train, test) in enumerate(data.kfold_by_subject(subjects, k=folds, seed=0)):
        if len(set(y[test].tolist())) == 2 and len(set(y[train].tolist())) == 2:
            norm = (feats[train].mean(0), feats[train].std(0).clamp_min(1e-6))
            folds_k = selection_folds(train, train[:0], subjects, False, k)
            W, b, _ = fit_converged(feats, Y, folds_k, "binary", norm, torch.device("cpu"))
            aucs.append(roc_auc_score(y[test], predict(W, b, feats, test, "binary", norm)[:, 0]))
    return float(np.mean(aucs)) if aucs else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# curves.png: every logged quantity of a run against its step, one small panel each (PIL, no plotting library)

CURVES = ("loss", "lr", "target_std", "rankme", "lidar", "probe_auroc")


def draw_curves(log_path, out_path, keys=CURVES, panel=(300, 190)):
    rows = []
    with open(log_path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    series = [(k, [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and np.isfinite(r[k])])
              for k in keys]
    series = [(k, pts) for k, pts in series if pts]
    if not series:
        return None
    cols = min(3, len(series))
    W, H = panel
    img = Image.new("RGB", (cols * W, -(-len(series) // cols) * H), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default(size=12)
    L, R, T, B = 48, 10, 22, 22
    for k, (name, pts) in enumerate(series):
        ox, oy = (k % cols) * W, (k // cols) * H
        xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
        y0, y1 = ys.min(), ys.max() if ys.max() > ys.min() else ys.min() + 1e-9
        xy = lambda x, y: (ox + L + (x - x0) / (x1 - x0) * (W - L - R), oy + T + (y1 - y) / (y1 - y0) * (H - T - B))
        d.rectangle([ox + L, oy + T, ox + W - R, oy + H - B], outline="#999999")
        d.text((ox + L, oy + 4), f"{name}: {ys[-1]:.4g} at step {int(xs[-1])}", fill="black", font=font)
        d.text((ox + 2, oy + T), f"{y1:.3g}", fill="#555555", font=font)
        d.text((ox + 2, oy + H - B - 12), f"{y0:.3g}", fill="#555555", font=font)
        d.text((ox + W - R - 40, oy + H - B + 4), f"{int(x1)}", fill="#555555", font=font)
        if len(pts) > 1:
            d.line([xy(x, y) for x, y in pts], fill="#1f77b4", width=2)
        for x, y in pts if len(pts) < 40 else pts[-1:]:
            d.ellipse([*(v - 2 for v in xy(x, y)), *(v + 2 for v in xy(x, y))], fill="#1f77b4")
    atomic_write(out_path, lambda tmp: img.save(tmp, format="PNG"), "the previous picture is kept")
    return out_path


class TensorBoard:
    """Mirrors log rows to TensorBoard (--tensorboard), when the tensorboard package is installed."""

    def __init__(self, folder):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
        self.writer = SummaryWriter(folder)

    def log(self, step=0, **row):
        for k, v in row.items():
            if isinstance(v, (int, float)) and np.isfinite(v):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
