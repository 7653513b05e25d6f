"""
The pictures the evaluations write beside their results, drawn with PIL (no plotting library): probe.py's
precision-recall curves and segment.py's truth | prediction overlays.
"""
import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import average_precision_score, precision_recall_curve

import base

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#ad494a", "#637939", "#de9ed6", "#843c39", "#5254a3"]
# label colours: background black + 20 distinct hues (the ribs)
LABEL_COLORS = np.array([[0, 0, 0]] + [[int(255 * c) for c in colorsys.hsv_to_rgb(k / 20, 0.9, 1.0)]
                                       for k in range(20)], np.uint8)


def draw_pr_curves(Y, P, classes, title, path, W=760, H=560):
    """Precision-recall curves, one per class over its labelled rows (test predictions pooled over folds). The
    legend's AP is of these pooled predictions, so it can differ from the table's mean over folds."""
    L, R, T, B = 70, 230, 40, 60  # margins; the legend sits in the right one
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default(size=13)
    xy = lambda r, p: (L + r * (W - L - R), T + (1 - p) * (H - T - B))  # noqa: E731  (recall, precision) -> pixel
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
        known = np.isfinite(Y[:, c])
        y, p = Y[known, c], P[known, c]
        if not 0 < y.sum() < len(y):
            continue
        prec, rec, _ = precision_recall_curve(y, p)
        pts = [xy(rec[0], prec[0])]
        for k in range(1, len(rec)):  # steps, like scikit-learn's PrecisionRecallDisplay
            pts += [xy(rec[k], prec[k - 1]), xy(rec[k], prec[k])]
        color, ly = PALETTE[c % len(PALETTE)], T + 18 * c
        d.line(pts, fill=color, width=2)
        d.line([W - R + 15, ly + 7, W - R + 35, ly + 7], fill=color, width=3)
        d.text((W - R + 40, ly), f"{name[:18]} (pooled AP {average_precision_score(y, p):.2f})", fill="black",
               font=font)
    img.save(path)


def overlay(img, label, alpha=0.45, ignore=255):
    """Grayscale image (any size) with a label map drawn over it (resized to the label's size)."""
    g = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).resize(label.shape[::-1], Image.BILINEAR)
    rgb = np.repeat(np.array(g)[..., None], 3, 2).astype(np.float32)
    lab = np.where(label == ignore, 0, label)
    col = LABEL_COLORS[np.where(lab > 0, (lab - 1) % 20 + 1, 0)].astype(np.float32)
    return np.where((lab > 0)[..., None], (1 - alpha) * rgb + alpha * col, rgb).astype(np.uint8)


def save_overlays(kept, samples, out_dir, dice):
    os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    for k, (img, truth, pred) in enumerate(kept):
        gap = np.full((truth.shape[0], 4, 3), 255, np.uint8)
        im = Image.fromarray(np.concatenate([overlay(img, truth), gap, overlay(img, pred)], axis=1))
        label = f"prediction (Dice {base.nanmean(dice[k]):.3f})"
        for xy, text in (((4, 4), "truth"), ((truth.shape[1] + 8, 4), label)):
            ImageDraw.Draw(im).text(xy, text, fill=(255, 255, 0))
        stem = os.path.splitext(os.path.basename(samples[k]["path"]))[0]
        im.save(os.path.join(out_dir, "overlays", f"{k:02d}_{stem}.png"))
