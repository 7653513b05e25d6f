"""The quick probe of pretrain.py --probe_every on the bundled real X-rays: a short run logs a finite AUROC at step 0
(the random encoder) and at the end, beside the loss; monitor.quick_probe agrees with scikit-learn run by hand on the
same features and folds, is deterministic, and refuses a one-class label column in one line. Not the size of the
gain: that is measured on larger data (docs/ablations.md)."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

import downstream
import data
import monitor
from base import UserError
from conftest import ROOT, SAMPLE
from model import build_vit

KERMANY = SAMPLE / "kermany" / "labels.csv"


def test_short_run_logs_finite_probe_auroc(tmp_path):
    out = tmp_path / "run"
    args = ["--data_dir", str(SAMPLE / "nih14"), "--preset", "demo", "--model", "vit_tiny", "--img_size", "56",
            "--patch_size", "7", "--batch_size", "8", "--pred_depth", "1", "--pred_dim", "96", "--max_steps", "4",
            "--probe_every", "2", "--num_workers", "0", "--log_every", "1", "--out_dir", str(out)]
    r = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *args], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    probed = {row["step"]: row["probe_auroc"] for row in rows if "probe_auroc" in row}
    assert sorted(probed) == [0, 2, 4]  # the random start, every 2 steps, the end
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in probed.values())
    assert all("loss" in row for row in rows if row["step"] > 0)  # logged beside the loss
    assert "probe_auroc" in r.stderr  # and shown in the progress bar


def test_quick_probe_matches_sklearn_by_hand_and_is_deterministic():
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", img_size=56, patch_size=7).eval()
    got = monitor.quick_probe(vit, str(KERMANY), folds=3)
    assert got == monitor.quick_probe(vit, str(KERMANY), folds=3)
    # the same thing written out independently: features from the encoder, folds by patient, in each the L2
    # strength chosen by 5-fold cross-validation by patient inside the training part (validation losses pooled;
    # the sweep stops after 3 strengths without a better one), then refitted on the whole training part:
    # scikit-learn's logistic regression, C = 1 / (lam * n)
    rows = list(csv.DictReader(open(KERMANY)))
    pre = data.Preprocess(56)
    x = torch.stack([pre(data.read_image(str(KERMANY.parent / r["path"]))) for r in rows])
    with torch.no_grad():
        f = vit.forward(x).mean(1).double().numpy()
    y = np.array([int(r["pneumonia"]) for r in rows])
    subjects = np.array([r["patient"] for r in rows])
    aucs = []
    for k, (train, test) in enumerate(data.kfold_by_subject(subjects, k=3, seed=0)):
        assert not set(subjects[train]) & set(subjects[test])
        mu, sd = f[train].mean(0), np.maximum(f[train].std(0, ddof=1), 1e-6)
        z = lambda idx: (f[idx] - mu) / sd  # noqa: E731
        fit = lambda idx, lam: LogisticRegression(C=1 / (lam * len(idx)), tol=1e-12, max_iter=100000).fit(z(idx), y[idx])  # noqa: E731
        inner = [(train[a], train[b]) for a, b in data.kfold_by_subject(subjects[train], k=5, seed=k)]
        best, since = (np.inf, None), 0
        for lam in downstream.L2_GRID:
            held = np.concatenate([va for _, va in inner])
            p = np.concatenate([fit(tr, lam).predict_proba(z(va))[:, 1] for tr, va in inner])
            loss = log_loss(y[held], p, labels=[0, 1])
            best, since = ((loss, lam), 0) if loss < best[0] else (best, since + 1)
            if since >= downstream.PATIENCE:
                break
        aucs.append(roc_auc_score(y[test], fit(train, best[1]).predict_proba(z(test))[:, 1]))
    assert got == pytest.approx(float(np.mean(aucs)), abs=1e-6)


def test_one_class_label_column_is_refused(tmp_path):
    rows = [r for r in csv.DictReader(open(KERMANY)) if r["pneumonia"] == "1"][:6]
    path = tmp_path / "one_class.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "path": str(KERMANY.parent / r["path"])})
    with pytest.raises(UserError, match="one class"):
        monitor.quick_probe(build_vit("vit_tiny", img_size=56, patch_size=7), str(path))
