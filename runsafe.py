"""
Keeping a pretraining run's work safe (pretrain.py's machinery, apart so the training story reads top to bottom):
the out_dir lock, atomic writes that survive a full disk, checkpoints and the decision to resume, the flags a
resume may change, the encoder exports, the finite check, and the stop signals (SIGTERM / SIGUSR1).
"""
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import tempfile

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from common import UserError
from encoders import export_hf, save_encoder

TEMP = re.compile(r".*\.(tmp|old)\d+")  # what atomic writes leave behind when killed mid-write

# flags that may differ on --resume without changing what is computed (or that exist to be changed: max_steps and
# epochs extend or shorten the run); every other flag saved in the checkpoint must match unless in --allow_change
MAY_CHANGE = {"max_steps", "epochs", "num_workers", "log_every", "ckpt_every", "keep_ckpts", "out_dir", "resume",
              "overwrite", "allow_change", "device", "attn", "compile", "verify", "dump_rank_state", "cache_dir",
              "preset", "probe_every", "probe_csv"}


def on_main(env, fn):
    """fn() on rank 0 only; its result, or its UserError, reaches every rank (so no rank hangs in a collective)."""
    box = [None, None]
    if env.is_main:
        try:
            box[0] = fn()
        except UserError as e:
            box[1] = str(e)
    if env.distributed:
        dist.broadcast_object_list(box, src=0)
    if box[1]:
        raise UserError(box[1])
    return box[0]


def open_out_dir(out_dir):
    """Create out_dir, check it is writable, take its lock, remove temp files of killed runs. The lock is an flock
    on out_dir/.lock: the kernel drops it when the holder dies, so a killed run never blocks the next one."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
        lock = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"--out_dir {out_dir} is not writable ({e.strerror or e}): choose another folder")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise UserError(f"--out_dir {out_dir} is in use by another pretrain.py run ({lock.read().strip() or 'unknown'}):"
                        " wait for it to end, stop it, or choose another --out_dir")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    open_out_dir.lock = lock  # held (and the lock with it) until the process ends
    stale = sorted(n for n in os.listdir(out_dir) if TEMP.fullmatch(n) or n == "hf.new")
    for n in stale:
        p = os.path.join(out_dir, n)
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
    if stale:
        print(f"removed {len(stale)} temp file(s) left by a killed run: {', '.join(stale[:5])}", flush=True)


def old_checkpoints(out_dir):
    """[(step, path)] of the kept older checkpoints, oldest first."""
    found = [re.fullmatch(r"checkpoint_step(\d+)\.pt", n) for n in os.listdir(out_dir)]
    return sorted((int(m.group(1)), os.path.join(out_dir, m.group(0))) for m in found if m)


def read_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        older = ", ".join(os.path.basename(p) for _, p in old_checkpoints(os.path.dirname(path)))
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        + (f"older checkpoints here: {older} (rename one to checkpoint.pt)" if older else
                           "start over with --overwrite or point --out_dir elsewhere"))


def decide_start(args, ckpt_path):
    """True to resume. A checkpoint is never overwritten by accident: without --resume it is an error."""
    if args.overwrite:
        for n in os.listdir(args.out_dir):
            if n in ("checkpoint.pt", "encoder.safetensors", "log.jsonl") or re.fullmatch(r"checkpoint_step\d+\.pt|rank\d+\.json", n):
                os.remove(os.path.join(args.out_dir, n))
        return False
    if not os.path.exists(ckpt_path):
        if args.resume == "yes":
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a new run "
                            "(or use --resume auto)")
        return False
    if not args.resume:
        step = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("step", "?") \
            if os.path.getsize(ckpt_path) else "?"
        raise UserError(f"--out_dir {args.out_dir} already holds a run (checkpoint at step {step}): add --resume to "
                        "continue it (--resume auto: continue if there is one, else start), or --overwrite to start "
                        "over and delete it")
    return True


def check_resume_flags(saved, args):
    """Refuse flags that differ from the checkpoint's and change the run (each named); print the allowed ones."""
    def norm(v):
        return list(v) if isinstance(v, (tuple, list)) else v
    allowed = {a.lstrip("-") for a in args.allow_change}
    unknown = sorted(a for a in allowed if not hasattr(args, a))
    if unknown:
        raise UserError(f"--allow_change: no such flag {', '.join(unknown)}")
    changed = [(k, v, getattr(args, k)) for k, v in saved.items() if hasattr(args, k) and norm(v) != norm(getattr(args, k))
               and not (k == "dtype" and v is None)]  # None: a checkpoint from before the dtype was recorded
    refused = [c for c in changed if c[0] not in MAY_CHANGE | allowed]
    if refused:
        raise UserError("--resume: " + "; ".join(f"--{k} was {v} in the checkpoint, now {n}" for k, v, n in refused)
                        + ". These change the run: drop them, name them in --allow_change to change them on purpose, "
                          "or start over with --overwrite")
    shown = [c for c in changed if c[0] not in ("resume", "allow_change", "preset", "overwrite")]
    return ", ".join(f"--{k} {v} -> {n}" for k, v, n in shown)


def trim_log(path, step):
    """Keep the log lines of steps up to the checkpoint we restart from; a line cut short by a kill is dropped."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", -1) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except ValueError:
                pass
    write_atomic(path, lambda tmp: open(tmp, "w").writelines(keep), "the log could not be trimmed")


def write_atomic(path, write, if_failed):
    """write(tmp) then rename onto path. Disk full, read-only or any OS error: the temp files are removed, path is
    untouched, and the run ends with one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
        for n in os.listdir(os.path.dirname(path) or "."):
            if n.startswith(os.path.basename(tmp)):
                p = os.path.join(os.path.dirname(path), n)
                try:
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                except OSError:
                    pass
        try:
            free = f"{shutil.disk_usage(os.path.dirname(path) or '.').free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        why = f"{e.strerror}; {free}" if getattr(e, "strerror", None) else \
            f"the write failed with {free}, the disk is probably full: {str(e).splitlines()[0][:80]}"
        raise UserError(f"could not write {path} ({why}); {if_failed}. Free space or fix the folder, then --resume")


def torch_writer(obj):
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return write


def export_encoder(target, args, step, if_failed):
    """The run's exports of the target encoder, written right after the checkpoint of the same step (which is the
    commit point: --resume re-exports an export older than its checkpoint)."""
    path = os.path.join(args.out_dir, "encoder.safetensors")
    write_atomic(path, lambda tmp: save_encoder(target, tmp, step=step, model=args.model), if_failed)
    # the same encoder as a Hugging Face IJepaModel folder (encoders.export_hf): built beside, then swapped in
    hf, old = os.path.join(args.out_dir, "hf"), os.path.join(args.out_dir, f"hf.old{os.getpid()}")
    write_atomic(hf + ".new", lambda tmp: export_hf(target, tmp), if_failed)
    if os.path.isdir(hf):
        os.replace(hf, old)
    os.replace(hf + ".new", hf)
    shutil.rmtree(old, ignore_errors=True)


def exported_step(path):
    try:
        with safe_open(path, "pt") as f:
            return json.loads((f.metadata() or {}).get("step", "null"))
    except Exception:
        return None


def nonfinite(tensors, env):
    """Number of non-finite values in the floating-point tensors, summed on the device, agreed across ranks."""
    n = torch.zeros((), dtype=torch.long, device=env.device)
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            n += (~torch.isfinite(t)).sum().to(n.device)
    if env.distributed:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def worker_init(_):
    """SLURM signals every process of a step: workers ignore the stop signals and leave the stopping to the main
    process (which ends them), instead of dying and taking the run down with a traceback."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class Stopper:
    """SIGTERM / SIGUSR1 become a flag read at the end of each step. With several processes the flag is all-reduced
    (max) every step over a gloo group, on the CPU, so every rank stops at the same step without a GPU sync."""

    def __init__(self, env):
        self.sig, self.env, self.group = 0, env, None
        for s in STOP_SIGNALS:
            signal.signal(s, self._catch)
        if env.distributed:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _catch(self, signum, frame):
        self.sig = signum

    def agreed(self):
        if not self.env.distributed:
            return self.sig
        t = torch.tensor([self.sig])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t)
