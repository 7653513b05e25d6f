"""
Keeping a pretraining run's work safe, apart so that pretrain.py's training story reads top to bottom: the out_dir
lock, the decision to resume and the flags a resume may change, checkpoints and encoder exports that are written
only when finite and atomically, and the stop signals (SIGTERM / SIGUSR1).

    run = Run(args, env)                       # lock out_dir; resume, start or refuse (a checkpoint is never lost)
    step = run.restore(jepa, target, opt, scaler, total)   # 0, or the checkpoint's step with every state restored
    run.save(step, jepa, target, opt, scaler, total)       # finite? checkpoint, then export, atomically
    if run.stopper.agreed(): ...                          # a stop signal, agreed by every rank
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
from safetensors import safe_open

from base import UserError, atomic_write, save_torch
from encoders import export_hf, save_encoder
from weights import load_torch

TEMP = re.compile(r".*\.(tmp|old)\d+")  # what atomic writes leave behind when killed mid-write

# flags that may differ on --resume without changing what is computed (or that exist to be changed: max_steps and
# epochs extend or shorten the run); every other flag saved in the checkpoint must match unless in --allow_change
MAY_CHANGE = {"max_steps", "epochs", "num_workers", "log_every", "ckpt_every", "keep_ckpts", "out_dir", "resume",
              "overwrite", "allow_change", "device", "attn", "compile", "verify", "preset",
              "probe_every", "probe_csv", "monitor_every", "tensorboard", "init_from"}
# a closed terminal or ssh session (SIGHUP) stops a run as a scheduler does: a checkpoint of the step, then exit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
LOCK = []  # the locked out_dir's file descriptor: DataLoader workers close their inherited copy (worker_init)
# the stop signal caught (0: none). Not kept on the Stopper: a handler bound to it would keep its process group alive
# past destroy_process_group, and gloo's threads would then die with the interpreter ("terminate called without an
# active exception", SIGABRT, after the run's work is done)
CAUGHT = [0]


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


def nonfinite(tensors, env):
    """Number of non-finite values in the floating-point tensors, summed on the device, agreed across ranks."""
    n = torch.zeros((), dtype=torch.long, device=env.device)
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            n += (~torch.isfinite(t)).sum().to(n.device)
    if env.distributed:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n)


class Run:
    """One pretraining run's folder: out_dir/checkpoint.pt (the commit point), encoder.safetensors and hf/ (the
    exports of the same step), .lock, older checkpoint_step<N>.pt."""

    def __init__(self, args, env):
        self.args, self.env = args, env
        self.ckpt = os.path.join(args.out_dir, "checkpoint.pt")
        self.last_good = None  # step of the last checkpoint written or resumed from
        self.data = None  # what the run trains on (set once the sources are read): saved, and checked on --resume
        on_main(env, self._open)
        self.resume = on_main(env, self._decide)
        self.ck = self._read() if self.resume else None  # every rank reads it; the flag check is deterministic
        self.changes = self._check_flags(self.ck["args"]) if self.resume else ""
        self.stopper = Stopper(env)

    def _open(self):
        """Create out_dir, check it is writable, lock it, remove temp files of killed runs. The lock is an flock on
        the folder itself (deleting a file cannot steal it), which the kernel drops when the holder dies, so a
        killed run never blocks the next one; DataLoader workers close their inherited copy at once, so a
        scheduler's immediate requeue after kill -9 is not refused while they wind down. out_dir/.lock names the
        holder."""
        out, info = self.args.out_dir, os.path.join(self.args.out_dir, ".lock")
        try:
            os.makedirs(out, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
            fd = os.open(out, os.O_RDONLY)
        except OSError as e:
            raise UserError(f"--out_dir {out} is not writable ({e.strerror or e}): choose another folder")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = open(info).read().strip() if os.path.exists(info) else "unknown"
            raise UserError(f"--out_dir {out} is in use by another pretrain.py run ({holder}): wait for it to end, "
                            "stop it, or choose another --out_dir")
        LOCK[:] = [fd]  # held (and the lock with it) until the process ends
        with open(info, "w") as f:
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        stale = sorted(n for n in os.listdir(out) if TEMP.fullmatch(n) or re.fullmatch(r"hf\.(new|old\d+)", n))
        for n in stale:
            p = os.path.join(out, n)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        if stale:
            print(f"removed {len(stale)} temp file(s) left by a killed run: {', '.join(stale[:5])}", flush=True)

    def older(self):
        """[(step, path)] of the kept older checkpoints, oldest first."""
        found = [re.fullmatch(r"checkpoint_step(\d+)\.pt", n) for n in os.listdir(self.args.out_dir)]
        return sorted((int(m.group(1)), os.path.join(self.args.out_dir, m.group(0))) for m in found if m)

    def _decide(self):
        """True to resume. A checkpoint is never overwritten by accident: without --resume it is an error."""
        args = self.args
        if args.overwrite:
            for n in os.listdir(args.out_dir):
                if n in ("checkpoint.pt", "encoder.safetensors", "log.jsonl") or \
                        re.fullmatch(r"checkpoint_step\d+\.pt|rank\d+\.json", n):
                    os.remove(os.path.join(args.out_dir, n))
            return False
        if not os.path.exists(self.ckpt):
            if args.resume == "yes":
                raise UserError(f"--resume: no checkpoint at {self.ckpt}; drop --resume to start a new run "
                                "(or use --resume auto)")
            return False
        if not args.resume:
            try:
                step = load_torch(self.ckpt).get("step", "?")
            except UserError:
                step = "?"
            raise UserError(f"--out_dir {args.out_dir} already holds a run (checkpoint at step {step}): add --resume "
                            "to continue it (--resume auto: continue if there is one, else start), or --overwrite to "
                            "start over and delete it")
        return True

    CHECKPOINT_KEYS = ("encoder", "predictor", "target_encoder", "optimizer", "scaler", "step", "total", "world",
                       "rng", "args")

    def _read(self):
        try:
            return load_torch(self.ckpt, self.CHECKPOINT_KEYS)
        except UserError as e:
            older = ", ".join(os.path.basename(p) for _, p in self.older())
            raise UserError(f"{e}; " + (f"older checkpoints here: {older} (rename one to checkpoint.pt)" if older else
                                        "start over with --overwrite or point --out_dir elsewhere"))

    def _check_flags(self, saved):
        """Refuse flags that differ from the checkpoint's and change the run (each named); list the allowed ones."""
        args, norm = self.args, (lambda v: list(v) if isinstance(v, (tuple, list)) else v)
        allowed = {a.lstrip("-") for a in args.allow_change}
        unknown = sorted(a for a in allowed if not hasattr(args, a))
        if unknown:
            raise UserError(f"--allow_change: no such flag {', '.join(unknown)}")
        changed = [(k, v, getattr(args, k)) for k, v in saved.items()
                   if hasattr(args, k) and norm(v) != norm(getattr(args, k))]
        refused = [c for c in changed if c[0] not in MAY_CHANGE | allowed]
        if refused:
            raise UserError("--resume: " + "; ".join(f"--{k} was {v} in the checkpoint, now {n}" for k, v, n in refused)
                            + ". These change the run: drop them, name them in --allow_change to change them on "
                              "purpose, or start over with --overwrite")
        return ", ".join(f"--{k} {v} -> {n}" for k, v, n in changed if k not in ("resume", "allow_change", "preset",
                                                                               "overwrite"))

    def restore(self, jepa, target, opt, scaler, total):
        """0 for a new run; else the checkpoint's step, with weights, optimiser, scaler and RNG restored, an export
        older than its checkpoint repaired (a kill between the two), and what changed printed."""
        if not self.resume:
            return 0
        ck, env = self.ck, self.env
        step = self.last_good = ck["step"]
        was = ck.get("data")
        if was and was != self.data and "data_dir" not in {a.lstrip("-") for a in self.args.allow_change}:
            raise UserError(f"--resume: the sources now hold {self.data['images']} images in another list than the "
                            f"checkpoint's {was['images']} (files added, removed or renamed): the data order and the "
                            "schedule would change mid-run. Restore the files, or continue anyway with --allow_change "
                            "data_dir, or start over with --overwrite")
        if step > total:
            raise UserError(f"--resume: the checkpoint is at step {step}, past this run's end at step {total}: give "
                            "a larger --max_steps or --epochs")
        bad = nonfinite([*ck["encoder"].values(), *ck["predictor"].values(), *ck["target_encoder"].values()], env)
        if bad:
            raise UserError(f"{self.ckpt} holds {bad} non-finite values: start over with --overwrite, or rename an "
                            "older checkpoint_step<N>.pt to checkpoint.pt")
        jepa.encoder.load_state_dict(ck["encoder"])
        jepa.predictor.load_state_dict(ck["predictor"])
        target.load_state_dict(ck["target_encoder"])
        opt.load_state_dict(ck["optimizer"])
        if ck["scaler"]:  # a disabled scaler (no fp16) saves an empty state, which it cannot load
            scaler.load_state_dict(ck["scaler"])
        if ck["world"] != env.world:
            env.print(f"warning: checkpoint was written by {ck['world']} processes, this run has {env.world}: "
                      "training continues, but the data order differs from an uninterrupted run")
        torch.set_rng_state(ck["rng"]["torch"])
        env.print(f"resumed from {self.ckpt} at step {step}" + (f"; changed: {self.changes}" if self.changes else "")
                  + (f"; the schedules now end at step {total} (were {ck['total']})" if ck["total"] != total else ""))
        enc_path, hf = (os.path.join(self.args.out_dir, n) for n in ("encoder.safetensors", "hf"))
        if on_main(env, lambda: exported_step(enc_path) != step or not os.path.isdir(hf)):  # killed mid-export
            on_main(env, lambda: self._export(target, step, "the checkpoint is intact"))
            env.print(f"re-exported {enc_path} and {hf}/ at step {step} (they were older than their checkpoint)")
        self.ck = None
        return step

    def saved_note(self):
        return f"the checkpoint of step {self.last_good} ({self.ckpt})" if self.last_good is not None else \
            "the start (no checkpoint was saved yet)"

    def save(self, step, jepa, target, opt, scaler, total):
        """Checkpoint, then export, of this step; refused if any value is non-finite (all ranks agree)."""
        tensors = [*jepa.parameters(), *target.parameters(), *(v for s in opt.state.values() for v in s.values())]
        bad = nonfinite(tensors, self.env)
        if bad:
            raise UserError(f"the weights became non-finite ({bad} values) by step {step} although the loss was "
                            f"finite; nothing after {self.saved_note()} was written. Lower --lr, then --resume "
                            "--allow_change lr (or start over with --overwrite)")
        args = self.args
        state = {"encoder": jepa.encoder.state_dict(), "predictor": jepa.predictor.state_dict(),
                 "target_encoder": target.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "step": step, "total": total, "world": self.env.world, "rng": {"torch": torch.get_rng_state()},
                 "data": self.data,
                 "args": {k: v for k, v in vars(args).items()
                          if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}}

        def write():
            if args.keep_ckpts > 1 and self.last_good is not None and os.path.exists(self.ckpt):
                try:  # the current checkpoint.pt lives on as checkpoint_step<N>.pt
                    os.link(self.ckpt, os.path.join(args.out_dir, f"checkpoint_step{self.last_good}.pt"))
                except FileExistsError:
                    pass
            save_torch(state, self.ckpt, f"{self.saved_note()} is intact")
            old = [p for s, p in self.older() if s < step]
            for p in old[:max(0, len(old) - (args.keep_ckpts - 1))]:  # prune beyond the last K
                os.remove(p)
            self._export(target, step, f"the checkpoint of step {step} is written; --resume re-exports")
        on_main(self.env, write)
        self.last_good = step

    def _export(self, target, step, if_failed):
        """The run's exports of the target encoder, written right after the checkpoint of the same step (which is
        the commit point). hf/ first, encoder.safetensors (which records its step) last: a kill anywhere in between
        leaves encoder.safetensors older than the checkpoint, and --resume then re-exports both."""
        out = self.args.out_dir
        # the Hugging Face IJepaModel folder (encoders.export_hf): built beside, then swapped in
        hf, old = os.path.join(out, "hf"), os.path.join(out, f"hf.old{os.getpid()}")
        atomic_write(hf + ".new", lambda tmp: export_hf(target, tmp), if_failed)
        if os.path.isdir(hf):
            os.replace(hf, old)
        os.replace(hf + ".new", hf)
        shutil.rmtree(old, ignore_errors=True)
        save_encoder(target, os.path.join(out, "encoder.safetensors"), if_failed, step=step, model=self.args.model)


def exported_step(path):
    try:
        with safe_open(path, "pt") as f:
            return json.loads((f.metadata() or {}).get("step", "null"))
    except Exception:
        return None


def worker_init(_):
    """SLURM signals every process of a step: workers ignore the stop signals and leave the stopping to the main
    process (which ends them), instead of dying and taking the run down with a traceback. They close their copy of
    the out_dir lock, which only the main process holds."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    for fd in LOCK:
        os.close(fd)
    LOCK.clear()


def _catch(signum, frame):
    CAUGHT[0] = signum


class Stopper:
    """SIGTERM / SIGUSR1 become a flag read at the end of each step. With several processes the flag is all-reduced
    (max) every step over a gloo group, on the CPU, so every rank stops at the same step without a GPU sync."""

    def __init__(self, env):
        self.env, self.group = env, None
        CAUGHT[0] = 0
        for s in STOP_SIGNALS:
            signal.signal(s, _catch)
        if env.distributed:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def agreed(self):
        if not self.env.distributed:
            return CAUGHT[0]
        t = torch.tensor([CAUGHT[0]])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t)
