"""
The prepared pretraining cache that prepare.py builds and data.PretrainDataset reads: every image decoded once,
its short side shrunk to min_stored_side (no training crop is ever upsampled), stored 8-bit, raw or PNG.

    side = imagecache.min_stored_side(224, (0.3, 1.0))   # 473 px for the paper's crops
    imagecache.prepare_cache(paths, "out/cache", side, shard=imagecache.shard_from_env())  # resumable
    cache = imagecache.open_cache("out/cache", paths, side)   # refused if unfinished, stale or too small
    img = cache[i]                                            # np.uint8 HxW; ImageReadError if it was unreadable

A cache folder holds
  manifest.json          what is being built: version, key (hash of the path list and storage settings), paths
  chunks/NNNNNN.bin      the images of chunk NNNNNN (chunk_size of them) back to back: raw uint8 rows or PNG files
  chunks/NNNNNN.json     that chunk's completion marker: per image [offset, nbytes, height, width, small, CRC-32 of
                         its bytes] or an error
  index.json, index.npz  the merged index, written once every chunk is done: the cache is usable only then
Every file is written to a temporary name and renamed, so a killed build leaves whole chunks or nothing; a rerun
skips the chunks whose marker exists. Chunk k belongs to shard k % n, so n processes (ranks, nodes, SLURM tasks)
share the work with no coordination; whichever finishes last finds every marker and writes the index.
"""
import contextlib
import hashlib
import io
import json
import math
import mmap
import multiprocessing
import os
import zlib

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from base import UserError, atomic_write
from data import ImageReadError, _summarise_skipped, log, read_image, read_json, resize

CACHE_VERSION = 3
CACHE_FORMATS = ("raw", "png")
FIELDS = ("offset", "nbytes", "height", "width", "small", "crc")  # a chunk marker's entry per image, in order


def min_stored_side(img_size, crop_scale=(0.3, 1.0), crop_ratio=(3 / 4, 4 / 3)):
    """Shortest stored side so that no random resized crop is upsampled: the smallest crop (area crop_scale[0], at
    the most extreme aspect ratio) of an image of short side s has a short side of at least s * sqrt(scale_min *
    min(ratio_min, 1/ratio_max)), so s >= img_size / sqrt(...): 473 px for 224 px crops, scale 0.3, ratio 3/4-4/3
    (448 is not enough: such a crop of a 448 px square is 212 px wide). At least 2 x img_size, for the filter."""
    worst = float(crop_scale[0]) * min(float(crop_ratio[0]), 1.0 / float(crop_ratio[1]))
    return max(2 * int(img_size), math.ceil(int(img_size) / math.sqrt(worst) + 0.5))  # +0.5: crop sides are rounded


def stored_shape(h, w, side):
    """(h, w) after shrinking the short side to `side`, aspect kept; images already at or below it are kept as
    they are (never upsampled: that would only cost disk and invent no detail)."""
    s = min(h, w)
    return (h, w) if s <= side else (max(side, round(h * side / s)), max(side, round(w * side / s)))


def _cache_key(paths, side, fmt):
    h = hashlib.sha1(json.dumps([CACHE_VERSION, int(side), fmt, len(paths)]).encode())
    for p in paths:
        h.update(os.fspath(p).encode() + b"\0")
    return h.hexdigest()[:16]


def _atomic_write(path, payload):
    def write(tmp):
        with open(tmp, "wb") as f:  # closed inside atomic_write's guard: a full disk at the last flush is caught too
            f.write(payload)
    atomic_write(path, write, "the cache's finished chunks are intact; run prepare.py again once there is space")


def _prepare_image(path, side):
    """Decode, shrink (antialiased) so the short side is `side`, 8-bit. Returns (uint8 HxW, was_small)."""
    # draft: JPEGs decode in the DCT domain at >= 2x the stored side (several times faster on 2-3k px files, and
    # the 2x margin keeps the result within a fraction of a grey level of a full decode + resize)
    img = read_image(path, draft=2 * side)
    x = resize(img, stored_shape(*img.shape, side))  # a no-op (but the conversion to a tensor) when not shrunk
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8).numpy(), min(img.shape) < side


def _prepare_chunk(job):
    """Build one chunk (in a worker process): decode its images, write .bin then the .json marker, atomically."""
    cache_dir, k, paths, side, fmt = job
    base = os.path.join(cache_dir, "chunks", f"{k:06d}")
    for f in os.listdir(os.path.dirname(base)):  # a killed earlier attempt at this chunk: its temp files
        if f.startswith(f"{k:06d}.") and ".tmp" in f:
            os.remove(os.path.join(os.path.dirname(base), f))
    blobs, items, off = [], [], 0
    for p in paths:
        try:
            img, small = _prepare_image(p, side)
        except ImageReadError as e:
            items.append({"error": str(e)})
            continue
        if fmt == "raw":
            b = img.tobytes()
        else:  # lossless; the decode cost is the same at every compression level
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", compress_level=6)
            b = buf.getvalue()
        items.append([off, len(b), img.shape[0], img.shape[1], int(small), zlib.crc32(b)])
        blobs.append(b)
        off += len(b)
    _atomic_write(base + ".bin", b"".join(blobs))
    _atomic_write(base + ".json", json.dumps(items).encode())  # the marker last: .bin is complete when it exists
    return k, len(paths)


def shard_from_env(spec=None):
    """(index, count) of this process's shard: from "I/N" if given, else torchrun's RANK / WORLD_SIZE, else SLURM's
    SLURM_PROCID / SLURM_NTASKS, else (0, 1)."""
    if spec:
        try:
            i, n = (int(x) for x in str(spec).split("/"))
        except ValueError:
            raise UserError(f"--shard {spec!r}: expected I/N, e.g. 0/4 (shard I of N, counting from 0)")
    else:
        i = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        n = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"shard {i}/{n}: need 0 <= I < N")
    return i, n


def prepare_cache(paths, cache_dir, side, fmt="raw", shard=(0, 1), workers=None, chunk_size=512, progress=True):
    """Build this shard's missing chunks of the cache of `paths` (over `workers` processes), then the index if every
    chunk is done: returns the PreparedCache then, else None (other shards still running)."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise UserError("no images to prepare")
    if fmt not in CACHE_FORMATS:
        raise UserError(f"cache format {fmt!r}: choose {' or '.join(CACHE_FORMATS)}")
    cache_dir, side, (si, sn) = os.fspath(cache_dir), int(side), shard
    key = _cache_key(paths, side, fmt)
    os.makedirs(os.path.join(cache_dir, "chunks"), exist_ok=True)
    manifest = os.path.join(cache_dir, "manifest.json")
    if os.path.exists(manifest):
        m = read_json(manifest)
        if m.get("key") != key:
            raise UserError(f"{cache_dir} holds a cache of another image list or other settings (side "
                            f"{m.get('side')} px, format {m.get('format')}, {len(m.get('paths', []))} images): "
                            "use another --cache_dir, or delete that folder to rebuild")
    else:  # every shard writes the same content, so concurrent writers are harmless
        _atomic_write(manifest, json.dumps({"version": CACHE_VERSION, "key": key, "side": side, "format": fmt,
                                            "chunk_size": chunk_size, "paths": paths}).encode())
        m = {"chunk_size": chunk_size}
    chunk_size = int(m["chunk_size"])  # a resumed build keeps the chunking it started with
    n_chunks = -(-len(paths) // chunk_size)
    done = lambda k: os.path.exists(os.path.join(cache_dir, "chunks", f"{k:06d}.json"))
    todo = [k for k in range(si, n_chunks, sn) if not done(k)]
    jobs = [(cache_dir, k, paths[k * chunk_size:(k + 1) * chunk_size], side, fmt) for k in todo]
    workers = min(len(jobs), (os.cpu_count() or 1) if workers is None else int(workers))
    # spawn, not fork: forking a process whose torch/OpenMP threads already ran can deadlock the children; one torch
    # thread each, since every worker resizes one image at a time. Leaving the `with` terminates the pool.
    with (multiprocessing.get_context("spawn").Pool(workers, torch.set_num_threads, (1,)) if workers > 1
          else contextlib.nullcontext()) as pool:
        results = pool.imap_unordered(_prepare_chunk, jobs) if pool else map(_prepare_chunk, jobs)
        with tqdm(total=sum(len(j[2]) for j in jobs), desc=f"prepare shard {si}/{sn}", disable=not progress) as bar:
            for _, n in results:
                bar.update(n)
    return merge_cache(cache_dir) if all(done(k) for k in range(n_chunks)) else None


def merge_cache(cache_dir):
    """Write index.json / index.npz from the chunk markers (all must exist). Idempotent. Returns PreparedCache."""
    cache_dir = os.fspath(cache_dir)
    m = read_json(os.path.join(cache_dir, "manifest.json"))
    paths, cs = m["paths"], int(m["chunk_size"])
    n = len(paths)
    cols = {k: np.zeros(n, np.int64) for k in ("chunk", *FIELDS)}
    skipped = {}
    for k in range(-(-n // cs)):
        marker = os.path.join(cache_dir, "chunks", f"{k:06d}.json")
        if not os.path.exists(marker):
            raise UserError(f"cache {cache_dir} is incomplete (chunk {k} missing): run prepare.py again (all shards)")
        for j, it in enumerate(read_json(marker)):
            i = k * cs + j
            cols["chunk"][i] = k
            if isinstance(it, dict):
                skipped[paths[i]] = it["error"]
                it = [0, -1, 0, 0, 0, 0]  # nbytes -1: unreadable
            for c, v in zip(FIELDS, it):
                cols[c][i] = v
    buf = io.BytesIO()
    np.savez(buf, **cols)
    _atomic_write(os.path.join(cache_dir, "index.npz"), buf.getvalue())
    ok = cols["nbytes"] >= 0
    info = {"version": CACHE_VERSION, "key": m["key"], "side": m["side"], "format": m["format"], "images": n,
            "stored": int(ok.sum()), "small": int(cols["small"][ok].sum()), "skipped": skipped,
            "bytes": int(cols["nbytes"][ok].sum())}
    _atomic_write(os.path.join(cache_dir, "index.json"), json.dumps(info).encode())  # last: the cache is complete
    return open_cache(cache_dir)


def open_cache(cache_dir, paths=None, min_side=None):
    """The PreparedCache in `cache_dir`; with `paths`, checked to hold exactly those images (in that order), with
    `min_side`, to store short sides at least that large: a UserError that says what to run otherwise."""
    cache_dir = os.fspath(cache_dir)
    index = os.path.join(cache_dir, "index.json")
    if not os.path.exists(index):
        state = "an unfinished" if os.path.exists(os.path.join(cache_dir, "manifest.json")) else "no"
        raise UserError(f"{cache_dir} holds {state} prepared cache: run `python prepare.py --data_dir ... "
                        f"--cache_dir {cache_dir}` first (with the same sources; it resumes)")
    info = read_json(index)
    if not isinstance(info, dict) or info.get("version") != CACHE_VERSION:
        raise UserError(f"{cache_dir} was prepared by another version of prepare.py: delete it and prepare again")
    if paths is not None:
        paths = [os.fspath(p) for p in paths]
        if _cache_key(paths, info["side"], info["format"]) != info["key"]:
            raise UserError(f"the cache in {cache_dir} was prepared for another image list ({info['images']} "
                            f"images; this run has {len(paths)}): prepare it again with the same --data_dir")
    if min_side is not None and info["side"] < min_side:
        raise UserError(f"the cache in {cache_dir} stores short sides of {info['side']} px, but this run's crops "
                        f"need {min_side} px not to be upsampled: prepare it again with this --img_size/--crop_scale")
    if info["skipped"]:
        log.warning(_summarise_skipped(info["skipped"]))
    return PreparedCache(cache_dir, info)


class PreparedCache:
    """Read side of a prepared cache: cache[i] -> uint8 HxW (short side = the stored side, or smaller if the
    original was). Chunk files are memory-mapped lazily in each process, so DataLoader workers receive a folder
    name and a few index arrays, not pixels; the OS page cache shares the mapped data between them."""

    def __init__(self, cache_dir, info):
        self.cache_dir, self.info = cache_dir, info
        self.side, self.format, self.skipped = int(info["side"]), info["format"], dict(info["skipped"])
        try:
            with np.load(os.path.join(cache_dir, "index.npz")) as z:
                self.chunk, self.offset, self.nbytes = z["chunk"], z["offset"], z["nbytes"]
                self.height, self.width, self.small = z["height"], z["width"], z["small"].astype(bool)
                self.crc = z["crc"]
        except Exception as e:  # truncated, foreign or missing: the cache cannot be trusted
            raise UserError(f"{cache_dir}/index.npz is unreadable ({type(e).__name__}): delete "
                            f"{cache_dir}/index.* and run prepare.py again (finished chunks are kept)") from None
        self.ok = self.nbytes >= 0
        self._maps = {}

    def __len__(self):
        return len(self.chunk)

    def _map(self, k):
        if k not in self._maps:
            path = os.path.join(self.cache_dir, "chunks", f"{k:06d}.bin")
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size  # mmap refuses an empty file (a chunk of unreadable images)
                    self._maps[k] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except OSError as e:
                raise ImageReadError(f"cache chunk {path} cannot be read ({e.strerror or e}): run prepare.py "
                                     "again (it rebuilds the missing chunks)") from None
        return self._maps[k]

    def __getitem__(self, i):
        if not self.ok[i]:
            raise ImageReadError(f"image {i} could not be read when the cache was prepared")
        o, n, k = int(self.offset[i]), int(self.nbytes[i]), int(self.chunk[i])
        m = self._map(k)
        # every image's bytes are checked against the CRC-32 prepare.py recorded (~0.1 ms for 200 KB): a chunk
        # overwritten or cut short is a counted, named skip, never training on garbage pixels
        if len(m) < o + n or zlib.crc32(memoryview(m)[o:o + n]) != int(self.crc[i]):
            raise ImageReadError(f"cache chunk {self.cache_dir}/chunks/{k:06d}.bin is corrupt (image {i} fails its "
                                 "checksum): delete that chunk's .bin and .json and run prepare.py again")
        if self.format == "raw":  # a read-only view of the mapped pages: only the crop taken from it is copied
            return np.frombuffer(m, dtype=np.uint8, count=n, offset=o).reshape(self.height[i], self.width[i])
        with Image.open(io.BytesIO(m[o:o + n])) as im:
            return np.asarray(im, dtype=np.uint8)

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}
