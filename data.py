"""
Chest X-ray input: reading images (PNG 8/16-bit, JPEG, TIFF, DICOM), finding them, preprocessing, subject-level
splits, and the pretraining pipeline (I-JEPA random resized crop, the prepared 8-bit cache that prepare.py
builds, weighted mix of sources with an optional frontal:lateral ratio).

Usage (downstream scripts):
    img = data.read_image("scan.dcm")              # np.float32 HxW in [0, 1], bone bright; ImageReadError if not
    rows = data.read_csv(csv, required=("path", "subject"))
    pre = data.Preprocess(info.img_size, info.mean, info.std)
    x = pre(data.read_image(data.resolve(csv, None, rows[0]["path"])))          # torch (C, H, W)
    parts = data.split_by_subject([r["subject"] for r in rows])                # [train_idx, val_idx, test_idx]

Usage (pretraining):
    sources = data.parse_sources(["/data/nih:2", "/data/chexpert/train.csv:1"])  # PATH[:WEIGHT]
    sources = data.parse_sources(["mimic=/data/mimic-cxr-jpg/2.0.0:2"], named=archives.PRETRAIN)  # NAME=PATH
    data.exclude_subjects(sources, data.read_subject_ids(["eval_subjects.txt"]))   # each source's count: .excluded
    print(data.source_table(sources, sampler))    # the paper's Table 1 (after the sampler's --frontal_ratio)
    paths = data.concat_paths(sources)            # dataset index = position in this list
    cache = imagecache.open_cache("out/cache", paths)   # optional: the 8-bit cache prepare.py built
    ds = data.PretrainDataset(paths, 224, cache=cache)   # or verify=True to drop unreadable files upfront
    sampler = data.MixSampler(sources, rank=env.rank, world=env.world, seed=args.seed, frontal_ratio=3.0)
    idx = sampler.epoch_indices(epoch)            # this rank's list; slice it to resume mid-epoch
    x, step = ds[(idx[0], step)]                  # crop is a pure function of (seed, index, step)
"""
import collections
import collections.abc
import concurrent.futures
import csv
import dataclasses
import gzip
import itertools
import json
import logging
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from base import UserError

log = logging.getLogger("data")

# Intensity statistics of chest X-rays scaled to [0, 1] (mean / std over 500 NIH ChestX-ray14 + Kermany images at
# 224 px), used instead of ImageNet's RGB statistics for the project's own single-channel encoders.
CXR_MEAN = 0.518
CXR_STD = 0.248

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
DICOM_EXTS = (".dcm", ".dicom")


class ImageReadError(Exception):
    """A file that cannot be decoded as an image; the message names the file and why."""


# ----------------------------------------------------------------------------------------------------------------
# reading one image

def _is_dicom(path):
    """By extension; else, for no or a numeric extension (archives name files by SOP instance UID, e.g.
    "1.2.840.113619.2.55.3.6046"), by the "DICM" magic after the 128-byte preamble."""
    ext = os.path.splitext(path)[1].lower()
    if ext in DICOM_EXTS or not (ext == "" or ext[1:].isdigit()):
        return ext in DICOM_EXTS
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _minmax(x):
    x = x.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    return np.zeros(x.shape, np.float32) if hi <= lo else ((x - lo) / (hi - lo)).astype(np.float32)


def _read_pil(path, draft):
    with Image.open(path) as im:
        if draft and im.format == "JPEG":
            # JPEG can decode at 1/2, 1/4, 1/8 scale in the DCT domain (never below `draft` px): much faster for
            # the cache build, which resizes to a few hundred pixels anyway.
            im.draft("L", (draft, draft))
        im.load()  # force the full decode here, so truncated files fail inside this function
        if im.format == "JPEG":
            im = ImageOps.exif_transpose(im)  # phone photos of films carry an orientation tag
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            # 16-bit: scale by the dtype's range, not the image's max, so intensities mean the same in every file
            return np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
        if im.mode == "I":  # 32-bit int; older Pillow opens 16-bit PNGs this way
            a = np.asarray(im)
            return a.astype(np.float32) / 65535.0 if a.min() >= 0 and a.max() <= 65535 else _minmax(a)
        if im.mode in ("F", "I;16S"):  # float or signed TIFF: no natural range
            return _minmax(np.asarray(im))
        if im.mode != "L":  # RGB, RGBA, P, LA, 1, CMYK: ITU-R 601 luma
            im = im.convert("L")
        return np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0


def _first(v):  # WindowCenter / WindowWidth may hold several presets; the first is the primary one
    return v[0] if isinstance(v, collections.abc.Sequence) and not isinstance(v, (str, bytes)) else v


def _read_dicom(path):
    import pydicom
    try:
        from pydicom.pixels import apply_modality_lut  # pydicom >= 3
    except ImportError:  # pragma: no cover
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    ds = pydicom.dcmread(path, force=True)  # force: some archives strip the 128-byte preamble
    if "PixelData" not in ds:
        raise ValueError("DICOM file holds no pixel data")
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # multi-frame: the first frame
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # colour secondary capture: luma, scaled by the stored bit range
        gray = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.clip(gray / (2 ** int(ds.get("BitsStored", 8)) - 1), 0, 1).astype(np.float32)
    # Modality LUT: stored values -> physical units (RescaleSlope * v + RescaleIntercept, or a LUT sequence)
    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    w = float(_first(ww)) if ww is not None and wc is not None else 0.0
    if w > 0:
        # VOI window, DICOM PS3.3 C.11.2.1.2: the window the radiologist's viewer would show
        c = float(_first(wc))
        fn = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if fn == "SIGMOID":
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        elif fn == "LINEAR_EXACT":
            y = np.clip((x - c) / w + 0.5, 0, 1)
        else:  # LINEAR: 0 below c - 0.5 - (w-1)/2, 1 above c - 0.5 + (w-1)/2, linear between
            y = np.clip((x - (c - 0.5)) / max(w - 1.0, 1e-6) + 0.5, 0, 1)
    else:
        y = _minmax(x)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() == "MONOCHROME1":
        y = 1.0 - y  # MONOCHROME1 shows low values white; invert so bone is bright like every other file
    return np.asarray(y, dtype=np.float32)


def read_image(path, draft=None):
    """Read one image as np.float32 HxW in [0, 1] (bone bright). PNG/TIFF 8- and 16-bit, JPEG, BMP, DICOM (by
    .dcm/.dicom extension or a DICM preamble). `draft`: JPEG may decode at reduced size, at least `draft` px.
    Any failure raises ImageReadError naming the file and the reason."""
    path = os.fspath(path)
    try:
        img = _read_dicom(path) if _is_dicom(path) else _read_pil(path, draft)
        if img.ndim != 2 or img.size == 0:
            raise ValueError(f"decoded to shape {img.shape}, expected a 2-D image")
        if not np.isfinite(img).all():
            raise ValueError("decoded pixels contain NaN or inf")
    except Exception as e:  # PIL, pydicom, numpy and OS errors all mean the same to the caller: unusable file
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return img


def find_images(root):
    """All image files under `root`, recursively, sorted, as absolute paths. Extensions (any case): IMAGE_EXTS,
    plus DICOM files with no or a numeric extension (checked by their DICM preamble). Hidden files are skipped."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"image folder {root!r} does not exist or is not a folder: pass a folder of images")
    out, seen = [], set()
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:  # a symlink cycle: followlinks would otherwise walk forever
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        paths = [os.path.join(d, f) for f in files if not f.startswith(".")]  # hidden: e.g. macOS "._x.png" forks
        out += [os.path.abspath(p) for p in paths if os.path.splitext(p)[1].lower() in IMAGE_EXTS or _is_dicom(p)]
    if not out:
        raise UserError(f"no images found under {root!r} (searched recursively for {', '.join(IMAGE_EXTS)} "
                        f"in any case, and DICOM files without an extension)")
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------------
# tables and paths

def read_csv(path, required=(), hint="pick the right one with --path_col / --subject_col / ..."):
    """Rows of a CSV (or .csv.gz: archives ship their metadata gzipped) as a list of dicts (strings). UserError when
    the file is missing, empty or lacks a column; `hint` says how to fix a missing column."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"CSV file {path!r} not found")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel writes a byte-order mark
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = cols
        missing = [c for c in required if c not in cols]
        if missing:
            raise UserError(f"CSV {path} has no column {', '.join(map(repr, missing))} (its columns: "
                            f"{', '.join(cols) or 'none'}); {hint}")
        rows = list(reader)
    if not rows:
        raise UserError(f"CSV {path} has no rows")
    return rows


def read_json(path):
    """A JSON file a user names (layouts' annotations, run folders' results): a missing or malformed one is one line."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})")
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})")


def number(value, where):
    """A number from a table cell a user's file holds: blank is NaN (no value), a word is one line naming the cell."""
    try:
        return float(value) if str(value).strip() != "" else math.nan
    except ValueError:
        raise UserError(f"{where}: {value!r} is not a number")


def resolve(csv_path, image_root, p):
    """Absolute path of image `p` from a CSV: absolute stays, relative is under image_root (default: CSV's folder)."""
    base = image_root or os.path.dirname(os.path.abspath(os.fspath(csv_path)))
    return os.path.abspath(os.path.join(base, os.path.expanduser(str(p).strip())))  # join keeps an absolute p


# ----------------------------------------------------------------------------------------------------------------
# preprocessing

def _stats(mean, std, in_chans=None):
    """(C,1,1) mean and std tensors; a scalar is repeated over in_chans channels."""
    m, s = (np.atleast_1d(np.asarray(v, dtype=np.float64)).tolist() for v in (mean, std))
    c = in_chans or max(len(m), len(s))
    m, s = (m * c if len(m) == 1 else m), (s * c if len(s) == 1 else s)
    if len(m) != c or len(s) != c:
        raise ValueError(f"mean {m} / std {s} do not match {c} channels")
    return torch.tensor(m).view(c, 1, 1), torch.tensor(s).view(c, 1, 1)


def _to_tensor(img):
    """np / torch HxW image (uint8 0..255 or float 0..1) -> torch float32 HxW in [0, 1]."""
    if not torch.is_tensor(img):
        img = np.asarray(img)
        img = img if img.flags.writeable else img.copy()  # PIL's arrays are read-only; torch warns on those
    x = torch.as_tensor(img)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {tuple(x.shape)}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def resize(x, size):
    """Bilinear resize of a float HxW image (np or torch) to size x size, antialiased when shrinking (a plain
    bilinear downscale of a 3000 px X-ray aliases fine lines such as ribs and catheters). Returns torch."""
    x = _to_tensor(x)
    h, w = (size, size) if isinstance(size, int) else size
    if tuple(x.shape) == (h, w):
        return x
    return F.interpolate(x[None, None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]


def crop_box(rng, h, w, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (top, left, height, width): area fraction ~U(scale), log aspect ratio ~U(log ratio);
    10 tries, then a centre crop clamped to the ratio range (same algorithm as torchvision)."""
    area, log_r = h * w, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ch, cw = h, w  # fallback: the whole image, narrowed to the nearest allowed aspect ratio
    if w / h > ratio[1]:
        cw = int(round(h * ratio[1]))
    elif w / h < ratio[0]:
        ch = int(round(w / ratio[0]))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class Preprocess:
    """np HxW image in [0, 1] (or uint8) -> torch (C, img_size, img_size), C = len(mean), normalised.
    Resizes to a square (no crop: lung apices and costophrenic angles sit at the edges). train=True adds a mild
    random resized crop (area 0.8-1.0) drawn from torch's RNG, so DataLoader worker seeding applies."""

    def __init__(self, img_size, mean=CXR_MEAN, std=CXR_STD, train=False, train_scale=(0.8, 1.0)):
        self.img_size, self.train, self.train_scale = int(img_size), train, train_scale
        self.mean, self.std = _stats(mean, std)

    def __call__(self, img):
        x = _to_tensor(img)
        if self.train:
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))
            t, l, h, w = crop_box(rng, *x.shape, scale=self.train_scale)
            x = x[t:t + h, l:l + w]
        x = resize(x, self.img_size)
        return (x[None] - self.mean) / self.std


# ----------------------------------------------------------------------------------------------------------------
# subject-level splits: images of one patient never straddle train and test (that leak inflates every metric)

def _subject_groups(subjects, seed):
    subj = np.array([str(s) for s in subjects])  # strings, so 123 and "123" are the same patient
    uniq = np.unique(subj)  # sorted: the split depends on the seed only, never on row order
    return subj, uniq[np.random.default_rng(seed).permutation(len(uniq))]


def split_by_subject(subjects, fractions=(0.7, 0.15, 0.15), seed=0):
    """Split image indices into len(fractions) parts with disjoint subjects; fractions count subjects (normalised
    to sum 1). Returns a list of sorted np.int64 index arrays. Deterministic given the seed."""
    subj, order = _subject_groups(subjects, seed)
    fr = np.asarray(fractions, dtype=np.float64)
    if len(fr) == 0 or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"bad split fractions {fractions}")
    if len(order) < (fr > 0).sum():
        raise UserError(f"only {len(order)} distinct subjects: too few to split into {len(fr)} parts")
    counts = np.diff(np.round(np.cumsum(np.concatenate([[0], fr / fr.sum()])) * len(order)).astype(int))
    for i in np.flatnonzero((counts == 0) & (fr > 0)):  # every part asked for gets a subject, from the largest
        counts[np.argmax(counts)] -= 1
        counts[i] += 1
    edges = np.concatenate([[0], np.cumsum(counts)])
    return [np.flatnonzero(np.isin(subj, order[a:b])).astype(np.int64) for a, b in zip(edges[:-1], edges[1:])]


def kfold_by_subject(subjects, k=5, seed=0):
    """k folds with disjoint subjects: list of (train_idx, test_idx) np.int64 arrays; every image is in exactly one
    test fold. Not stratified (patients are rarely many enough per class for that to matter). Deterministic."""
    subj, order = _subject_groups(subjects, seed)
    if len(order) < k:
        raise UserError(f"only {len(order)} distinct subjects: too few for {k}-fold cross-validation")
    tests = [np.isin(subj, chunk) for chunk in np.array_split(order, k)]
    return [(np.flatnonzero(~t).astype(np.int64), np.flatnonzero(t).astype(np.int64)) for t in tests]


def check_disjoint(subjects, *index_arrays, names=("train", "validation", "test")):
    """The one leak check: a UserError if any subject has images in two of the index arrays (named by `names`)."""
    subj = np.array([str(s) for s in subjects])
    sets = [set(subj[np.asarray(ix, dtype=np.int64)]) for ix in index_arrays]
    for i, j in itertools.combinations(range(len(sets)), 2):
        shared = sorted(sets[i] & sets[j])
        if shared:
            raise UserError(f"subject leak: subject {shared[0]} has images in both the {names[i]} and the {names[j]} "
                            f"part ({len(shared)} such subject(s)); images of one patient must stay in one part")


# ----------------------------------------------------------------------------------------------------------------
# checking files upfront

def _decode_error(path):
    """None if the whole file decodes as an image, else why: a file cut short after an intact header fails here,
    not mid-run."""
    try:
        read_image(path)
        return None
    except ImageReadError as e:
        return str(e)


def _summarise_skipped(bad):
    names = sorted(bad)
    return f"skipped {len(names)} unreadable files: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"


def verify_images(paths, workers=8):
    """Decode every file (threads: the decoders release the GIL). Returns {index: reason} of the bad ones and logs a
    one-line summary naming them."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as ex:
        reasons = list(tqdm(ex.map(_decode_error, paths, chunksize=16), total=len(paths), desc="verify images",
                            disable=len(paths) < 1000))
    bad = {i: r for i, r in enumerate(reasons) if r is not None}
    if bad:
        log.warning(_summarise_skipped(os.fspath(paths[i]) for i in bad))
    return bad


# ----------------------------------------------------------------------------------------------------------------
# pretraining dataset

class PretrainDataset(torch.utils.data.Dataset):
    """Images for I-JEPA: RandomResizedCrop (area ~U(crop_scale), aspect ~U(crop_ratio)) to img_size, normalised,
    in_chans channels. No horizontal flip by default: chest X-rays have laterality (the heart is on the left).
    ds[(index, step)] -> (tensor (C, H, W), step), the crop drawn from an RNG seeded by (seed, step, index), so a
    resumed run sees the same crops; ds[index] draws from torch's RNG and returns step -1. An unreadable file, or an
    image under min_side px on its short side (a folder of 1x1 files would train on flat images), is replaced by the
    next readable item, named once in a warning on the "data" logger and added to `self.skipped` (per process, so
    per DataLoader worker). verify=True decodes every file upfront; with `cache` (imagecache.open_cache of these
    items) images come from the prepared 8-bit cache, and the files it could not read are skipped the same way."""

    def __init__(self, items, img_size=224, crop_scale=(0.3, 1.0), mean=CXR_MEAN, std=CXR_STD, cache=None,
                 in_chans=1, crop_ratio=(3 / 4, 4 / 3), hflip=False, seed=0, verify=False, min_side=1):
        self.items = [os.fspath(p) for p in items]
        if not self.items:
            raise UserError("no images to pretrain on")
        self.img_size, self.crop_scale, self.crop_ratio = int(img_size), crop_scale, crop_ratio
        self.hflip, self.seed, self.min_side = hflip, int(seed), int(min_side)
        self.mean, self.std = _stats(mean, std, in_chans)
        if cache is not None and len(cache) != len(self.items):
            raise UserError("the prepared cache holds a different image list: prepare it again with these sources")
        self.cache, self.reported = cache, set()
        self.bad = set() if cache is None else set(np.flatnonzero(~cache.ok).tolist())  # indices never tried
        if verify:
            self.bad |= set(verify_images(self.items))
        self.skipped = {self.items[i] for i in self.bad}
        if len(self.bad) == len(self.items):
            raise UserError(f"none of the {len(self.items)} images could be read (e.g. {self.items[0]})")

    def __len__(self):
        return len(self.items)

    def load(self, index):
        """The image at `index`, or the next readable one after it; (i, HxW image) with i the index used."""
        n = len(self.items)
        for k in range(n):
            i = (index + k) % n
            if i in self.bad:
                continue
            try:
                img = self.cache[i] if self.cache is not None else read_image(self.items[i])
                if min(img.shape[:2]) >= self.min_side:
                    return i, img
                why = f"{self.items[i]}: {img.shape[1]}x{img.shape[0]} px, under {self.min_side} px on its short side"
            except ImageReadError as e:
                why = f"unreadable image: {e}"
            self.bad.add(i)
            self.skipped.add(self.items[i])
            log.warning("skipping %s (%d skipped so far in this process)", why, len(self.skipped))
        raise UserError(f"none of the {n} images is readable and at least {self.min_side} px")

    def crop_of(self, index, rng):
        """(index used, its HxW image, crop box (top, left, height, width)) for the crop `rng` draws."""
        i, img = self.load(index)
        return i, img, crop_box(rng, *img.shape[:2], scale=self.crop_scale, ratio=self.crop_ratio)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            index, step = int(key[0]), int(key[1])
            rng = np.random.default_rng([self.seed % 2 ** 63, step % 2 ** 63, index % 2 ** 63])
        else:
            index, step = int(key), -1
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))
        _, img, (t, l, h, w) = self.crop_of(index, rng)
        x = _to_tensor(img[t:t + h, l:l + w])  # crop first, then convert: only the crop's pixels become float
        if self.hflip and rng.random() < 0.5:
            x = x.flip(1)
        x = resize(x, self.img_size)
        return (x[None] - self.mean) / self.std, step


# ----------------------------------------------------------------------------------------------------------------
# several sources in one run

@dataclasses.dataclass
class Source:
    """One pretraining source: image paths, their views (strings, or None when unknown), a sampling weight, and for
    a published archive (archives.PRETRAIN) each image's subject and the rows it skipped ({why: count})."""
    name: str
    paths: list
    views: list = None
    weight: float = 1.0
    subjects: list = None
    skipped: dict = dataclasses.field(default_factory=dict)
    excluded: int = 0  # images removed by --exclude_subjects

    def __len__(self):
        return len(self.paths)


def _split_weight(spec):
    """(PATH, WEIGHT) of PATH[:WEIGHT]; a ':' that is not followed by a number belongs to the path (C:\\data)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def parse_sources(specs, path_col="path", view_col="view", named=None):
    """Each spec is PATH[:WEIGHT] or NAME=PATH[:WEIGHT]. A folder -> find_images (views unknown); a .csv -> its
    `path_col` column, relative to the CSV's folder, with views from `view_col` when the CSV has one; NAME=PATH ->
    named[NAME](PATH), a reader of a published archive's own metadata returning a Source. Weight defaults to 1."""
    out, named = [], named or {}
    for spec in [specs] if isinstance(specs, str) else specs:
        spec = os.fspath(spec)
        path, weight = _split_weight(spec)
        if not (weight > 0 and math.isfinite(weight)):
            raise UserError(f"data source {spec!r}: the weight after ':' must be a positive number")
        name, eq, root = path.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][\w-]*", name) and not os.path.exists(path):  # NAME=PATH, not a path with '='
            if name not in named:
                raise UserError(f"data source {spec!r}: unknown archive {name!r} (NAME=PATH takes one of "
                                f"{', '.join(named) or 'none here'}; a plain folder or CSV needs no name)")
            if not os.path.isdir(root):
                raise UserError(f"data source {spec!r}: {root!r} is not a folder (give the archive's root folder)")
            src = named[name](root)
            src.weight = weight
            out.append(src)
        elif os.path.isdir(path):
            out.append(Source(path, find_images(path), None, weight))
        elif path.lower().endswith(".csv") and os.path.isfile(path):
            rows = read_csv(path, required=(path_col,))
            views = [r[view_col] or "" for r in rows] if view_col in rows[0] else None
            out.append(Source(path, [resolve(path, None, r[path_col]) for r in rows], views, weight))
        else:
            raise UserError(f"data source {path!r} is neither a folder nor a .csv file (expected PATH[:WEIGHT], a "
                            f"folder of images or a CSV with a '{path_col}' column, or NAME=PATH[:WEIGHT] with NAME "
                            f"one of {', '.join(named) or 'none'})")
    if not out:
        raise UserError("no data sources given")
    return out


def subject_key(s):
    """One spelling per patient id: MIMIC's 'p10000032' and '10000032', NIH's '00000001' and '1' are the same."""
    s = str(s).strip()
    m = re.fullmatch(r"[pP]?0*(\d+)", s)
    return m.group(1) if m else s


def read_subject_ids(files):
    """The subject ids of --exclude_subjects: a text file holds one per line (blank and '#' lines skipped); a CSV
    (.csv, .csv.gz) its `subject_id` or `subject` column, and when it has a `split` column (MIMIC-CXR's split file)
    only the rows that are not `train`: the subjects of the evaluation sets."""
    ids = set()
    for f in files:
        f = os.fspath(f)
        if f.endswith((".csv", ".csv.gz")):
            rows = read_csv(f)
            col = next((c for c in ("subject_id", "subject") if c in rows[0]), None)
            if col is None:
                raise UserError(f"--exclude_subjects {f}: no 'subject_id' or 'subject' column (its columns: "
                                f"{', '.join(rows[0])})")
            ids |= {subject_key(r[col]) for r in rows if r.get("split", "").strip() in ("", "validate", "val", "test")}
        else:
            try:
                with open(f) as fh:
                    ids |= {subject_key(x) for x in (ln.split(",")[0] for ln in fh) if x.strip() and x[0] != "#"}
            except OSError as e:
                raise UserError(f"--exclude_subjects {f}: cannot be read ({e.strerror or e})")
    return ids


def exclude_subjects(sources, ids):
    """Remove the images of these subjects (subject_key spellings) from every source that knows its subjects, in
    place; each source's count in .excluded. A source without subjects (a folder) cannot be filtered: an error."""
    if not ids:
        return sources
    for s in sources:
        if s.subjects is None:
            raise UserError(f"--exclude_subjects: source {s.name} has no subject ids (a folder or a CSV); give the "
                            f"archive as NAME=PATH (e.g. mimic=/data/mimic-cxr-jpg/2.0.0): its metadata names them")
        keep = [i for i, sub in enumerate(s.subjects) if subject_key(sub) not in ids]
        s.excluded = len(s) - len(keep)
        s.paths, s.subjects = [s.paths[i] for i in keep], [s.subjects[i] for i in keep]
        s.views = None if s.views is None else [s.views[i] for i in keep]
        if not s.paths:
            raise UserError(f"--exclude_subjects removed every image of {s.name}")
    return sources


def source_table(sources, sampler=None):
    """The paper's Table 1 for these sources, one row each and a total: subjects, images, views (frontal, lateral,
    other by view_kind; '-' when unknown), images excluded and rows skipped (with why); with a MixSampler, what one
    epoch draws of each view after the weights and --frontal_ratio (repeats where a view is short)."""
    head = ["source", "subjects", "images", "frontal", "lateral", "other", "excluded"]
    head += ["epoch frontal", "epoch lateral", "epoch other"] if sampler else []
    rows, total = [], np.zeros(len(head) - 1, np.int64)
    plan = sampler.plan() if sampler else [()] * len(sources)
    for s, drawn in zip(sources, plan):
        kinds = collections.Counter(view_kind(v) for v in s.views) if s.views is not None else None
        n = [len(set(s.subjects)) if s.subjects is not None else -1, len(s)]
        n += [kinds[k] for k in ("frontal", "lateral", "other")] if kinds else [-1] * 3
        n += [s.excluded, *drawn]
        total += np.maximum(n, 0)
        why = ", ".join(f"{c} {k}" for k, c in sorted(s.skipped.items())) or "0"
        rows.append([s.name, *("-" if v < 0 else str(v) for v in n), why])
    rows.append(["total", *map(str, total), str(sum(sum(s.skipped.values()) for s in sources))])
    rows.insert(0, head + ["skipped"])
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(" | ".join([r[0].ljust(w[0])] + [c.rjust(k) for c, k in zip(r[1:-1], w[1:])] + [r[-1]])
                     for r in rows)


def concat_paths(sources):
    """All sources' paths in order: the index space of MixSampler (source k starts after sources 0..k-1)."""
    return [p for s in sources for p in s.paths]


def view_kind(v):
    """'frontal' (PA, AP, AP supine, PA LLD, Frontal...), 'lateral' (LATERAL, LL, RL, L, Lateral...) or 'other'."""
    v = str(v or "").strip().upper().replace("_", " ")
    if v.startswith(("PA", "AP")) or "FRONTAL" in v:
        return "frontal"
    if "LAT" in v or v in ("LL", "RL", "L"):
        return "lateral"
    return "other"


def _apportion(total, weights):
    """Split `total` into integer parts proportional to weights (largest remainder: sums exactly to total)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    n = np.floor(exact).astype(np.int64)
    n[np.argsort(-(exact - n), kind="stable")[: total - n.sum()]] += 1
    return n


def _draw(rng, idx, n):
    """n items of idx: without replacement while n <= len(idx); beyond that, whole shuffled copies plus a remainder
    (each image then repeats ~n/len times, less variance than i.i.d. sampling with replacement)."""
    reps, rest = divmod(int(n), len(idx)) if len(idx) else (0, 0)
    parts = [rng.permutation(idx) for _ in range(reps)] + [rng.choice(idx, rest, replace=False)]
    return np.concatenate(parts).astype(np.int64)


class MixSampler(torch.utils.data.Sampler):
    """Per epoch: epoch_size draws (default: all images), source k contributing weight_k / sum(weights) of them.
    With frontal_ratio r (e.g. 3.0), a source with views draws frontal:lateral = r:1 (views neither frontal nor
    lateral keep their natural share; sources without views are drawn as they are). The epoch's list is shuffled
    and cut into `world` contiguous slices of equal length (the remainder is dropped); rank takes its slice.
    Everything is a function of (seed, epoch), identical on every rank. Yields indices into concat_paths(sources)."""

    def __init__(self, sources, weights=None, rank=0, world=1, seed=0, epoch_size=None, frontal_ratio=None):
        self.sizes = [len(s) for s in sources]
        if not self.sizes or min(self.sizes) == 0:
            raise UserError(f"every data source needs images (sizes: {self.sizes})")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.weights = [float(w) for w in ([s.weight for s in sources] if weights is None else weights)]
        if len(self.weights) != len(self.sizes) or min(self.weights) <= 0:
            raise UserError(f"need one positive weight per source, got {self.weights}")
        self.rank, self.world, self.seed, self.epoch = int(rank), int(world), int(seed), 0
        self.epoch_size = int(epoch_size or sum(self.sizes))
        self.frontal_ratio = frontal_ratio
        # per source: (frontal, lateral, other) local indices; all "other" when views are unknown or no ratio is asked
        kinds = [[view_kind(v) for v in s.views] if frontal_ratio and s.views else ["other"] * len(s) for s in sources]
        self.groups = [[np.flatnonzero(np.array(k) == kind) for kind in ("frontal", "lateral", "other")] for k in kinds]
        self.per_rank = self.epoch_size // self.world
        if self.per_rank == 0:
            raise UserError(f"epoch of {self.epoch_size} samples is smaller than the {self.world} processes")

    def _split(self, groups, n):
        """(frontal, lateral, other) draws of a source's n: other keeps its natural share, the rest is r:1."""
        front, lat, other = groups
        if not (len(front) or len(lat)):  # views unknown or all "other": nothing to rebalance
            return 0, 0, n
        n_other = int(round(n * len(other) / (len(front) + len(lat) + len(other))))
        m, r = n - n_other, self.frontal_ratio
        n_front = int(round(m * r / (1 + r))) if len(front) and len(lat) else (m if len(front) else 0)
        return n_front, m - n_front, n_other

    def plan(self):
        """Per source, how many (frontal, lateral, other) images one epoch draws (the same every epoch)."""
        return [self._split(g, int(n)) for g, n in zip(self.groups, _apportion(self.epoch_size, self.weights))]

    def epoch_list(self, epoch):
        """The whole epoch's shuffled index list (all ranks), a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed % 2 ** 63, int(epoch)])
        parts = [off + np.concatenate([_draw(rng, ix, k) for ix, k in zip(g, counts)])
                 for off, g, counts in zip(self.offsets, self.groups, self.plan())]
        return rng.permutation(np.concatenate(parts))

    def epoch_indices(self, epoch=None):
        """This rank's indices for `epoch` (default: the one set by set_epoch), as a list of ints."""
        e = self.epoch if epoch is None else epoch
        return self.epoch_list(e)[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(self.epoch_indices())

    def __len__(self):
        return self.per_rank
