"""pretrain.py end to end on the bundled real X-rays: parameter counts, the loss falls, kill + --resume is exact,
2-process torchrun (gloo) keeps ranks in sync on different data, bad input fails cleanly, NaN stops cleanly."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import torch
from safetensors import safe_open

from conftest import ROOT, SAMPLE
from model import VIT_CONFIGS, Predictor, build_vit, count_params

# a small, fast configuration: 84 px -> 6x6 patch grid
FAST = ["--model", "vit_tiny", "--img_size", "84", "--batch_size", "8", "--pred_depth", "2", "--pred_dim", "96",
        "--num_workers", "0", "--min_keep", "3", "--log_every", "1", "--monitor_every", "0"]
NIH = str(SAMPLE / "nih14")


def run(args, check=True, env=None, **kw):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *args], capture_output=True, text=True,
                       env=e, timeout=600, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"pretrain.py failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def one_error_line(r):
    """exit 2 and exactly one `error: ...` line (tqdm's progress bar shares stderr)"""
    lines = [l for l in r.stderr.replace("\r", "\n").split("\n") if "error" in l.lower()]
    return r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")


def free_port():
    with socket.socket() as s:  # other test sessions on this machine may hold any fixed port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, **kw):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *args], env=e, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for_steps(out, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.jsonl").exists() and len(losses(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {n}: {proc.poll()}")


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, [l for l in f if l.endswith("\n")])
                if "loss" in row}


def expected_vit_params(dim, depth, patch, chans, n_patches):
    block = (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim) + 4 * dim
    return chans * patch * patch * dim + dim + n_patches * dim + depth * block + 2 * dim


def test_parameter_counts_match_formula_and_paper():
    for name, (dim, depth, heads) in VIT_CONFIGS.items():
        if name in ("vit_large", "vit_huge"):
            continue  # same formula, only slower to build
        vit = build_vit(name, img_size=224, patch_size=14)
        assert count_params(vit) == expected_vit_params(dim, depth, 14, 3, 256), name
    # the paper's Table 2: ViT-B/14 at 224 px has 86M parameters
    assert round(count_params(build_vit("vit_base", img_size=224, patch_size=14)) / 1e6) == 86
    # the I-JEPA predictor: 12 blocks of width 384, in/out projections to 768 (+ mask token, fixed positions)
    pred = Predictor((16, 16), 768, 384, 12, 12)
    d = 384
    block = 12 * d * d + 13 * d
    assert count_params(pred) == (768 * d + d) + d + 256 * d + 12 * block + 2 * d + (d * 768 + 768)


def test_crop_scale_comes_from_the_preset_unless_given():
    """The demo trains on whole images (docs/ablations.md, round 2), the paper preset on I-JEPA's 0.3-1 crops; a
    --crop_scale on the command line wins over either."""
    import pretrain
    assert pretrain.get_args([]).crop_scale == (1.0, 1.0)
    assert pretrain.get_args(["--data_dir", str(SAMPLE / "nih14")]).crop_scale == (0.3, 1.0)
    assert pretrain.get_args(["--crop_scale", "0.5", "1"]).crop_scale == [0.5, 1.0]


def test_demo_run_loss_falls_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    r = run(["--out_dir", str(out), *FAST, "--max_steps", "40", "--lr", "2e-3", "--warmup", "0.5"])
    assert "done: 40 steps" in r.stdout
    ls = losses(out)
    assert sorted(ls) == list(range(1, 41))
    first, last = sum(ls[s] for s in range(1, 6)) / 5, sum(ls[s] for s in range(36, 41)) / 5
    assert last < 0.8 * first, (first, last)
    rows = [json.loads(l) for l in open(out / "log.jsonl")]
    for key in ("lr", "wd", "momentum", "img_per_s", "target_std", "mem_mb"):
        assert key in rows[-1]
    assert rows[-1]["momentum"] > rows[0]["momentum"] and rows[-1]["wd"] > rows[0]["wd"]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 40
    with safe_open(str(out / "encoder.safetensors"), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
        assert torch.equal(f.get_tensor("norm.weight"), ck["target_encoder"]["norm.weight"])
    assert cfg["embed_dim"] == 192 and cfg["img_size"] == 84
    assert (out / "masks.png").stat().st_size > 1000


def test_killed_and_sigtermed_runs_resume_exactly(tmp_path):
    common = ["--data_dir", NIH, *FAST, "--max_steps", "14", "--ckpt_every", "4"]
    ref = tmp_path / "ref"
    run(["--out_dir", str(ref), *common])
    a = losses(ref)
    # SIGKILL: the run resumes from its last checkpoint
    out = tmp_path / "killed"
    p = start(["--out_dir", str(out), *common])
    wait_for_steps(out, 5, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert 5 <= len(losses(out)) < 14, "the run was not killed mid-way"
    run(["--out_dir", str(out), *common, "--resume"])
    # SIGTERM to the whole process group (as SLURM sends it, DataLoader workers included): the step finishes, a
    # checkpoint of exactly that step is written, one line says how to resume
    term = tmp_path / "term"
    p = start(["--out_dir", str(term), *common, "--num_workers", "1"], start_new_session=True)
    wait_for_steps(term, 2, p)
    os.killpg(p.pid, signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, stderr
    stopped = int(stdout.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert stopped < 14 and "--resume" in stdout and "Traceback" not in stderr
    assert torch.load(term / "checkpoint.pt", weights_only=True)["step"] == stopped == max(losses(term))
    with safe_open(str(term / "encoder.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["step"]) == stopped
    run(["--out_dir", str(term), *common, "--resume", "auto", "--num_workers", "1"])
    for b in (losses(out), losses(term)):
        assert sorted(b) == list(range(1, 15))
        for s in range(1, 15):
            assert abs(a[s] - b[s]) <= 1e-6 * max(1.0, abs(a[s])), (s, a[s], b[s])


def test_torchrun_and_srun_two_processes_gloo(tmp_path):
    args = ["--data_dir", NIH, *FAST, "--max_steps", "5", "--device", "cpu"]
    out = tmp_path / "ddp"
    e = dict(os.environ, OMP_NUM_THREADS="1", RADJEPA_DUMP_RANK_STATE="1")  # each rank writes rank<N>.json
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "pretrain.py"), "--out_dir", str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    s0, s1 = (json.load(open(out / f"rank{i}.json")) for i in range(2))
    assert s0["world"] == s1["world"] == 2
    # identical weights after several synchronised steps
    assert s0["encoder_checksum"] == s1["encoder_checksum"] and s0["target_checksum"] == s1["target_checksum"]
    assert s0["predictor_checksum"] == s1["predictor_checksum"]
    # but each rank saw different images and different masks
    assert not set(s0["seen"]) & set(s1["seen"])
    assert s0["mask_checksums"] != s1["mask_checksums"]
    assert len(losses(out)) == 5
    # `srun python pretrain.py` without torchrun: ranks from SLURM's variables give the same run
    slurm = tmp_path / "slurm"
    port = str(free_port())
    procs = []
    for rank in range(2):
        e = dict(os.environ, OMP_NUM_THREADS="1", RADJEPA_DUMP_RANK_STATE="1", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                 SLURM_LOCALID=str(rank),
                 SLURM_JOB_NUM_NODES="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            e.pop(k, None)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), "--out_dir", str(slurm), *args],
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    for i in range(2):
        assert json.load(open(slurm / f"rank{i}.json")) == json.load(open(out / f"rank{i}.json"))
    assert losses(slurm) == losses(out)


# what a DDP run does on its way out: a process group, DDP, the stop-signal agreement and a last collective, then
# base.run's exit (or its one-line error); each process writes its thread count before and after
TEARDOWN = """
import os, sys, types, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
import base, runsafe
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
def main():
    env = base.setup(types.SimpleNamespace(device="cpu", dtype=None, seed=0))
    stopper = runsafe.Stopper(env)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
    ddp(torch.ones(2, 3)).sum().backward()
    stopper.agreed()
    dist.all_gather_object([None] * env.world, env.rank)
    if sys.argv[1] == "error":
        raise base.UserError("a mistake")
try:
    base.run(main)
finally:
    with open(f"{sys.argv[1]}{os.environ['RANK']}.txt", "w") as f:
        f.write(f"{before} {threads()}")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_finished_ddp_run_ends_gloo_threads_before_exit(tmp_path):
    # gloo's threads left running into the interpreter's exit abort a finished run now and then (SIGABRT,
    # "terminate called without an active exception"): they must be gone once base.run has destroyed the group
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    for how, code in (("ok", 0), ("error", 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), how, str(ROOT)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                           cwd=tmp_path, timeout=300)
        for rank in range(2):
            before, after = (tmp_path / f"{how}{rank}.txt").read_text().split()
            assert before == after, (how, rank, before, after, r.stderr)
        assert (r.returncode == 0) == (code == 0) and r.stderr.count("error: a mistake") == 2 * (code == 2), r.stderr


def test_bad_input_fails_cleanly_before_work(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for d in (empty, tmp_path / "missing"):
        r = run(["--data_dir", str(d), "--out_dir", str(tmp_path / "o"), *FAST, "--max_steps", "2"], check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error:") and str(d) in r.stderr
    r = run(["--out_dir", str(tmp_path / "o2"), *FAST, "--resume"], check=False)
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_bad_numeric_flags_are_one_line_errors(tmp_path):
    import pretrain
    from base import UserError
    bad = [["--batch_size", "-2"], ["--batch_size", "0"], ["--ckpt_every", "0"], ["--log_every", "0"],
           ["--num_workers", "-1"], ["--lr", "-1"], ["--lr", "nan"], ["--epochs", "0"], ["--max_steps", "0"],
           ["--keep_ckpts", "0"], ["--warmup", "-1"], ["--crop_scale", "0", "1"], ["--ema", "0.9", "1.5"],
           ["--overwrite", "--resume"]]
    for flags in bad:
        with pytest.raises(UserError) as e:
            pretrain.get_args(["--out_dir", str(tmp_path), *flags])
        assert flags[0] in str(e.value) and "\n" not in str(e.value), (flags, e.value)
    r = run(["--out_dir", str(tmp_path / "o"), "--batch_size", "-2"], check=False)
    assert r.returncode == 2 and r.stderr.strip() == "error: --batch_size -2: must be a whole number >= 1"
    assert not (tmp_path / "o").exists()


def test_corrupt_and_tiny_files_are_skipped_and_counted_across_workers(tmp_path):
    from PIL import Image
    d = tmp_path / "mixed"
    shutil.copytree(NIH, d / "nih")
    (d / "broken.png").write_bytes(open(next((d / "nih" / "images").iterdir()), "rb").read()[:300])
    (d / "notes.png").write_text("not an image")
    (d / "empty.jpg").write_bytes(b"")
    for i, size in enumerate([(1, 1), (27, 400)]):  # short side under 2 patches (28 px)
        Image.new("L", size, 128).save(d / f"tiny{i}.png")
    r = run(["--data_dir", str(d), "--out_dir", str(tmp_path / "o"), *FAST, "--max_steps", "12", "--batch_size", "16",
             "--num_workers", "2"])
    text = r.stdout + r.stderr
    for name in ("broken.png", "notes.png", "empty.jpg", "tiny0.png", "tiny1.png"):
        assert name in text
    assert "skipped 5 file(s)" in r.stderr and len(losses(tmp_path / "o")) == 12


def test_nan_run_leaves_only_finite_checkpoints(tmp_path):
    def finite_everywhere(out):
        for p in glob.glob(str(out / "checkpoint*.pt")):
            ck = torch.load(p, weights_only=True)
            for part in ("encoder", "predictor", "target_encoder"):
                assert all(torch.isfinite(v).all() for v in ck[part].values()), (p, part)
            for st in ck["optimizer"]["state"].values():
                assert all(torch.isfinite(v).all() for v in st.values() if v.is_floating_point()), p
        with safe_open(str(out / "encoder.safetensors"), "pt") as f:
            assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
            return json.loads(f.metadata()["step"])

    # a diverging lr: the weights go non-finite although the loss of the step before was finite
    out = tmp_path / "nan"
    fast = ["--data_dir", NIH, "--out_dir", str(out), *FAST, "--ckpt_every", "1", "--keep_ckpts", "3", "--warmup", "0"]
    r = run([*fast, "--max_steps", "8", "--lr", "1e4", "--start_lr", "1e4"], check=False)
    assert one_error_line(r) and "non-finite" in r.stderr, r.stderr
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert f"checkpoint of step {step} " in r.stderr and step < 8
    assert finite_everywhere(out) == step
    # a healthy run that diverges after an lr change on purpose stops with its last good step; the way out the
    # message names (--resume --allow_change lr with a lower lr) continues from it
    r = run([*fast, "--max_steps", "3", "--overwrite"])
    r = run([*fast, "--max_steps", "8", "--resume", "--allow_change", "lr", "start_lr", "--lr", "1e30",
             "--start_lr", "1e30", "--ckpt_every", "100"], check=False)
    assert one_error_line(r) and "non-finite" in r.stderr and "checkpoint of step 3 " in r.stderr, r.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3 and finite_everywhere(out) == 3
    r = run([*fast, "--max_steps", "8", "--resume", "--allow_change", "lr", "start_lr", "--lr", "1e-3",
             "--start_lr", "2e-4"], check=False)
    assert r.returncode == 0, r.stderr
    assert f"{out / 'checkpoint.pt'} at step 3" in r.stdout and finite_everywhere(out) == 8


def test_out_dir_is_locked_and_never_overwritten(tmp_path):
    out = tmp_path / "o"
    args = ["--data_dir", NIH, "--out_dir", str(out), *FAST]
    p = start([*args, "--max_steps", "400"])
    wait_for_steps(out, 1, p)
    r = run([*args, "--max_steps", "3", "--resume", "auto"], check=False)
    assert r.returncode == 2 and "in use by another pretrain.py run" in r.stderr
    p.send_signal(signal.SIGKILL)  # a killed run's lock must not block the next one
    p.wait()
    run([*args, "--max_steps", "2", "--overwrite"])
    r = run([*args, "--max_steps", "4"], check=False)  # no --resume: refused, the run in out/ is untouched
    assert r.returncode == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr and "step 2" in r.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2 and len(losses(out)) == 2
    # --resume: changed flags that change the run are refused, each named
    r = run([*args, "--max_steps", "4", "--resume", "--lr", "0.5", "--loss", "l2"], check=False)
    assert r.returncode == 2 and "--lr" in r.stderr and "--loss" in r.stderr
    # a partial last log line (killed mid-write) and an export older than its checkpoint are repaired
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    from encoders import save_encoder
    jepa_target = build_vit("vit_tiny", img_size=84, patch_size=14)
    save_encoder(jepa_target, str(out / "encoder.safetensors"), step=1, model="vit_tiny")
    (out / "checkpoint.pt.tmp4242").write_bytes(b"x" * 1000)  # left by a killed run
    (out / ".encoder.safetensors.tmp77").write_bytes(b"x")
    # killed between hf/'s two renames: hf/ moved aside, the new one not yet in place
    (out / "hf").rename(out / "hf.old4242")
    (out / "hf.new").mkdir()
    r = run([*args, "--max_steps", "2", "--resume"])  # finished: nothing to train, but the exports are repaired
    assert "re-exported" in r.stdout
    assert "removed 4 temp file(s)" in r.stdout
    assert not glob.glob(str(out / "*.tmp*")) and not glob.glob(str(out / ".*.tmp*"))
    assert sorted(p.name for p in out.glob("hf*")) == ["hf"] and (out / "hf" / "model.safetensors").exists()
    with safe_open(str(out / "encoder.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["step"]) == 2
    # extending the run and changing the worker count are allowed, and printed
    r = run([*args, "--max_steps", "4", "--resume", "--num_workers", "1", "--ckpt_every", "1", "--keep_ckpts", "2"])
    assert "--max_steps 2 -> 4" in r.stdout and "--num_workers 0 -> 1" in r.stdout
    assert sorted(losses(out)) == [1, 2, 3, 4]
    # --keep_ckpts 2: the latest and the one before it
    assert sorted(os.listdir(out)) == [".lock", "args.json", "checkpoint.pt", "checkpoint_step3.pt", "curves.png",
                                       "encoder.safetensors", "hf", "log.jsonl", "masks.png"]
    assert torch.load(out / "checkpoint_step3.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("how", ["simulated", "tmpfs"])
def test_full_disk_keeps_previous_checkpoint(tmp_path, how):
    out = tmp_path / "o"
    args = ["--data_dir", NIH, "--out_dir", str(out), *FAST, "--max_steps", "6", "--ckpt_every", "2"]
    if how == "tmpfs":  # a real full disk: room for one checkpoint + export, not for the next temp file
        out.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(out)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        try:
            r = run(args, check=False)
            files = os.listdir(out)
            ck = torch.load(out / "checkpoint.pt", weights_only=True)
        finally:
            subprocess.run(["umount", str(out)])
    else:  # every write after the first checkpoint fails half-way with ENOSPC
        code = ("import errno, sys, torch; import base, pretrain; real = torch.save; n = [0]\n"
                "def save(obj, f, *a, **k):\n"
                "    n[0] += 1\n"
                "    if n[0] == 1: return real(obj, f, *a, **k)\n"
                "    f.write(b'x' * 4096); raise OSError(errno.ENOSPC, 'No space left on device')\n"
                "torch.save = save; sys.argv[0] = 'pretrain.py'; base.run(pretrain.main)")
        e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # the test runs in its own folder
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=e,
                           timeout=600)
        files = os.listdir(out)
        ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert r.returncode == 2 and one_error_line(r) and "Traceback" not in r.stderr, r.stderr
    assert ("No space left on device" if how == "simulated" else "MiB free") in r.stderr
    assert "checkpoint of step 2" in r.stderr
    assert ck["step"] == 2 and not [f for f in files if ".tmp" in f], files


def test_fp16_scales_the_loss(tmp_path):
    out = tmp_path / "fp16"
    run(["--data_dir", NIH, "--out_dir", str(out), *FAST, "--max_steps", "2", "--dtype", "fp16", "--device", "cpu"])
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["scaler"]["scale"] == 2.0 ** 16
    rows = [json.loads(l) for l in open(out / "log.jsonl")]
    assert rows[-1]["loss_scale"] == 2.0 ** 16


def test_resume_names_what_the_run_was_built_from_and_the_lock_holds(tmp_path):
    """Issue 26's lost-work cases: images added to --data_dir, --cache_dir added on resume, the .lock file deleted
    mid-run, an immediate restart after kill -9 with DataLoader workers, SIGHUP (a closed terminal)."""
    data = tmp_path / "imgs"
    shutil.copytree(SAMPLE / "nih14" / "images", data)
    out = tmp_path / "o"
    args = ["--data_dir", str(data), "--out_dir", str(out), *FAST]
    run([*args, "--max_steps", "2"])
    shutil.copy(next(data.glob("*.jpg")), data / "added.jpg")  # the schedule would silently change
    r = run([*args, "--max_steps", "3", "--resume"], check=False)
    assert one_error_line(r) and "81 images in another list than the checkpoint's 80" in r.stderr
    assert "--allow_change data_dir" in r.stderr
    r = run([*args, "--max_steps", "3", "--resume", "--cache_dir", str(tmp_path / "cache")], check=False)
    assert one_error_line(r) and "--cache_dir" in r.stderr
    run([*args, "--max_steps", "3", "--resume", "--allow_change", "data_dir"])
    assert sorted(losses(out)) == [1, 2, 3]
    # the lock: deleting the .lock file does not let a second run in (the lock is on the folder itself)
    long = [*args, "--max_steps", "400", "--resume", "--allow_change", "data_dir", "--num_workers", "2"]
    p = start(long, start_new_session=True)
    wait_for_steps(out, 5, p)
    os.remove(out / ".lock")
    r = run([*args, "--max_steps", "400", "--resume", "auto"], check=False)
    assert one_error_line(r) and "in use by another pretrain.py run" in r.stderr
    p.send_signal(signal.SIGKILL)  # kill -9 of the main process: its DataLoader workers outlive it for a while
    p.wait()
    # restarted at once (a scheduler's requeue): the workers never held the lock; then SIGHUP checkpoints, exits 129
    p = start(long, start_new_session=True)
    last = max(losses(out))
    wait_for_steps(out, last + 2, p)
    os.killpg(p.pid, signal.SIGHUP)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGHUP and "Traceback" not in stderr, stderr
    stopped = int(stdout.split("stopped by SIGHUP at step ")[1].split(":")[0])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == stopped == max(losses(out))
