"""
Plumbing every stage script shares, written once: the flags of docs/CONVENTIONS.md, clean one-line errors, checks
of the shared flags, presets, device / dtype / DDP set-up, the JSON-lines log and JSON output, atomic checkpoint
writes; and what the three evaluations (probe.py, segment.py, report.py) share: the frozen encoder (with a random
encoder of the same architecture as the baseline), the image dataset with its centre crop, the split with fixed
validation / test sets and the subject-leak check, the paired one-tailed bootstrap test and its compare driver.

Nothing here knows about a particular stage; read pretrain.py (or any stage script) to see it used.
"""
import contextlib
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, unreadable checkpoint): one line, no traceback."""


def run(main):
    """Call main(); turn a UserError into `error: ...` on stderr and exit status 2 (docs/CONVENTIONS.md)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# flags

def add_common_args(p, stage, batch_size=64, epochs=10, lr=1e-3, model="vit_base", img_size=224):
    """The flags every stage script has, with the stage's own defaults."""
    g = p.add_argument_group("common (see docs/CONVENTIONS.md)")
    g.add_argument("--out_dir", default=os.path.join("out", stage), help="where everything this run writes goes")
    g.add_argument("--model", default=model, help="vit_tiny | vit_small | vit_base | vit_large | vit_huge")
    g.add_argument("--img_size", type=int, default=img_size, help="input resolution in pixels")
    g.add_argument("--patch_size", type=int, default=14)
    g.add_argument("--attn", default=None, choices=["triton", "sdpa", "math"],
                   help="attention implementation (default: triton on CUDA if its start-up self-check passes, sdpa "
                        "elsewhere)")
    g.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--batch_size", type=int, default=batch_size, help="per-process batch size")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimiser steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    return g


def add_data_args(p, title, layouts, what, subject_default="subject"):
    """The data flags of the three evaluations (docs/CONVENTIONS.md): a generic CSV with fixed val / test sets, or
    a published layout (archives.py). `what`: the CSV's columns, for the help."""
    g = p.add_argument_group(title)
    g.add_argument("--csv", default=None, help=f"table of samples: {what}")
    g.add_argument("--image_root", default=None, help="folder the CSV's paths are relative to (default: its folder)")
    g.add_argument("--path_col", default="path", help="image path column")
    g.add_argument("--subject_col", default=None, help=f"subject / patient id column (default: {subject_default})")
    g.add_argument("--val_csv", default=None, help="fixed validation set, same columns (replaces the inner split)")
    g.add_argument("--test_csv", default=None, help="fixed test set, same columns (replaces the split / CV)")
    g.add_argument("--dataset", default=None, choices=layouts, help="a published layout under --data_dir "
                   "(archives.py)")
    g.add_argument("--data_dir", default=None, help="root folder of --dataset")
    return g


def add_preset_arg(p, presets):
    p.add_argument("--preset", default=None, choices=list(presets),
                   help="flag defaults: 'paper' with data flags, 'demo' without (a flag given explicitly wins)")


def apply_preset(args, presets, has_data):
    """The one preset mechanism: every flag the preset names and the user left unset (None) takes its value."""
    args.preset = args.preset or ("paper" if has_data else "demo")
    for k, v in presets[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def check_args(args):
    """One-line errors for shared flags with impossible values (instead of a traceback deep inside a run)."""
    from model import VIT_CONFIGS  # here, not at the top: model.py must stay importable without this module's users
    if getattr(args, "model", None) is not None and args.model not in VIT_CONFIGS:
        raise UserError(f"--model {args.model!r} unknown: choose from {', '.join(VIT_CONFIGS)}")
    for flag in ("batch_size", "epochs", "max_steps", "patch_size", "img_size"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise UserError(f"--{flag} {v}: must be at least 1")
    if getattr(args, "lr", None) is not None and not args.lr > 0:
        raise UserError(f"--lr {args.lr}: the learning rate must be positive")
    if getattr(args, "num_workers", 0) < 0:
        raise UserError("--num_workers must be 0 or more")
    return args


# ----------------------------------------------------------------------------------------------------------------
# devices and processes

class Env:
    """Where this process runs: rank / world size under torchrun, device, autocast dtype."""

    def __init__(self, rank, world, local_rank, device, dtype):
        self.rank, self.world, self.local_rank, self.device, self.dtype = rank, world, local_rank, device, dtype
        self.is_main = rank == 0
        self.distributed = world > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def print(self, *a, **k):
        if self.is_main:
            print(*a, **k, flush=True)

    def barrier(self):
        if self.distributed:
            dist.barrier()


def launch_ranks():
    """(rank, world size, local rank) from torchrun's variables, else from SLURM's when started by `srun python ...`
    (MASTER_ADDR / MASTER_PORT must then be exported, as in the README's sbatch script; a one-node job defaults to
    this machine), else a single process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        if world > 1:
            if "MASTER_ADDR" not in env and env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES")) != "1":
                raise UserError("srun without torchrun on several nodes: export MASTER_ADDR (the first node's host "
                                "name) and MASTER_PORT before srun, as in the README's sbatch script")
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            env.setdefault("MASTER_PORT", "29500")
        return int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0))
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def setup(args):
    """Initialise DDP when launched by torchrun or srun (NCCL on GPU, gloo on CPU), pick device and dtype, seed RNGs."""
    rank, world, local_rank = launch_ranks()
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    device = torch.device(want)
    if device.type == "cuda":
        if world > 1 or device.index is None:
            device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = names[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if getattr(args, "attn", None) is None:  # triton on CUDA only if its start-up self-check passes (triton_attn/)
        from triton_attn.selfcheck import default_attention
        args.attn = default_attention(device) if device.type == "cuda" else "sdpa"
    seed_everything(args.seed + rank)
    return Env(rank, world, local_rank, device, dtype)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# outputs

class JsonlLogger:
    """Appends one JSON object per line to out_dir/log.jsonl (rank 0 only); flushed so a killed run keeps it."""

    def __init__(self, path, enabled=True, truncate_after_step=None):
        self.path, self.enabled = path, enabled
        if enabled and truncate_after_step is not None and os.path.exists(path):
            # on resume, drop lines logged after the checkpoint we restart from so the log has no duplicates
            with open(path) as f:
                keep = [l for l in f if l.strip() and json.loads(l).get("step", -1) <= truncate_after_step]
            with open(path, "w") as f:
                f.writelines(keep)
        elif enabled and os.path.exists(path):
            os.remove(path)

    def log(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: a kill never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_safe(o):
    """NaN / inf (a metric undefined for a class without positives) as null: results.json stays strict JSON."""
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def write_json(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2, default=float)
    os.replace(tmp, path)


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self):
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


# ----------------------------------------------------------------------------------------------------------------
# statistics shared by the three evaluations

def paired_bootstrap(stat, n_items, n_boot=1000, seed=0):
    """Paired bootstrap of a difference between two systems evaluated on the same n_items test items.

    stat(idx) -> (value_a, value_b) for a resample idx of item indices (both systems on the SAME resample, which
    is what makes the test paired). Returns the observed difference a - b, its 95% CI, and the one-tailed p-value of
    "A is better than B" = fraction of resamples where a - b <= 0 (the paper's Table 6 test).
    """
    rng = np.random.default_rng(seed)
    a, b = stat(np.arange(n_items))
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, n_items, n_items)
        va, vb = stat(idx)
        if np.isfinite(va) and np.isfinite(vb):
            deltas.append(va - vb)
    deltas = np.asarray(deltas)
    if len(deltas) == 0:
        return {"a": float(a), "b": float(b), "delta": float(a - b), "ci95": [float("nan")] * 2, "p_one_tailed": float("nan"), "n_boot": 0}
    return {
        "a": float(a), "b": float(b), "delta": float(a - b),
        "ci95": [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))],
        "p_one_tailed": float((np.sum(deltas <= 0) + 1) / (len(deltas) + 1)),
        "n_boot": int(len(deltas)),
    }


def bootstrap_ci(stat, n_items, n_boot=500, seed=0):
    """Median and 95% percentile interval of stat(idx) over n_boot resamples of the items (report.py's CIs)."""
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n_items, n_items)) for _ in range(n_boot)], dtype=float)
    vals = vals[np.isfinite(vals)]
    return {"median": float(np.median(vals)), "ci95": [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]}


def nanmean(a, axis=None):
    """Mean over the finite values (NaN = a metric undefined there); an all-NaN slice is NaN, without a warning."""
    a = np.asarray(a, dtype=np.float64)
    ok = np.isfinite(a)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, a, 0).sum(axis) / ok.sum(axis) if axis is not None else (
            float(a[ok].mean()) if ok.any() else float("nan"))


def mark(p):
    """Table 6's significance marks for a one-tailed p-value: ** p < 0.01, * p < 0.05, else nothing."""
    return "" if p is None or not np.isfinite(p) else "**" if p < 0.01 else "*" if p < 0.05 else ""


def paired_compare(args, a, b, stats, n_items, unit="test images", digits=3):
    """The compare driver of the three evaluations: a paired bootstrap per row of stats {row: stat(idx) -> (value of
    A, value of B)} over the same n_items, printed as a table and written to out_dir/compare.json. A row named by a
    tuple (metric, class) is filed as out['metrics'][metric][class], a plain name as out['metrics'][name]."""
    out = {"a": a, "b": b, f"n_{unit.split()[-1]}": n_items, "n_boot": args.n_boot, "metrics": {}}
    print(f"A = {a}\nB = {b}\npaired bootstrap over {n_items} {unit}, {args.n_boot} resamples")
    print(f"{'':30s} {'A':>8s} {'B':>8s} {'A-B':>9s}   {'95% CI of A-B':21s} {'p(A>B)':>8s}")
    for key, stat in stats.items():
        r = paired_bootstrap(stat, n_items, n_boot=args.n_boot, seed=args.seed)
        if isinstance(key, tuple):
            out["metrics"].setdefault(key[0], {})[key[1]] = r
        else:
            out["metrics"][key] = r
        name, d = " ".join(key) if isinstance(key, tuple) else key, digits
        ci = f"[{r['ci95'][0]:+.{d}f}, {r['ci95'][1]:+.{d}f}]"
        print(f"{name[:30]:30s} {r['a']:8.{d}f} {r['b']:8.{d}f} {r['delta']:+9.{d}f}   {ci:21s} "
              f"{r['p_one_tailed']:8.4f}{mark(r['p_one_tailed'])}")
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(out, os.path.join(args.out_dir, "compare.json"))
    print(f"one-tailed p = share of resamples where A is not better (* p < 0.05, ** p < 0.01); wrote "
          f"{os.path.join(args.out_dir, 'compare.json')}")
    return out


def same_items(pa, keys_a, pb, keys_b, what="test images"):
    if list(keys_a) != list(keys_b):
        n = len(set(keys_a) ^ set(keys_b))
        raise UserError(f"{pa} and {pb} cover different {what} ({n} not in both): run both encoders on the same data "
                        f"and split (same --seed)")


# ----------------------------------------------------------------------------------------------------------------
# convex heads on frozen features (probe.py's linear head, segment.py's linear decoder): solved, not trained

# L2 strengths tried, strongest first, each fit warm-starting the next: half-decades spanning what standardised
# features of 10^2 to 10^5 images need; a sweep stops once PATIENCE strengths in a row bring nothing better
L2_GRID = np.logspace(0, -6, 13)
PATIENCE = 3
GRAD_TOL = 1e-6  # L-BFGS stops when no gradient entry is larger: converged in float64 for every practical purpose


def lbfgs(params, objective, tol=GRAD_TOL, max_iter=2000):
    """Minimise objective() (which returns its value and leaves its gradient in the params' .grad) by L-BFGS with
    a strong-Wolfe line search, until no gradient entry exceeds tol. Returns the facts results.json reports."""
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        return objective()
    opt.step(closure)
    opt.zero_grad()
    f = float(objective())
    g = max(float(p.grad.abs().max()) for p in params)
    return {"objective": f, "grad_max": g, "iterations": opt.state[params[0]]["n_iter"], "converged": g <= tol}


# ----------------------------------------------------------------------------------------------------------------
# the frozen encoder of the three evaluations

def add_eval_args(p, n_boot=1000):
    """Encoder flags (encoders.py) plus what every evaluation adds: its row label and the random baseline."""
    from encoders import add_encoder_args
    add_encoder_args(p)
    g = p.add_argument_group("baseline")
    g.add_argument("--name", default=None, help="the encoder's row label in the table")
    g.add_argument("--baseline", default="none", choices=["none", "random"],
                   help="random: also run a randomly initialised encoder of the SAME architecture and preprocessing "
                        "as --encoder, and test (paired, one-tailed) whether --encoder beats it")
    g.add_argument("--random_like", action="store_true",
                   help="evaluate a random init of --encoder's architecture instead of its weights (the baseline)")
    g.add_argument("--n_boot", type=int, default=n_boot, help="bootstrap resamples (CIs and comparisons)")


def load_frozen_encoder(args):
    """(vit, info, name) by docs/CONVENTIONS.md's resolution rule: --img_size / --patch_size / --model build a
    random encoder; a loaded one keeps its own resolution unless --enc_img_size says otherwise. --random_like
    swaps the weights for a seeded random init of exactly the loaded architecture (same preprocessing)."""
    from encoders import load_encoder_from_args
    vit, info = load_encoder_from_args(args)
    name = args.name or (os.path.basename(args.encoder) if args.encoder else info["source"].split(" (")[0])
    if args.random_like and info["format"] != "random-init":
        vit, info = random_like(vit, info, getattr(args, "attn", None) or "sdpa")
    if args.random_like:
        name = args.name or f"random {name}"
    info["crop_frac"] = crop_frac(info)
    return vit, info, name


def random_like(vit, info, attn="sdpa", seed=0):
    """A randomly initialised ViT of vit's architecture (its config), frozen, with the same preprocessing."""
    import model
    torch.manual_seed(seed)
    rand = model.VisionTransformer(attn=attn, **vit.config)
    if hasattr(model, "init_weights"):  # the project's default init, where model.py defines one
        model.init_weights(rand)
    rand.eval().requires_grad_(False)
    info = {**info, "format": "random-init", "source": f"random-init of the architecture of {info['source']}"}
    return rand, info


def run_baseline(main, args, argv):
    """--baseline random: run the same evaluation with --random_like into out_dir/baseline_random, then the paired
    comparison of the two runs (main(['--compare', A, B])). Returns the comparison."""
    if args.baseline != "random" or args.random_like:
        return None
    base = os.path.join(args.out_dir, "baseline_random")
    argv = list(sys.argv[1:] if argv is None else argv)
    print(f"\nbaseline: a random encoder of the same architecture, in {base}")
    main(argv + ["--random_like", "--baseline", "none", "--out_dir", base])
    return main(["--compare", args.out_dir, base, "--out_dir", args.out_dir, "--n_boot", str(args.n_boot),
                 "--seed", str(args.seed)])


# ----------------------------------------------------------------------------------------------------------------
# images: centre crop + resize (the paper's preprocessing), loaded in DataLoader workers

# Share of the shorter side the centre crop keeps, from the encoder's own preset (encoders.preset): an encoder whose
# card resizes the shorter side to resize_to and crops img_size keeps img_size / resize_to of it (DINOv2 224 / 256,
# CLIP and RAD-DINO 1, BioViL-T 448 / 512); one without (RadJEPa, I-JEPA, this project's) keeps the largest centred
# square, as the paper's "centre crop and resize" says. Cropping first and resizing after is the same geometry.
def crop_frac(info):
    return min(1.0, info["img_size"] / info["resize_to"]) if info.get("resize_to") else 1.0


def center_box(h, w, frac=1.0):
    """(top, left, side) of the centred square covering frac of the shorter side."""
    side = max(1, int(round(min(h, w) * frac)))
    return (h - side) // 2, (w - side) // 2, side


def center_crop(img, frac=1.0):
    t, l, s = center_box(img.shape[0], img.shape[1], frac)
    return img[t:t + s, l:l + s]


class Images(torch.utils.data.Dataset):
    """(image tensor, index, error) per path: centre crop, resize, normalise (info's img_size / mean / std). A bad
    file yields a placeholder and its error, reported by the main process in one line (not a worker traceback)."""

    def __init__(self, paths, info, crop=True):
        import data
        self.paths, self.data = paths, data
        self.frac = info.get("crop_frac", 1.0) if crop else None
        self.pre = data.Preprocess(info["img_size"], info["mean"], info["std"])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = self.data.read_image(self.paths[i])
            return self.pre(center_crop(img, self.frac) if self.frac else img), i, ""
        except self.data.ImageReadError as e:
            return torch.zeros(len(self.pre.mean), self.pre.img_size, self.pre.img_size), i, str(e)


def image_batches(paths, info, batch_size, num_workers, crop=True):
    """Batches (x, indices) of Images(paths); the first unreadable file ends the run with its one-line error."""
    for x, idx, err in torch.utils.data.DataLoader(Images(paths, info, crop), batch_size=batch_size,
                                                   num_workers=num_workers):
        if any(err):
            raise UserError([e for e in err if e][0])
        yield x, idx


def file_identity(paths):
    """[real path, size, modification time] per file: a file rewritten in place gets a new identity."""
    return [[os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


@torch.no_grad()
def encode_images(paths, info, fn, env, batch_size, num_workers, cache=None):
    """fn(x) (a frozen encoder's features of a batch) for every image, in order, as one CPU tensor; cached in the
    file `cache` when given (a cache that does not load is recomputed, with a warning: it is only a shortcut).
    Under torchrun each rank encodes every world-th image and rank 0 gathers them (the other ranks get None)."""
    from tqdm import tqdm
    if cache and os.path.exists(cache):
        try:
            got = torch.load(cache, weights_only=True, mmap=True)  # mapped: the features need not fit in memory
            ok = got["paths"] == list(paths) and got["feats"].shape[0] == len(paths)
        except Exception as e:  # truncated, or not ours
            env.print(f"warning: feature cache {cache} is unreadable ({type(e).__name__}): recomputing it")
            ok = False
        if ok:
            env.print(f"features: reusing {cache}")
            return got["feats"]
    mine = list(range(env.rank, len(paths), env.world))
    feats, bar = [], tqdm(total=len(mine), desc="embedding images", disable=not env.is_main)
    for x, _ in image_batches([paths[i] for i in mine], info, batch_size, num_workers):
        feats.append(fn(x).cpu())
        bar.update(len(x))
    bar.close()
    feats = torch.cat(feats)
    if env.distributed:
        gathered = [None] * env.world
        dist.all_gather_object(gathered, (mine, feats.numpy()))
        if not env.is_main:
            return None
        feats = torch.empty(len(paths), *feats.shape[1:], dtype=feats.dtype)
        for idx, f in gathered:
            feats[idx] = torch.from_numpy(f)
    if cache:
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        atomic_save({"paths": list(paths), "feats": feats, "source": info["source"]}, cache)
        env.print(f"features: {tuple(feats.shape)} cached in {cache}")
    return feats


# ----------------------------------------------------------------------------------------------------------------
# splits: fixed validation / test sets where the data has them, subjects never in two parts

def split_samples(samples, fractions=None, seed=0, need=("train", "val", "test")):
    """{'train', 'val', 'test'} -> samples. A sample's 'part' (a published split, --val_csv / --test_csv) is kept;
    the others are split by subject over the parts still missing, with fractions {part: share}. Then the leak
    check: no subject in two parts (e.g. one patient in both --csv and --test_csv) and no empty part."""
    import data
    fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
    parts = {k: [s for s in samples if s.get("part") == k] for k in ("train", "val", "test")}
    pool = [s for s in samples if s.get("part") not in parts]
    want = [k for k in ("train", "val", "test") if not parts[k] and fractions.get(k)]
    if pool and want:
        idx = data.split_by_subject([s["subject"] for s in pool], [fractions[k] for k in want], seed=seed)
        for k, ix in zip(want, idx):
            parts[k] = [pool[i] for i in ix]
    elif pool:
        parts["train"] += pool
    check_leak(parts, need)
    return parts


def check_leak(parts, need=("train", "val", "test")):
    seen = {}
    for k in ("train", "val", "test"):
        if k in need and not parts.get(k):
            raise UserError(f"the {k} part is empty: give more data or a --{k}_csv")
        for s in parts.get(k, []):
            other = seen.setdefault(str(s["subject"]), k)
            if other != k:
                raise UserError(f"subject leak: subject {s['subject']} has images in both the {other} and the {k} "
                                f"part; images of one patient must stay in one part")
