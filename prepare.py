"""
Prepare the pretraining images once: decode every file of an archive (folders, CSVs with a `path` column, DICOM),
shrink it so that no training crop is ever upsampled, and store it 8-bit in a cache that pretrain.py reads.

    python prepare.py --data_dir /data/mimic /data/chexpert/train.csv --cache_dir /fast/radjepa-cache
    python pretrain.py --data_dir /data/mimic /data/chexpert/train.csv --cache_dir /fast/radjepa-cache

    # split over machines / SLURM tasks: each process builds its share, the last to finish writes the index
    srun -n 8 python prepare.py --data_dir ... --cache_dir /shared/cache          # shard from SLURM_PROCID/NTASKS
    python prepare.py --data_dir ... --cache_dir C --shard 3/8                   # or explicitly, shard 3 of 8

What is stored: each image with its short side shrunk to imagecache.min_stored_side(img_size, crop_scale) (473 px for
224 px crops of 30-100% of the area at aspect 3/4-4/3: the smallest such crop is still 224 px on its short side),
aspect kept, antialiased, 8-bit grey; originals already smaller are stored as they are and counted (their crops
are upsampled in training whatever the cache does). --format raw (default) stores uint8 rows, read with no decode
at all; --format png is lossless and smaller on disk, at the price of a PNG decode per training sample. Disk per
100k images (measured on 512 px NIH frontals, stored at 473 x 473): raw 22.4 GB, png see the closing summary.

How: the image list is cut into chunks of --chunk_size; chunk k belongs to shard k % N and is built by one of
--workers processes on this machine (default: every core), written to a temporary file and renamed, then marked
done. A killed run loses at most the chunks in flight: run the same command again and it continues. No process
ever waits for another: each one finishing checks whether every chunk is done and, if so, writes the index.
The cache folder must be one that every pretraining process can read (shared storage, or copied to each node).
"""
import argparse
import json
import os
import time

import base
import data
import imagecache
from base import UserError


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", nargs="+", required=True, metavar="SOURCE",
                   help="the same sources pretrain.py gets: image folders or CSVs (column `path`), optionally PATH:WEIGHT")
    p.add_argument("--cache_dir", required=True, help="folder of the cache (created; resumed if it holds part of one)")
    p.add_argument("--img_size", type=int, default=224, help="training crop size the cache must serve (paper: 224)")
    p.add_argument("--crop_scale", type=float, nargs=2, default=(0.3, 1.0), help="training crop area range")
    p.add_argument("--side", type=int, default=None,
                   help="stored short side in px (default: the least that never upsamples a crop at --img_size and "
                        "--crop_scale)")
    p.add_argument("--format", choices=list(imagecache.CACHE_FORMATS), default="raw",
                   help="raw: uint8 rows, fastest to read; png: lossless, smaller, one PNG decode per sample")
    p.add_argument("--workers", type=int, default=None, help="processes on this machine (default: every core)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="build shard I of N (default: from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS, else 0/1)")
    p.add_argument("--chunk_size", type=int, default=512, help="images per chunk (the unit of work and of resuming)")
    p.add_argument("--merge", action="store_true", help="only write the index from finished chunks")
    args = p.parse_args(argv)
    if args.img_size < 1 or args.chunk_size < 1 or (args.side is not None and args.side < 1):
        raise UserError("--img_size, --side and --chunk_size must be positive")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UserError(f"--crop_scale {args.crop_scale[0]} {args.crop_scale[1]}: need 0 < MIN <= MAX <= 1")
    return args


def summary(cache):
    """One paragraph on what the cache holds and what it costs on disk."""
    i = cache.info
    per_100k = i["bytes"] / max(1, i["stored"]) * 1e5 / 1e9
    return (f"cache: {i['stored']} of {i['images']} images stored at short side {i['side']} px ({i['format']}), "
            f"{i['small']} smaller originals kept as they are, {len(i['skipped'])} unreadable skipped; "
            f"{i['bytes'] / 1e9:.2f} GB, {per_100k:.1f} GB per 100k images")


def main(argv=None):
    args = get_args(argv)
    side = args.side or imagecache.min_stored_side(args.img_size, args.crop_scale)
    if args.merge:
        cache = imagecache.merge_cache(args.cache_dir)
        print(summary(cache))
        return cache.info
    paths = data.concat_paths(data.parse_sources(args.data_dir))
    shard = imagecache.shard_from_env(args.shard)
    t = time.perf_counter()
    print(f"{len(paths)} images -> {args.cache_dir} (short side {side} px, {args.format}), shard {shard[0]}/{shard[1]}",
          flush=True)
    cache = imagecache.prepare_cache(paths, args.cache_dir, side, args.format, shard, args.workers, args.chunk_size)
    dt = time.perf_counter() - t
    if cache is None:
        print(f"shard {shard[0]}/{shard[1]} done in {dt:.0f} s; other shards are still running (the last one to "
              f"finish writes the index; or run again with --merge once all are done)")
        return None
    print(summary(cache) + f"; {dt:.0f} s")
    with open(os.path.join(args.cache_dir, "index.json")) as f:
        return json.load(f)


if __name__ == "__main__":
    base.run(main)
