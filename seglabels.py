"""
Segmentation label maps from the published annotation formats, for segment.py: uint8 at the image's resolution,
0 background, 1..K classes, IGNORE where the truth is unknown (left out of the loss and of Dice).

    lab = seglabels.make_label(sample, "lungs", img.shape)   # sample: one of archives.load's dicts

lungs (right / left, or one class), the six Chest ImaGenome zones (boxes intersected with the lung) and VinDr-RibCXR's
20 ribs (polygons); read_composed rebuilds an X-ray from lung-segment-mimic-cxr's segmented images.
"""
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

import data
from archives import RIBS, ZONES
from base import UserError

IGNORE = 255  # label value excluded from loss and Dice
MASK_IGNORE_VALUE = 127  # what lung masks (the bundled lungseg, V7 Labs) use for "ignore"


def read_mask(path):
    """A mask image's raw pixel values as uint8 HxW (no intensity rescaling, unlike data.read_image)."""
    try:
        im = Image.open(path)
        m = np.array(im if im.mode in ("L", "P", "1") else im.convert("L"))
    except Exception as e:
        raise UserError(f"cannot read mask {path}: {type(e).__name__}: {e}")
    return (m.astype(np.uint8) * 255) if m.dtype == bool else m.astype(np.uint8)


def lungs_label(mask, split=True):
    """right_lung = 1, left_lung = 2 (radiological convention: the patient's right lung is on the image's LEFT);
    split=False: one class. The two largest connected components are the lungs, ordered by centroid x (not by the
    image midline: a patient off-centre in the image would be cut wrongly); other fragments go to the nearer lung.
    A single large component holding both lungs is cut at its narrowest column in its middle 40%."""
    lung, ignore = (mask > 0) & (mask != MASK_IGNORE_VALUE), mask == MASK_IGNORE_VALUE
    out = np.zeros(mask.shape, np.uint8)
    comps, n = ndimage.label(lung | ignore)  # an 'ignore' patch must not cut one lung into two components
    sizes = np.bincount(comps.ravel())[1:]
    cols = np.broadcast_to(np.arange(mask.shape[1]) + 0.5, mask.shape)  # pixel centres
    cx = ndimage.mean(cols, comps, np.arange(1, n + 1)) if n else []
    big = [k for k in np.argsort(-sizes)[:2] if sizes[k] >= 0.1 * sizes.max()] if n else []
    if not split:
        out[lung] = 1
    elif len(big) == 2:
        mid = (cx[big[0]] + cx[big[1]]) / 2
        for k in range(n):
            out[lung & (comps == k + 1)] = 1 if cx[k] < mid else 2
    elif len(big) == 1:
        sel = comps == big[0] + 1
        share = float((cols[sel] < mask.shape[1] / 2).mean())
        if 0.3 < share < 0.7:  # spans both halves: both lungs joined (e.g. through the retrocardiac lung)
            width = sel.sum(0)
            xs = np.flatnonzero(width)
            a, b = int(xs[0] + 0.3 * (xs[-1] - xs[0])), int(xs[0] + 0.7 * (xs[-1] - xs[0]))
            mid = a + int(np.argmin(width[a:b + 1])) + 0.5
        else:  # one lung only: its side of the image decides
            mid = mask.shape[1] / 2
        out[lung & (cols < mid)], out[lung & (cols >= mid)] = 1, 2
    out[ignore] = IGNORE
    return out


def zones_label(mask, boxes, shape):
    """Zone k+1 = box of ZONES[k] (x1, y1, x2, y2 in pixels) intersected with the lung. A lung pixel in two boxes
    goes to the box whose centre is nearer; lung pixels in no box are ignored. mask None: the boxes themselves."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    zone, best = np.zeros((H, W), np.uint8), np.full((H, W), np.inf, np.float32)
    for k, name in enumerate(ZONES, start=1):
        if name not in boxes:
            continue
        x1, y1, x2, y2 = boxes[name]
        inside = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
        d = ((xx - (x1 + x2) / 2) / max(x2 - x1, 1)) ** 2 + ((yy - (y1 + y2) / 2) / max(y2 - y1, 1)) ** 2
        take = inside & (d < best)
        zone[take], best[take] = k, d[take]
    if mask is None:
        return zone
    lung, ignore = (mask > 0) & (mask != MASK_IGNORE_VALUE), mask == MASK_IGNORE_VALUE
    out = np.where(lung, zone, 0).astype(np.uint8)
    out[(lung & (zone == 0)) | ignore] = IGNORE  # lung outside every box: its zone is unknown
    return out


def ribs_label(polys, shape):
    """Rasterise rib polygons (dict rib -> [{'x', 'y'}, ...]) with PIL; overlaps between ribs are ignored."""
    H, W = shape
    out, count = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    for k, rib in enumerate(RIBS, start=1):
        pts = polys.get(rib)
        if not isinstance(pts, list) or len(pts) < 3:  # VinDr writes "None" for a rib that is not visible
            continue
        canvas = Image.new("L", (W, H), 0)
        ImageDraw.Draw(canvas).polygon([(float(p["x"]), float(p["y"])) for p in pts], fill=1, outline=1)
        m = np.array(canvas, bool)
        out[m], count[m] = k, count[m] + 1
    out[count > 1] = IGNORE
    return out


def make_label(s, task, shape):
    mask = read_mask(s["mask"]) if s.get("mask") else None
    if mask is not None and s.get("mask_rule") == "nonzero":  # a segmented image (lungs kept, the rest black)
        mask = np.where(mask > 0, 255, 0).astype(np.uint8)
    if mask is not None and mask.shape != tuple(shape):
        raise UserError(f"mask {s['mask']} is {mask.shape[1]}x{mask.shape[0]} but its image {s['path']} is "
                        f"{shape[1]}x{shape[0]}")
    if task in ("lungs", "lung"):
        return lungs_label(mask, split=task == "lungs")
    if task == "zones":
        return zones_label(mask, s["boxes"], shape)
    return ribs_label(s["polys"], shape)


def read_composed(paths):
    """One X-ray from segmented images that partition it (lung-segment-mimic-cxr's lungs + rest), in [0, 1]."""
    try:
        arrs = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) for p in paths if p]
        if len({a.shape for a in arrs}) != 1:
            raise ValueError(f"the segmented images differ in size ({[a.shape for a in arrs]})")
    except Exception as e:
        raise data.ImageReadError(f"cannot read image {paths[0]}: {type(e).__name__}: {e}") from e
    return np.clip(sum(arrs), 0, 255) / 255.0
