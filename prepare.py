"""
Prepare the pretraining images once: decode every file of an archive (folders, CSVs with a `path` column, DICOM),
shrink it so that no training crop is ever upsampled, and store it 8-bit in a cache that pretrain.py reads (the
README's Input says what it stores and costs, imagecache.py how). A killed run continues when run again.

    python prepare.py --data_dir /data/mimic /data/chexpert/train.csv --cache_dir /fast/radjepa-cache
    python prepare.py --data_dir chexpert=/data/CheXpert-v1.0 mimic=/data/mimic-cxr-jpg/2.0.0 \
        --exclude_subjects /data/mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-split.csv.gz --cache_dir /fast/radjepa-cache
    python pretrain.py --data_dir /data/mimic /data/chexpert/train.csv --cache_dir /fast/radjepa-cache

    # split over machines / SLURM tasks: each process builds its share, the last to finish writes the index
    srun -n 8 python prepare.py --data_dir ... --cache_dir /shared/cache          # shard from SLURM_PROCID/NTASKS
    python prepare.py --data_dir ... --cache_dir C --shard 3/8                   # or explicitly, shard 3 of 8
    # the cache folder must be readable by every pretraining process: shared storage, or a copy on each node
"""
import time

import archives
import base
import data
import imagecache
from base import UserError


def get_args(argv=None):
    p = base.ArgumentParser(__doc__)
    archives.add_source_args(p)  # the sources and exclusions pretrain.py gets
    p.add_argument("--cache_dir", required=True, help="folder of the cache (created; resumed if it holds part of one)")
    p.add_argument("--img_size", type=int, default=224, help="training crop size the cache must serve (paper: 224)")
    p.add_argument("--crop_scale", type=float, nargs=2, default=(0.3, 1.0), help="training crop area range")
    p.add_argument("--side", type=int, default=None,
                   help="stored short side in px (default: the least that never upsamples an --img_size crop)")
    p.add_argument("--format", choices=list(imagecache.CACHE_FORMATS), default="raw",
                   help="raw: uint8 rows, fastest to read; png: lossless, smaller, one PNG decode per sample")
    p.add_argument("--workers", type=int, default=None, help="processes on this machine (default: every core)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="build shard I of N (default: from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS, else 0/1)")
    p.add_argument("--chunk_size", type=int, default=512, help="images per chunk (the unit of work and of resuming)")
    p.add_argument("--merge", action="store_true", help="only write the index from finished chunks")
    args = base.check(p.parse_args(argv), "img_size >= 1", "img_size <= 4096", "side >= 1", "chunk_size >= 1",
                      "workers >= 1")
    base.ordered_pair(args, "crop_scale", 1e-9, 1.0)
    if not (args.data_dir or args.merge):
        raise UserError("--data_dir is required: the sources pretrain.py will get (folders, CSVs, NAME=PATH archives)")
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
    sources = archives.pretrain_sources(args.data_dir, args.exclude_subjects)
    print(data.source_table(sources))
    paths = data.concat_paths(sources)
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
    return cache.info  # index.json as written


if __name__ == "__main__":
    base.run(main)
