"""
The ground floor every script stands on, with no project imports: one-line errors, the shared flags, presets and
their checks, devices and processes, outputs written atomically, the cosine schedule, and the statistics the
evaluations report (bootstrap CIs, paired one-tailed tests).

    from base import UserError, run
    add_common_args(p, "probe", models=VIT_CONFIGS); args = p.parse_args(argv)
    apply_preset(args, PRESETS, "paper")            # flags the user left unset take the preset's values
    check(args, "batch_size >= 1", "lr > 0")        # one line naming the flag, before any work
    env = setup(args)                               # rank / world under torchrun or srun, device, dtype, seeds
    atomic_write(path, lambda tmp: torch.save(obj, tmp), "nothing was lost")   # a kill or a full disk: old file kept
"""
import argparse
import contextlib
import importlib
import json
import math
import operator
import os
import random
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, unreadable file): one line, no traceback."""


def run(main):
    """Call main(); turn a UserError into `error: ...` on stderr and exit status 2 (docs/CONVENTIONS.md). The exit
    status is taken out of its exception before the process group is destroyed: the exception's traceback would
    keep main's frames, and through them the group, alive (see setup)."""
    status = None
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    except SystemExit as e:
        status = e.code
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if status is not None:
        sys.exit(status)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------------------------------------------
# flags: the shared ones (docs/CONVENTIONS.md), presets, and their checks

class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (`error: ...`, exit status 2) and the usage docstring as help."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_common_args(p, stage):
    """The flags every stage script has. Batch size, epochs, lr, model and resolution default to None: the
    script's preset fills them (apply_preset), so every default lives in one table per script."""
    g = p.add_argument_group("common (see docs/CONVENTIONS.md)")
    g.add_argument("--out_dir", default=os.path.join("out", stage), help="where everything this run writes goes")
    g.add_argument("--model", default=None, help="vit_tiny | vit_small | vit_base | vit_large | vit_huge (a model "
                                                 "that is built: pretraining, a random encoder)")
    g.add_argument("--img_size", type=int, default=None, help="input resolution in pixels")
    g.add_argument("--patch_size", type=int, default=14)
    g.add_argument("--attn", default=None, choices=["triton", "sdpa", "math"],
                   help="attention (default: triton on CUDA if its start-up self-check passes, sdpa elsewhere)")
    g.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="autocast dtype (default: bf16 on GPU; on a CPU the script's own choice, printed)")
    g.add_argument("--batch_size", type=int, default=None, help="per-process batch size")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimiser steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    return g


def add_preset_arg(p, presets, helps):
    p.add_argument("--preset", default=None, choices=list(presets),
                   help="defaults for the flags a preset names (a flag given explicitly wins): " + helps)


def apply_preset(args, presets, default):
    """The one preset mechanism: args.preset (or `default`) names a dict of flag values; every flag it names that
    the user left unset (None) takes its value."""
    args.preset = args.preset or default
    for k, v in presets[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


# what every script's shared flags must satisfy (each script adds its own rules)
COMMON_RULES = ("batch_size >= 1", "batch_size <= 65536", "epochs >= 1", "max_steps >= 1", "patch_size >= 1",
                "patch_size <= 64", "img_size >= 1", "img_size <= 4096", "lr > 0", "num_workers >= 0", "seed >= 0")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def check(args, *rules, models=None):
    """Each rule is 'flag OP bound' (OP one of > >= < <=): a flag that is set and breaks it is a one-line error
    before any work. A flag holding several numbers (--ema 0.996 1.0) is checked value by value. Whatever the
    rules, no number flag may be NaN or inf. models: the names --model may take."""
    if models is not None and getattr(args, "model", None) not in models:
        raise UserError(f"--model {args.model!r} unknown: choose from {', '.join(models)}")
    for flag, value in vars(args).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"--{flag} {v}: must be a finite number")
    for rule in rules:
        flag, op, bound = rule.split()
        value = getattr(args, flag, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not (math.isfinite(v) and _OPS[op](v, float(bound))):
                kind = "whole number" if isinstance(v, int) else "finite number"
                raise UserError(f"--{flag} {v}: must be a {kind} {op} {bound}")
    return args


def ordered_pair(args, flag, low=0.0, high=math.inf):
    """A two-number flag (MIN MAX) with low <= MIN <= MAX <= high."""
    lo, hi = getattr(args, flag)
    if not (math.isfinite(lo) and low <= lo <= hi <= high):
        top = f" <= {high:g}" if high < math.inf else ""
        raise UserError(f"--{flag} {lo:g} {hi:g}: need {low:g} <= MIN <= MAX{top}")


# ----------------------------------------------------------------------------------------------------------------
# devices and processes

class Env:
    """Where this process runs: rank / world size under torchrun, device, autocast dtype."""

    def __init__(self, rank, world, local_rank, device, dtype):
        self.rank, self.world, self.local_rank, self.device, self.dtype = rank, world, local_rank, device, dtype
        self.is_main, self.distributed = rank == 0, world > 1

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
    """Initialise DDP when launched by torchrun or srun (NCCL on GPU, gloo on CPU), pick device and dtype (bf16 on
    GPU, fp32 on a CPU unless --dtype says otherwise), seed the RNGs."""
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
        # destroy_process_group ends gloo's threads only if nothing else holds the group. torch._dynamo, imported
        # first by DDP's constructor once the group exists, holds it for good; its threads then outlive the run
        # into the interpreter's exit, where one still releasing a collective's tensors aborts the finished run
        # (SIGABRT, "terminate called without an active exception"). Imported before the group, it holds none.
        importlib.import_module("torch._dynamo")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    random.seed(args.seed + rank)
    np.random.seed((args.seed + rank) % 2**32)
    torch.manual_seed(args.seed + rank)
    return Env(rank, world, local_rank, device, dtype)


# ----------------------------------------------------------------------------------------------------------------
# outputs: every file is written to a temporary name and renamed, so a kill or a full disk never leaves half of one

def atomic_write(path, write, if_failed="nothing was changed"):
    """write(tmp) into a temporary path beside `path`, then rename it into place with the mode the umask gives
    (0644 usually: the lab can read it). Disk full, read-only or any OS error: the temporary file is removed,
    `path` is untouched, and the run ends with one line (saying `if_failed`)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask if os.path.isfile(tmp) else 0o777 & ~mask)
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        try:
            free = f"{shutil.disk_usage(os.path.dirname(path) or '.').free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        why = f"{e.strerror}; {free}" if getattr(e, "strerror", None) else \
            f"the write failed with {free}, the disk is probably full: {str(e).splitlines()[0][:80]}"
        raise UserError(f"could not write {path} ({why}); {if_failed}. Free space or fix the folder, then run again")


def save_torch(obj, path, if_failed="nothing was changed"):
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write, if_failed)


def refuse_nonfinite(tensors, what):
    """A trained model holding NaN / inf is never saved: one line instead (a diverging run, e.g. too high an lr)."""
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors if torch.is_tensor(t) and t.is_floating_point())
    if bad:
        raise UserError(f"{what} holds {bad} non-finite values: training diverged (lower --lr); nothing was saved")


def json_safe(o):
    """NaN / inf (a metric undefined for a class without positives) as null: results.json stays strict JSON."""
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def write_json(obj, path, if_failed="nothing was changed"):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(json_safe(obj), f, indent=2, default=float)
            f.write("\n")
    atomic_write(path, write, if_failed)


def write_args(args, out_dir):
    """out_dir/args.json: a run's settings as resolved (preset values included), readable beside its outputs."""
    os.makedirs(out_dir, exist_ok=True)
    write_json({k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
               os.path.join(out_dir, "args.json"))


class JsonlLogger:
    """Appends one JSON object per line to a log (rank 0 only), flushed so a killed run keeps it. A new run
    starts a new log; resume_step keeps the lines up to that step (the checkpoint restarted from) and drops the
    rest, a line cut short by a kill included."""

    def __init__(self, path, enabled=True, resume_step=None):
        self.path, self.enabled, self.mirror = path, enabled, None  # mirror: e.g. a TensorBoard writer
        if not enabled or not os.path.exists(path):
            return
        keep = []
        if resume_step is not None:
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", -1) <= resume_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
                    except ValueError:
                        pass
        def write(tmp):
            with open(tmp, "w") as f:  # closed inside atomic_write's guard, so a failed last flush is caught
                f.writelines(keep)
        atomic_write(path, write, "the log was kept as it was")

    def log(self, **row):
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:  # a full disk: one line, and the last checkpoint is intact
                raise UserError(f"could not append to {self.path} ({e.strerror or e}); the last checkpoint is intact: "
                                "free space, then run again (--resume continues a pretraining run)")
            if self.mirror is not None:
                self.mirror.log(**row)


def cosine(t, start, end):
    """start at t = 0, end at t = 1, along half a cosine (t is clamped to [0, 1])."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, t))))


# ----------------------------------------------------------------------------------------------------------------
# statistics of the evaluations

def paired_bootstrap(stat, n_items, n_boot=1000, seed=0):
    """Paired bootstrap of a difference between two systems evaluated on the same n_items test items.

    stat(idx) -> (value_a, value_b) for a resample idx of item indices (both systems on the SAME resample, which
    is what makes the test paired). Returns the observed difference a - b, its 95% CI, and the one-tailed p-value of
    "A is better than B" = fraction of resamples where a - b <= 0 (the paper's Table 6 test)."""
    rng = np.random.default_rng(seed)
    a, b = stat(np.arange(n_items))
    pairs = [stat(rng.integers(0, n_items, n_items)) for _ in range(n_boot)]
    deltas = np.asarray([va - vb for va, vb in pairs if np.isfinite(va) and np.isfinite(vb)])
    out = {"a": float(a), "b": float(b), "delta": float(a - b), "ci95": [math.nan] * 2, "p_one_tailed": math.nan,
           "n_boot": int(len(deltas))}
    if len(deltas):
        out.update(ci95=[float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))],
                   p_one_tailed=float((np.sum(deltas <= 0) + 1) / (len(deltas) + 1)))
    return out


def bootstrap_ci(stat, n_items, n_boot=500, seed=0):
    """Median and 95% percentile interval of stat(idx) over n_boot resamples of the items (report.py's CIs)."""
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n_items, n_items)) for _ in range(n_boot)], dtype=float)
    vals = vals[np.isfinite(vals)]
    return {"median": float(np.median(vals)),
            "ci95": [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]}


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
