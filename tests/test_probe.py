"""probe.py on real X-rays (bundled sample): metrics vs scikit-learn and brute force, subject-disjoint splits,
the whole path for a random and a briefly trained encoder, the VinDr / RSNA layouts, the paired bootstrap."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from sklearn.metrics import average_precision_score, roc_auc_score

import base
import downstream
import data
import archives
import probe
from base import UserError
from encoders import load_encoder, save_encoder
from model import build_vit

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
KERMANY = SAMPLE / "kermany" / "labels.csv"
NIH = SAMPLE / "nih14" / "labels.csv"
# vit_tiny at 56 px (4 x 4 patches) keeps every end-to-end run to a second or two on a shared CPU
TINY = ["--model", "vit_tiny", "--img_size", "56", "--num_workers", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a CPU shared by many processes, two spinning threads are several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def small_kermany(tmp_path, n=14):
    """3n real Kermany X-rays, n each of normal, bacterial and viral pneumonia, absolute paths, bundled format."""
    rows = read_rows(KERMANY)
    pick = sum(([r for r in rows if r["label"] == lab][:n] for lab in ("normal", "bacterial", "viral")), [])
    out = tmp_path / "kermany.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in pick:
            w.writerow({**r, "path": str(SAMPLE / "kermany" / r["path"])})
    return out


# ----------------------------------------------------------------------------------------------------------------
# metrics

def brute_force(y, p):
    """Independent float64 references: AUROC = P(score_pos > score_neg) + P(tie) / 2 over all pairs; AP = sum over
    distinct thresholds t (descending) of (recall(t) - previous recall) * precision(t)."""
    pos, neg = p[y == 1], p[y == 0]
    auroc = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    ap, prev = 0.0, 0.0
    for t in sorted(set(p), reverse=True):
        sel = p >= t
        tp = (y[sel] == 1).sum()
        recall = tp / (y == 1).sum()
        ap += (recall - prev) * tp / sel.sum()
        prev = recall
    return ap, auroc


def test_metrics_agree_with_sklearn_and_brute_force():
    rng = np.random.default_rng(0)
    n = 150
    Y = np.zeros((n, 4))
    Y[:, 0] = rng.random(n) < 0.3
    Y[17, 1] = 1  # a class with a single positive
    Y[:, 2] = rng.random(n) < 0.5  # scored with heavy ties below
    # class 3: no positives at all -> undefined, NaN
    P = rng.random((n, 4)) + 0.4 * Y
    P[:, 2] = np.round(P[:, 2], 1)
    m = probe.metrics(Y, P)
    ap_fast, auc_fast = probe.fast_metrics(Y, P)
    for c in range(3):
        ap_ref, auc_ref = brute_force(Y[:, c], P[:, c])
        assert m["auprc"][c] == pytest.approx(average_precision_score(Y[:, c], P[:, c]), abs=1e-12)
        assert m["auroc"][c] == pytest.approx(roc_auc_score(Y[:, c], P[:, c]), abs=1e-12)
        assert m["auprc"][c] == pytest.approx(ap_ref, abs=1e-12)
        assert m["auroc"][c] == pytest.approx(auc_ref, abs=1e-12)
        assert ap_fast[c] == pytest.approx(ap_ref, abs=1e-12) and auc_fast[c] == pytest.approx(auc_ref, abs=1e-12)
    assert np.isnan(m["auprc"][3]) and np.isnan(m["auroc"][3]) and np.isnan(ap_fast[3]) and np.isnan(auc_fast[3])
    assert m["agg_auprc"] == pytest.approx(np.mean(m["auprc"][:3]))  # Agg. = mean over the defined classes
    assert m["agg_auroc"] == pytest.approx(np.mean(m["auroc"][:3]))


# ----------------------------------------------------------------------------------------------------------------
# the linear head: solved to its optimum, checked against scikit-learn's float64 solver on the same objective

def kermany_features():
    """Global embeddings of the 120 bundled Kermany X-rays by a random vit_tiny at 56 px, and the CSV rows."""
    rows = read_rows(KERMANY)
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", img_size=56).eval()
    pre = data.Preprocess(56)
    with torch.no_grad():
        f = vit.global_embedding(torch.stack([pre(data.read_image(SAMPLE / "kermany" / r["path"])) for r in rows]))
    return rows, f


def reference_fit(Z, y, lam, multiclass=False):
    """scikit-learn's logistic regression on the same objective (mean loss + lam / 2 ||w||^2, bias free, i.e.
    C = 1 / (lam * n)), solved to 1e-12: its objective value and test-time probabilities function."""
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(C=1 / (lam * len(y)), tol=1e-12, max_iter=100000).fit(Z, y)
    p = clf.predict_proba(Z)
    loss = -np.mean(np.log(p[np.arange(len(y)), np.searchsorted(clf.classes_, y)]))
    return loss + 0.5 * lam * (clf.coef_ ** 2).sum(), lambda Zt: clf.predict_proba(Zt) if multiclass else \
        clf.predict_proba(Zt)[:, 1]


@pytest.mark.parametrize("task", ["binary", "multilabel", "multiclass"])
def test_converged_head_reaches_the_optimum(task):
    rows, f = kermany_features()
    lab = np.array([r["label"] for r in rows])
    if task == "binary":
        Y = np.array([[float(r["pneumonia"])] for r in rows])
    elif task == "multilabel":  # three findings, a fifth of the entries not labelled (NaN: left out per label)
        Y = np.stack([lab != "normal", lab == "bacterial", lab == "viral"], 1).astype(float)
        Y[np.random.default_rng(0).random(Y.shape) < 0.2] = np.nan
    else:
        Y = (lab[:, None] == np.array(["bacterial", "normal", "viral"])).astype(float)
    subjects = np.array([r["patient"] for r in rows])
    tr, va, te = data.split_by_subject(subjects, (0.6, 0.2, 0.2), seed=0)
    norm = (f[tr].mean(0), f[tr].std(0).clamp_min(1e-6))
    W, b, head = probe.fit_converged(f, torch.tensor(Y, dtype=torch.float32), [(tr, va)], task, norm, torch.device("cpu"))
    assert head["converged"] and head["grad_max"] <= downstream.GRAD_TOL
    P = probe.predict(W, b, f, te, task, norm)
    Z = ((f - norm[0]) / norm[1]).double().numpy()
    both = np.concatenate([tr, va])
    ref, auc_ref = 0.0, []
    if task == "multiclass":
        ref, prob = reference_fit(Z[both], Y[both].argmax(1), head["l2"][0], multiclass=True)
        Pr = prob(Z[te])
    else:
        Pr = np.zeros_like(P)
        for c in range(Y.shape[1]):
            known = both[np.isfinite(Y[both, c])]
            obj, prob = reference_fit(Z[known], Y[known, c], head["l2"][c])
            ref, Pr[:, c] = ref + obj, prob(Z[te])
    assert head["objective"] == pytest.approx(ref, abs=1e-3) and head["objective"] >= ref - 1e-9
    for c in range(Y.shape[1]):
        known = np.isfinite(Y[te, c])
        if 0 < Y[te][known, c].sum() < known.sum():
            auc_ref.append(abs(roc_auc_score(Y[te][known, c], P[known, c]) - roc_auc_score(Y[te][known, c],
                                                                                         Pr[known, c])))
    assert auc_ref and max(auc_ref) <= 0.005


def test_paper_preset_reports_how_far_from_converged_it_stops(tmp_path, capsys):
    res = probe.main(TINY + ["--csv", str(small_kermany(tmp_path)), "--subject_col", "patient", "--label_cols",
                             "pneumonia", "--folds", "2", "--preset", "paper", "--epochs", "3",
                             "--out_dir", str(tmp_path / "paper")])
    conv = res["convergence"]
    assert conv["solver"] == "adamw" and conv["gap"] > probe.GAP_TOL and not conv["converged"]
    assert all(o > p for o, p in zip(conv["objective"], conv["optimum"]))  # the optimum is below where AdamW stopped
    assert "WARNING" in conv["note"] and conv["note"] in capsys.readouterr().out  # printed beside the table
    saved = json.loads((tmp_path / "paper" / "results.json").read_text())
    assert saved["convergence"]["gap"] == pytest.approx(conv["gap"]) and "head: L2" not in " ".join(saved["deviations"])


# ----------------------------------------------------------------------------------------------------------------
# splits

def test_splits_never_share_a_subject(tmp_path):
    args = probe.get_args(["--folds", "5"])  # the bundled Kermany sample: 120 images of 116 patients
    table = probe.load_table(args)
    subj = table.subjects
    assert len(set(subj)) < len(subj), "the sample should have patients with several images"
    splits = probe.make_splits(table, args)
    assert len(splits) == 5
    for tr, va, te in splits:
        assert len(va) > 0
        a, b, c = set(subj[tr]), set(subj[va]), set(subj[te])
        assert not a & b and not a & c and not b & c
    all_test = np.concatenate([te for _, _, te in splits])
    assert sorted(all_test) == list(range(len(subj)))  # k-fold: every image is tested exactly once

    # a split that puts one patient's two images on both sides is refused
    dup = next(s for s in set(subj) if (subj == s).sum() > 1)
    i, j = np.flatnonzero(subj == dup)[:2]
    with pytest.raises(UserError):
        data.check_disjoint(subj, np.array([i]), np.array([j]))
    # and so is a --test_csv holding a patient of --csv
    rows = read_rows(KERMANY)
    for name, part in (("train.csv", rows[:80]), ("test.csv", rows[79:])):  # row 79 in both
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(part)
    leaky = probe.get_args(["--csv", str(tmp_path / "train.csv"), "--test_csv", str(tmp_path / "test.csv"),
                            "--image_root", str(SAMPLE / "kermany"), "--subject_col", "patient", "--label_cols",
                            "pneumonia"])
    with pytest.raises(UserError, match="subject leak"):
        probe.make_splits(probe.load_table(leaky), leaky)


# ----------------------------------------------------------------------------------------------------------------
# end to end

def check_run(out, n_images, classes, n_folds):
    res = json.loads((out / "results.json").read_text())
    for key in ("name", "encoder", "task", "classes", "auprc", "auroc", "agg", "per_fold", "settings", "data"):
        assert key in res
    assert res["classes"] == classes and len(res["per_fold"]) == n_folds
    assert set(res["auprc"]) == set(classes) and set(res["agg"]) == {"auprc", "auroc"}
    # the per-fold numbers in results.json are scikit-learn's on the predictions written beside them
    preds = read_rows(out / "predictions.csv")
    assert len({r["path"] for r in preds}) == n_images
    for f in res["per_fold"]:
        rows = [r for r in preds if int(r["fold"]) == f["fold"]]
        for i, c in enumerate(classes):
            y = np.array([float(r[f"label_{c}"]) for r in rows])
            p = np.array([float(r[f"prob_{c}"]) for r in rows])
            if 0 < y.sum() < len(y):
                assert f["auprc"][i] == pytest.approx(average_precision_score(y, p), abs=1e-4)
                assert f["auroc"][i] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    png = Image.open(out / "pr_curves.png").convert("RGB")
    assert png.size == (760, 560)
    assert (np.asarray(png) == [31, 119, 180]).all(-1).sum() > 50  # the first class's curve was drawn
    assert len(read_rows(out / "results.csv")) == 2 * (len(classes) + 1)
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "val_loss"} <= set(log[0]) and {r["fold"] for r in log} == set(range(n_folds))
    return res


def test_random_and_trained_encoders_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no out/pretrain/encoder.safetensors here: no --encoder means random init
    small = small_kermany(tmp_path)
    flags = TINY + ["--csv", str(small), "--subject_col", "patient", "--folds", "3", "--epochs", "3"]
    res = probe.main(flags + ["--label_cols", "label", "--task", "multiclass", "--out_dir", str(tmp_path / "random")])
    check_run(tmp_path / "random", 42, ["bacterial", "normal", "viral"], 3)
    assert res["task"] == "multiclass" and "random-init vit_tiny" in res["encoder"]

    # a briefly trained encoder: two optimiser steps on real X-rays, exported the project's way
    torch.manual_seed(1)
    vit = build_vit("vit_tiny", img_size=56, patch_size=14)
    pre = data.Preprocess(56)
    x = torch.stack([pre(data.read_image(r["path"])) for r in read_rows(small)[:8]])
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    for _ in range(2):
        loss = (vit(x) - vit(x.flip(-1)).detach()).pow(2).mean() - vit(x).std(0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc = tmp_path / "encoder.safetensors"
    save_encoder(vit, str(enc), step=2)
    args = flags + ["--label_cols", "pneumonia", "--encoder", str(enc), "--out_dir", str(tmp_path / "trained")]
    res = probe.main(args)
    check_run(tmp_path / "trained", 42, ["pneumonia"], 3)
    assert res["task"] == "binary" and str(enc) in res["encoder"]
    assert str(enc) in capsys.readouterr().out  # the encoder is named on stdout too

    # the cached embeddings are the encoder's on the preprocessed image, and a rerun reuses them
    cached = torch.load(next((tmp_path / "trained" / "features").glob("*.pt")), weights_only=True)
    loaded, info = load_encoder(str(enc), model="vit_tiny")
    i = 5
    img = downstream.center_crop(data.read_image(cached["paths"][i]))  # the paper's centre crop, then the resize
    assert img.shape[0] == img.shape[1] == min(data.read_image(cached["paths"][i]).shape)
    ref = loaded.global_embedding(data.Preprocess(info.img_size, info.mean, info.std)(img)[None])[0]
    assert torch.allclose(cached["feats"][i], ref, atol=1e-4)
    res2 = probe.main(args)
    assert "reusing" in capsys.readouterr().out
    assert res2["agg"]["auprc"]["folds"] == res["agg"]["auprc"]["folds"]  # same seed, same features: same numbers

    # --augment: augmented training images go through the frozen encoder each step (the SGD head's option)
    res3 = probe.main(args + ["--preset", "paper", "--augment", "--max_steps", "2", "--out_dir", str(tmp_path / "aug")])
    check_run(tmp_path / "aug", 42, ["pneumonia"], 3)
    assert res3["settings"]["augment"] and any("augmentations" in d for d in res3["deviations"])
    with pytest.raises(UserError, match="needs the SGD head"):
        probe.get_args(["--augment"])


def test_augment_geometry(monkeypatch):
    x = torch.stack([data.Preprocess(56, 0.0, 1.0)(data.read_image(SAMPLE / "kermany" / r["path"]))
                     for r in read_rows(KERMANY)[:4]])
    g = lambda: torch.Generator().manual_seed(0)
    y = probe.augment(x, g())
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, x)
    assert torch.equal(y, probe.augment(x, g()))  # reproducible from the generator
    off = dict(flip_p=0.0, rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, crop_area=(1.0, 1.0), brightness=0.0,
               contrast=(1.0, 1.0), noise_std=0.0)
    monkeypatch.setattr(probe, "AUG", off)
    assert torch.allclose(probe.augment(x, g()), x, atol=1e-5)  # strength zero: the identity
    monkeypatch.setattr(probe, "AUG", {**off, "flip_p": 1.0})
    assert torch.allclose(probe.augment(x, g()), x.flip(-1), atol=1e-5)  # a horizontal flip, not a vertical one


# ----------------------------------------------------------------------------------------------------------------
# published layouts, written from real X-rays

def write_dicom(src, path, monochrome1=False):
    img = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 16  # 12-bit, as detector DICOMs are
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = ((4095 - img) if monochrome1 else img).astype(np.uint16).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return img


VINDR_COLS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
              "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
              "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening",
              "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia",
              "Tuberculosis", "Other diseases", "No finding"]


def test_vindr_layout(tmp_path):
    root = tmp_path / "vindr-cxr" / "1.0.0"
    nih = read_rows(NIH)
    # 8 training images read by 3 radiologists, 4 test images with one consensus row; votes per reader for
    # Cardiomegaly and Lung Opacity (the rest 0, 'No finding' 1 when nothing else is marked)
    train_votes = [((1, 1, 0), (1, 0, 0)), ((0, 0, 1), (1, 1, 1)), ((1, 1, 1), (0, 0, 0)), ((0, 0, 0), (0, 1, 1)),
                   ((0, 1, 0), (0, 0, 0)), ((1, 0, 1), (1, 1, 0)), ((0, 0, 0), (0, 0, 0)), ((0, 0, 0), (1, 0, 0))]
    test_labels = [(1, 0), (0, 1), (1, 1), (0, 0)]
    sources = {}
    with open(_mkdir(root / "annotations") / "image_labels_train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "rad_id"] + VINDR_COLS)
        for k, (cardio, opac) in enumerate(train_votes):
            image_id = f"{k:032x}"
            sources[image_id] = write_dicom(SAMPLE / "nih14" / nih[k]["path"], root / "train" / f"{image_id}.dicom",
                                            monochrome1=k % 2 == 1)
            for r in range(3):
                row = {c: 0 for c in VINDR_COLS}
                row.update({"Cardiomegaly": cardio[r], "Lung Opacity": opac[r]})
                row["No finding"] = int(not (cardio[r] or opac[r]))
                w.writerow([image_id, f"R{r + 8}"] + [row[c] for c in VINDR_COLS])
    with open(root / "annotations" / "image_labels_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id"] + VINDR_COLS)
        for k, (cardio, opac) in enumerate(test_labels):
            image_id = f"{100 + k:032x}"
            write_dicom(SAMPLE / "nih14" / nih[8 + k]["path"], root / "test" / f"{image_id}.dicom")
            row = {c: 0 for c in VINDR_COLS}
            row.update({"Cardiomegaly": cardio, "Lung Opacity": opac, "No finding": int(not (cardio or opac))})
            w.writerow([image_id] + [row[c] for c in VINDR_COLS])

    def load(*extra):
        args = probe.get_args(["--dataset", "vindr", "--data_dir", str(root), "--label_cols",
                               "Cardiomegaly,Lung Opacity", *extra])
        return probe.load_table(args)

    table = load()
    assert table.task == "multilabel" and table.classes == ["Cardiomegaly", "Lung Opacity"]
    assert len(table.parts["pool"]) == 8 and len(table.parts["test"]) == 4
    majority = [[int(sum(c) >= 2), int(sum(o) >= 2)] for c, o in train_votes]
    assert table.labels[table.parts["pool"]].tolist() == majority
    assert table.labels[table.parts["test"]].tolist() == [list(t) for t in test_labels]
    assert list(table.subjects[:8]) == [f"{k:032x}" for k in range(8)]  # subject = image_id
    any_reader = load("--vindr_consensus", "any")
    assert any_reader.labels[:8].tolist() == [[int(max(c)), int(max(o))] for c, o in train_votes]
    for i in (0, 1):  # the DICOMs (MONOCHROME2 and MONOCHROME1) read back as the source X-ray, bone bright
        src = sources[table.subjects[i]].astype(np.float64)
        assert np.allclose(data.read_image(table.paths[i]), (src - src.min()) / (src.max() - src.min()), atol=1e-3)
    six = probe.load_table(probe.get_args(["--dataset", "vindr", "--data_dir", str(root)]))
    assert six.classes == archives.VINDR_SIX and six.labels.shape == (12, 6)

    res = probe.main(TINY + ["--dataset", "vindr", "--data_dir", str(root), "--label_cols", "Cardiomegaly,Lung Opacity",
                             "--epochs", "2", "--out_dir", str(tmp_path / "out")])
    # the official split, the head trained with 5 seeds: mean ± std over the seeds, every seed on the same 4 images
    assert res["protocol"].startswith("fixed test set, 5 seed") and len(res["per_fold"]) == 5
    assert all(f["n_test"] == 4 and f["n_train"] + f["n_val"] == 8 for f in res["per_fold"])
    assert res["agg"]["auroc"]["std"] == pytest.approx(np.std(res["agg"]["auroc"]["folds"]))


def _mkdir(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_rsna_layout(tmp_path):
    root = tmp_path / "rsna"
    kermany = read_rows(KERMANY)
    # patientId, boxes (x, y, width, height) -> one row per box, or one row with empty box columns and Target 0
    patients = {"0004cfab-14fd-4e49-80ba-63a80b6bddd6": [], "00313ee0-9eaa-42f4-b0ab-c148ed3241cd": [],
                "00322d4d-1c29-4943-afc9-b6754be640eb": [(264, 152, 213, 379), (562, 152, 256, 453)],
                "003d8fa0-6bf1-40ed-b54c-ac657f8495c5": [],
                "00436515-870c-4b36-a041-de91049b9ab4": [(316, 318, 170, 478)],
                "00569f44-917d-4c86-a842-81832af98c30": [(100, 100, 50, 60), (300, 120, 80, 90), (500, 200, 40, 40)]}
    with open(_mkdir(root) / "stage_2_train_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        for k, (pid, boxes) in enumerate(patients.items()):
            write_dicom(SAMPLE / "kermany" / kermany[k * 20]["path"], root / "stage_2_train_images" / f"{pid}.dcm")
            for b in boxes or [("", "", "", "")]:
                w.writerow([pid, *b, int(bool(boxes))])
    table = probe.load_table(probe.get_args(["--dataset", "rsna", "--data_dir", str(root)]))
    assert table.task == "binary" and table.classes == ["Pneumonia"]
    assert list(table.subjects) == list(patients)  # one image per patient, however many boxes
    assert table.labels[:, 0].tolist() == [float(bool(b)) for b in patients.values()]
    assert all(os.path.basename(p) == f"{s}.dcm" for p, s in zip(table.paths, table.subjects))
    # the paper's protocol by default: one 60/20/20 split by patient (here 4 / 1 / 1), the head trained with 5 seeds
    args = probe.get_args(["--dataset", "rsna", "--data_dir", str(root)])
    splits = probe.make_splits(table, args)
    assert probe.protocol_of(table, args) == "split" and len(splits) == 5
    assert all([len(s) for s in sp] == [4, 1, 1] for sp in splits)
    assert all(all(np.array_equal(a, b) for a, b in zip(sp, splits[0])) for sp in splits)  # the seeds share it
    tr, va, te = splits[0]
    assert not set(table.subjects[tr]) & set(table.subjects[te]) and not set(table.subjects[va]) & set(table.subjects[te])
    res = probe.main(TINY + ["--dataset", "rsna", "--data_dir", str(root), "--protocol", "cv", "--folds", "2",
                             "--epochs", "2", "--out_dir", str(tmp_path / "out")])
    assert res["protocol"].startswith("2-fold") and sum(f["n_test"] for f in res["per_fold"]) == 6
    assert any("RSNA with --protocol cv" in d for d in res["deviations"])


# ----------------------------------------------------------------------------------------------------------------
# comparing two encoders

def write_preds(path, rows, probs):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "subject", "fold", "label_pneumonia", "prob_pneumonia"])
        for r, p in zip(rows, probs):
            w.writerow([r["path"], r["patient"], 0, r["pneumonia"], p])


def test_compare_paired_bootstrap(tmp_path, capsys):
    rows = read_rows(KERMANY)
    y = np.array([float(r["pneumonia"]) for r in rows])
    rng = np.random.default_rng(0)
    write_preds(tmp_path / "good.csv", rows, 0.6 * y + 0.4 * rng.random(len(y)))  # clearly better
    write_preds(tmp_path / "weak.csv", rows, 0.1 * y + 0.9 * rng.random(len(y)))
    write_preds(tmp_path / "same.csv", rows, 0.6 * y + 0.4 * np.random.default_rng(0).random(len(y)))
    run = lambda a, b: probe.main(["--compare", str(tmp_path / a), str(tmp_path / b), "--n_boot", "300",
                                   "--out_dir", str(tmp_path / "cmp")])
    out = run("good.csv", "weak.csv")["metrics"]
    for m in ("auprc", "auroc"):
        for c in ("pneumonia", "Agg."):
            assert out[m][c]["p_one_tailed"] < 0.05 and out[m][c]["delta"] > 0
    good = np.array([float(r["prob_pneumonia"]) for r in read_rows(tmp_path / "good.csv")])
    assert out["auroc"]["pneumonia"]["a"] == pytest.approx(roc_auc_score(y, good), abs=1e-12)
    assert out["auprc"]["Agg."]["a"] == pytest.approx(average_precision_score(y, good), abs=1e-12)
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["n_images"] == 120
    assert run("weak.csv", "good.csv")["metrics"]["auprc"]["Agg."]["p_one_tailed"] > 0.5
    same = run("good.csv", "same.csv")["metrics"]
    assert all(same[m][c]["p_one_tailed"] >= 0.05 for m in same for c in same[m])
    write_preds(tmp_path / "fewer.csv", rows[:100], rng.random(100))
    with pytest.raises(UserError, match="different test images"):
        run("good.csv", "fewer.csv")


def test_unreadable_image_is_named(tmp_path):
    rows = read_rows(KERMANY)[:10]
    (tmp_path / "broken.jpg").write_bytes(b"not a JPEG")
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "path": str(SAMPLE / "kermany" / r["path"])} for r in rows[:-1]])
        w.writerow({**rows[-1], "path": "broken.jpg"})
    with pytest.raises(UserError, match="broken.jpg"):
        probe.main(TINY + ["--csv", str(tmp_path / "t.csv"), "--subject_col", "patient", "--label_cols", "pneumonia",
                           "--folds", "2", "--out_dir", str(tmp_path / "out")])


def test_user_mistake_is_one_line(capsys):
    # what `python probe.py ...` does (base.run(main)), in-process: a start-up of torch costs more than the test
    with pytest.raises(SystemExit) as e:
        base.run(lambda: probe.main(["--csv", "no_such.csv", "--label_cols", "a"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and "no_such.csv" in err and "Traceback" not in err
