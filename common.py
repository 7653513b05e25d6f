"""
Plumbing every stage script shares, written once: the flags of ../shared/CONVENTIONS.md, clean one-line errors,
device / dtype / DDP set-up, the JSON-lines log, atomic checkpoint writes and the paired one-tailed bootstrap test
that probe.py, segment.py and report.py all use to compare two encoders.

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
    """Call main(); turn a UserError into `error: ...` on stderr and exit status 2 (CONVENTIONS.md)."""
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
    g = p.add_argument_group("common (see ../shared/CONVENTIONS.md)")
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


def setup(args):
    """Initialise DDP when launched by torchrun (NCCL on GPU, gloo on CPU), pick device and dtype, seed RNGs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
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
    if getattr(args, "attn", None) is None:  # triton on CUDA only if its start-up self-check passes (kernels/)
        from kernels.selfcheck import default_attention
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


def write_json(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
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
