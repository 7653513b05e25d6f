"""pretrain.py end to end on the bundled real X-rays: parameter counts, the loss falls, kill + --resume is exact,
2-process torchrun (gloo) keeps ranks in sync on different data, bad input fails cleanly, NaN stops cleanly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
from safetensors import safe_open

from conftest import ROOT, SAMPLE
from model import VIT_CONFIGS, Predictor, build_vit, count_params

# a small, fast configuration: 84 px -> 6x6 patch grid
FAST = ["--model", "vit_tiny", "--img_size", "84", "--batch_size", "8", "--pred_depth", "2", "--pred_dim", "96",
        "--num_workers", "0", "--min_keep", "3", "--log_every", "1"]
NIH = str(SAMPLE / "nih14")


def run(args, check=True, env=None, **kw):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *args], capture_output=True, text=True,
                       cwd=ROOT, env=e, timeout=600, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"pretrain.py failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


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


def test_killed_run_resumes_exactly(tmp_path):
    common = ["--data_dir", NIH, *FAST, "--max_steps", "24", "--ckpt_every", "3"]
    ref = tmp_path / "ref"
    run(["--out_dir", str(ref), *common])
    out = tmp_path / "killed"
    e = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), "--out_dir", str(out), *common], cwd=ROOT,
                         env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill as soon as a first checkpoint exists, mid-run
        if (out / "checkpoint.pt").exists() and len(losses(out)) >= 4:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = len(losses(out))
    assert 4 <= killed_at < 24, "the run was not killed mid-way"
    run(["--out_dir", str(out), *common, "--resume"])
    a, b = losses(ref), losses(out)
    assert sorted(b) == list(range(1, 25))
    for s in range(1, 25):
        assert abs(a[s] - b[s]) <= 1e-6 * max(1.0, abs(a[s])), (s, a[s], b[s])


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    e = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "pretrain.py"), "--data_dir", NIH, "--out_dir", str(out), *FAST, "--max_steps", "5",
           "--device", "cpu", "--dump_rank_state"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=e, timeout=600)
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


def test_bad_input_fails_cleanly_before_work(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for d in (empty, tmp_path / "missing"):
        r = run(["--data_dir", str(d), "--out_dir", str(tmp_path / "o"), *FAST, "--max_steps", "2"], check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error:") and str(d) in r.stderr
    r = run(["--out_dir", str(tmp_path / "o2"), *FAST, "--resume"], check=False)
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_corrupt_files_are_skipped_and_named(tmp_path):
    d = tmp_path / "mixed"
    shutil.copytree(NIH, d / "nih")
    (d / "broken.png").write_bytes(open(next((d / "nih" / "images").iterdir()), "rb").read()[:300])
    (d / "notes.png").write_text("not an image")
    (d / "empty.jpg").write_bytes(b"")
    r = run(["--data_dir", str(d), "--out_dir", str(tmp_path / "o"), *FAST, "--max_steps", "3"])
    text = r.stdout + r.stderr
    for name in ("broken.png", "notes.png", "empty.jpg"):
        assert name in text
    assert "3" in text and len(losses(tmp_path / "o")) == 3


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    common = ["--data_dir", NIH, "--out_dir", str(out), *FAST, "--ckpt_every", "2"]
    run([*common, "--max_steps", "2"])
    r = run([*common, "--max_steps", "8", "--resume", "--lr", "1e30", "--start_lr", "1e30", "--warmup", "0"],
            check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "last good checkpoint" in r.stderr
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["encoder"].values())
