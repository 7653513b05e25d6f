"""monitor.py: RankMe and LiDAR against float64 references written here from the papers' definitions (numpy's SVD;
scipy's generalized symmetric eigenproblem for LDA), on embeddings of real X-rays; and a short pretraining run that
logs them, writes args.json (the resolved settings) and curves.png."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

import data
import masks
import monitor
import pretrain
from conftest import SAMPLE
from base import UserError
from model import Predictor, VisionTransformer, build_vit


def rankme_reference(Z, eps=1e-7):
    s = np.linalg.svd(np.asarray(Z, np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def lidar_reference(E, delta=1e-4, eps=1e-8):
    """LDA of the surrogate task (each image a class, its views the samples): the generalized eigenvalues of
    (Sigma_b, Sigma_w + delta I) are those of Sigma_w^-1/2 Sigma_b Sigma_w^-1/2."""
    E = np.asarray(E, np.float64)
    n, q, d = E.shape
    mu = E.mean(1)
    sb = np.cov(mu.T, ddof=1)
    r = (E - mu[:, None]).reshape(n * q, d)
    sw = r.T @ r / (n * (q - 1)) + delta * np.eye(d)
    lam = np.clip(scipy.linalg.eigh(sb, sw, eigvals_only=True), 0, None)
    p = lam / lam.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def xray_embeddings(n=48, q=5):
    """Mean-pooled patch tokens of a random ViT on n real X-rays, whole and under q random context masks."""
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", img_size=56, patch_size=14).eval()
    paths = sorted((SAMPLE / "nih14" / "images").glob("*"))[:n]
    x = torch.stack([data.Preprocess(56)(data.read_image(p)) for p in paths])
    mc = masks.MaskCollator(grid=(4, 4), min_keep=0, enc_scale=(0.5, 0.8), pred_scale=(0.1, 0.15))
    with torch.no_grad():
        whole = vit(x).mean(1)
        views = torch.stack([vit(x, masks=[mc.sample(n, step=k)[0][0]]).mean(1) for k in range(q)], 1)
    return whole, views


def test_rankme_and_lidar_match_float64_references():
    whole, views = xray_embeddings()
    assert monitor.rankme(whole) == pytest.approx(rankme_reference(whole.numpy()), rel=1e-8)
    assert monitor.lidar(views) == pytest.approx(lidar_reference(views.numpy()), rel=1e-6)
    # what they measure, on constructed embeddings: the rank of a rank-k matrix, the k separating directions
    rng = np.random.default_rng(0)
    low = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 64))
    assert 7 < monitor.rankme(low) < 8.5 and monitor.rankme(3.0 * low) == pytest.approx(monitor.rankme(low))
    signal = np.zeros((300, 1, 32))
    signal[:, :, :6] = rng.standard_normal((300, 1, 6))
    E = signal + 0.01 * rng.standard_normal((300, 6, 32))
    assert monitor.lidar(E) == pytest.approx(lidar_reference(E), rel=1e-6) and 5 < monitor.lidar(E) < 7


def test_demo_run_logs_signals_args_json_and_curves(tmp_path):
    out = tmp_path / "run"
    argv = ["--data_dir", str(SAMPLE / "nih14"), "--preset", "demo", "--model", "vit_tiny", "--img_size", "56",
            "--batch_size", "8", "--pred_depth", "1", "--pred_dim", "96", "--min_keep", "1", "--max_steps", "4",
            "--monitor_every", "2", "--num_workers", "0", "--out_dir", str(out)]
    pretrain.main(argv)
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    watched = {r["step"]: (r["rankme"], r["lidar"]) for r in rows if "rankme" in r}
    assert sorted(watched) == [0, 2, 4] and all(1 <= v <= 192 for pair in watched.values() for v in pair)
    settings = json.load(open(out / "args.json"))
    # the resolved settings, preset values included, and they are the ones the command line resolves to
    again = json.loads(json.dumps(vars(pretrain.get_args(argv))))
    assert settings == {**again, "dtype": settings["dtype"], "attn": settings["attn"]}
    assert settings["lr"] == pretrain.PRESETS["demo"]["lr"] and settings["monitor_every"] == 2
    assert (out / "curves.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------------
# --init_from: a new run from published weights

def meta_checkpoint(path, img_size=56, dim=192, seed=0):
    """A tiny I-JEPA training checkpoint as Meta's train.py saves it (DDP 'module.' prefixes, optimiser state)."""
    torch.manual_seed(seed)
    enc, tgt = (VisionTransformer(img_size=img_size, patch_size=14, embed_dim=dim, depth=12, num_heads=dim // 64)
                for _ in range(2))
    pred = Predictor(enc.grid, dim, 96, 1, dim // 64)
    mod = lambda m: {"module." + k: v for k, v in m.state_dict().items()}  # noqa: E731
    torch.save({"encoder": mod(enc), "predictor": mod(pred), "target_encoder": mod(tgt), "opt": {}, "epoch": 3}, path)
    return enc, pred, tgt


INIT = ["--data_dir", str(SAMPLE / "nih14"), "--preset", "demo", "--model", "vit_tiny", "--img_size", "56",
        "--batch_size", "8", "--pred_depth", "1", "--pred_dim", "96", "--min_keep", "1", "--num_workers", "0",
        "--monitor_every", "0"]


def test_init_from_meta_checkpoint_reproduces_its_features_and_trains(tmp_path):
    enc, pred, tgt = meta_checkpoint(tmp_path / "IN1K-vit.tiny.pth.tar")
    args = pretrain.get_args(INIT + ["--init_from", str(tmp_path / "IN1K-vit.tiny.pth.tar"), "--out_dir", str(tmp_path)])
    args.attn = "sdpa"
    jepa, target = pretrain.build(args, torch.device("cpu"))
    line = pretrain.init_from(args.init_from, jepa, target)
    assert "context encoder from its encoder" in line and "predictor from its predictor" in line
    x = torch.stack([data.Preprocess(56)(data.read_image(p)) for p in sorted((SAMPLE / "nih14" / "images").glob("*"))[:2]])
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), tgt.eval()(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(jepa.encoder.eval()(x), enc.eval()(x), atol=1e-5, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(jepa.predictor.state_dict().values(), pred.state_dict().values()))
    out = tmp_path / "run"
    pretrain.main(INIT + ["--init_from", str(tmp_path / "IN1K-vit.tiny.pth.tar"), "--max_steps", "2", "--out_dir", str(out)])
    assert sorted(r["step"] for r in map(json.loads, open(out / "log.jsonl"))) == [1, 2]


def test_init_from_resizes_positions_and_refuses_another_width(tmp_path):
    meta_checkpoint(tmp_path / "big.pth.tar", img_size=112)  # an 8x8 grid into a 4x4 run (448 -> 224 px alike)
    args = pretrain.get_args(INIT + ["--out_dir", str(tmp_path)])
    args.attn = "sdpa"
    jepa, target = pretrain.build(args, torch.device("cpu"))
    assert "resized 8x8 -> 4x4" in pretrain.init_from(str(tmp_path / "big.pth.tar"), jepa, target)
    src = torch.load(tmp_path / "big.pth.tar", weights_only=True)["target_encoder"]["module.pos_embed"]
    ref = torch.nn.functional.interpolate(src.reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                                          align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)
    torch.testing.assert_close(target.pos_embed, ref, atol=1e-6, rtol=0)
    meta_checkpoint(tmp_path / "small.pth.tar", dim=384)  # a ViT-S checkpoint into a vit_tiny run
    with pytest.raises(UserError, match=r"^--init_from .*embed_dim 384 \(the run's 192\)") as e:
        pretrain.init_from(str(tmp_path / "small.pth.tar"), jepa, target)
    assert "\n" not in str(e.value)
