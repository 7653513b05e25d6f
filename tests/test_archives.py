"""archives.py: every published layout, written from real X-rays in that layout, read back as generic samples;
the MIMIC-CXR report parser; the shared split and leak check (downstream.split_samples)."""
import csv
import gzip
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import downstream
import archives
import seglabels
import report
import segment
from base import UserError
from conftest import SAMPLE

LUNGSEG = SAMPLE / "lungseg"


# ----------------------------------------------------------------------------------------------------------------
# report layouts: MIMIC-CXR and IU-Xray (moved from test_report.py with the loaders)

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 COMPARISON:  None.

 FINDINGS:
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.
 
 IMPRESSION:
 
 No acute cardiopulmonary process.
"""


def _write_gz(path, header, rows):
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_extract_findings():
    assert archives.extract_findings(MIMIC_REPORT) == ("There is no focal consolidation, pleural effusion or "
                                                     "pneumothorax. Bilateral nodular opacities that most likely "
                                                     "represent nipple shadows.")
    only_imp = " INDICATION: cough\n\n IMPRESSION:\n Mild cardiomegaly.\n"
    assert archives.extract_findings(only_imp) == "Mild cardiomegaly."
    assert archives.extract_findings(" INDICATION: cough\n\n COMPARISON: none\n") is None


EMPTY_FINDINGS = " FINDINGS:\n\n IMPRESSION:\n Mild cardiomegaly.\n"  # a header without text: no findings


def by_part(samples):
    return {k: [s for s in samples if s["part"] == k] for k in ("train", "val", "test")}


def make_mimic(root, img):
    """A MIMIC-CXR-JPG tree in the real layout (gzipped split / metadata CSVs, files/pXX/pXXXXXXXX/sYYYYYYYY/*.jpg,
    reports files/pXX/pXXXXXXXX/sYYYYYYYY.txt). Per study: subject, study, split, report text (None: no file),
    views. Returns the pairs the paper's rule and the one-per-study rule keep per split, counted by hand."""
    studies = [  # subject, study, split, report, views
        ("10000032", "50414267", "train", MIMIC_REPORT, ["PA", "AP", "LATERAL"]),    # 2 frontal with findings
        ("10000032", "50414270", "train", MIMIC_REPORT, ["AP", "AP", "AP"]),         # 3 (several AP images)
        ("10000033", "50414268", "train", " IMPRESSION:\n Mild cardiomegaly.\n", ["PA", "LL"]),  # 0: impression only
        ("10000035", "50414271", "train", EMPTY_FINDINGS, ["AP"]),                   # 0: empty findings header
        ("10000036", "50414272", "train", None, ["PA"]),                             # 0: no report file
        ("10000037", "50414273", "validate", MIMIC_REPORT, ["PA", "LATERAL"]),       # 1
        ("10000038", "50414274", "test", MIMIC_REPORT, ["AP", "PA"]),                # 2
        ("10000034", "50414269", "test", " INDICATION: none\n", ["PA", "AP"]),       # 0: no sections at all
        ("11000039", "50414275", "test", MIMIC_REPORT, ["LATERAL", ""]),            # 0: no frontal view
    ]
    split, meta = [], []
    for subj, study, part, text, views in studies:
        d = root / "files" / f"p{subj[:2]}" / f"p{subj}"
        (d / f"s{study}").mkdir(parents=True)
        if text is not None:
            (d / f"s{study}.txt").write_text(text)
        for k, view in enumerate(views):
            dicom = f"{study}-{k}-{view.lower() or 'none'}"
            shutil.copy(img, d / f"s{study}" / f"{dicom}.jpg")
            split.append([dicom, study, subj, part])
            meta.append([dicom, subj, study, "CHEST (PA AND LAT)", view])
    _write_gz(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    _write_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition"], meta)
    return {"train": 5, "val": 1, "test": 2}, {"train": 4, "val": 1, "test": 1}


def test_mimic_loader_paper_rule_and_study_rule(tmp_path, capsys):
    img = SAMPLE / "reports" / "images" / os.listdir(SAMPLE / "reports" / "images")[0]
    paper, per_study = make_mimic(tmp_path, img)
    args = report.get_args(["--dataset", "mimic", "--data_dir", str(tmp_path)])
    assert args.mimic_rule == "paper"  # the default
    samples, source = archives.load_mimic(args)
    out = by_part(samples)
    assert {k: len(v) for k, v in out.items()} == paper
    printed = capsys.readouterr().out
    assert "train 5 frontal images kept, 2 without findings" in printed and "1 without a report file" in printed
    tr = out["train"]
    assert sorted(os.path.basename(e["path"]) for e in tr[:2]) == ["50414267-0-pa.jpg", "50414267-1-ap.jpg"]
    assert all(os.path.exists(e["path"]) and e["text"].startswith("There is no focal consolidation") for e in tr)
    assert tr[0]["path"].endswith("files/p10/p10000032/s50414267/" + os.path.basename(tr[0]["path"]))
    parts, _ = report.load_samples(args)  # the official split kept as it is
    assert {k: len(v) for k, v in parts.items()} == paper
    # the old rule behind the flag: one frontal image per study, PA preferred, impression when there is no findings
    samples, _ = archives.load_mimic(report.get_args(["--dataset", "mimic", "--data_dir", str(tmp_path),
                                                      "--mimic_rule", "study"]))
    out = by_part(samples)
    assert {k: len(v) for k, v in out.items()} == per_study
    assert out["train"][0]["path"].endswith("50414267-0-pa.jpg")
    assert {e["text"] for e in out["train"]} >= {"Mild cardiomegaly."}


def test_iu_xray_loader(tmp_path):
    img = SAMPLE / "reports" / "images" / os.listdir(SAMPLE / "reports" / "images")[0]
    ann = {}
    for part, n in (("train", 3), ("val", 1), ("test", 2)):
        ann[part] = []
        for i in range(n):
            sid = f"CXR{part}{i}_IM-00{i}"
            (tmp_path / "images" / sid).mkdir(parents=True)
            for k in (0, 1):
                shutil.copy(img, tmp_path / "images" / sid / f"{k}.png")
            ann[part].append({"id": sid, "report": f"The heart is normal in size.  No effusion {i}.",
                              "image_path": [f"{sid}/0.png", f"{sid}/1.png"], "split": part})
    ann["train"].append({"id": "CXRblank", "report": "  ", "image_path": ["x/0.png"], "split": "train"})
    (tmp_path / "annotation.json").write_text(json.dumps(ann))
    # default: IU-Xray is out-of-distribution test data only, and training on it is refused with a clear error
    with pytest.raises(UserError, match="out-of-distribution"):
        report.get_args(["--dataset", "iu_xray", "--data_dir", str(tmp_path)])
    samples, source = archives.load_iu_xray(SimpleNamespace(data_dir=str(tmp_path), image_root=None, iu_split="test"))
    assert [len(by_part(samples)[k]) for k in ("train", "val", "test")] == [0, 0, 6]
    out, source = report.load_samples(report.get_args(["--dataset", "iu_xray", "--data_dir", str(tmp_path),
                                                       "--iu_split", "r2gen"]))
    assert [len(out[k]) for k in ("train", "val", "test")] == [3, 1, 2] and "1 blank report(s) dropped" in source
    e = out["test"][1]
    assert e["path"] == str(tmp_path / "images" / "CXRtest1_IM-001" / "0.png") and os.path.exists(e["path"])
    assert e["text"] == "the heart is normal in size. no effusion 1." and e["subject"] == "CXRtest1_IM-001"


# ----------------------------------------------------------------------------------------------------------------
# PhysioNet lung-segment-mimic-cxr: per CXR a pair of segmented images, the lungs and the rest

def make_lung_segment_mimic(root, n=12):
    """n bundled X-rays with their lung masks, written the way lung-segment-mimic-cxr ships them: the X-ray's
    pixels inside the lungs (the rest black) and outside them (the lungs black), under MIMIC's p<subject>/s<study>
    folders, named by a dicom_id. Returns {dicom_id: (image, mask)} as uint8 arrays."""
    rows = list(csv.DictReader(open(LUNGSEG / "manifest.csv")))[:n]
    truth = {}
    for k, r in enumerate(rows):
        img = np.asarray(Image.open(LUNGSEG / r["image"]).convert("L"))
        mask = np.asarray(Image.open(LUNGSEG / r["mask"]))
        lung = (mask > 0) & (mask != 127) & (img > 0)  # a black pixel cannot be told from the background
        subj = f"1{k // 2:07d}"  # two images per patient: the split must keep them together
        d = root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s5{k:07d}"
        d.mkdir(parents=True)
        dicom = f"{k:08x}-2f1c3a4b-9d8e7f60-1a2b3c4d-5e6f7a8b"
        Image.fromarray(np.where(lung, img, 0).astype(np.uint8)).save(d / f"{dicom}_lung.png")
        Image.fromarray(np.where(lung, 0, img).astype(np.uint8)).save(d / f"{dicom}_rest.png")
        truth[dicom] = (img, lung, subj)
    return truth


def test_lung_segment_mimic_cxr_layout(tmp_path, monkeypatch):
    root = tmp_path / "lung-segment-mimic-cxr" / "1.0.0"
    truth = make_lung_segment_mimic(root)
    args = segment.get_args(["--dataset", "mimic_lungs", "--data_dir", str(root)])
    samples, source = archives.load_mimic_lungs(args)
    assert len(samples) == 12 and "lung-segment-mimic-cxr" in source
    for s in samples:
        dicom = os.path.basename(s["mask"]).replace("_lung.png", "")
        img, lung, subj = truth[dicom]
        assert s["subject"] == subj
        # the X-ray is the two segmented images together, exactly; the mask is the lung image's non-black part
        np.testing.assert_allclose(seglabels.read_composed(s["compose"]), img / 255.0, atol=1e-6)
        lab = seglabels.make_label(s, "lungs", img.shape)
        assert ((lab == 1) | (lab == 2)).sum() == lung.sum() and not ((lab > 0) & ~lung).any()
        xs1, xs2 = np.nonzero(lab == 1)[1], np.nonzero(lab == 2)[1]
        assert xs1.mean() < xs2.mean()  # right lung on the image's left
    parts = segment.load_parts(args)
    assert sum(len(v) for v in parts.values()) == 12
    subj = {k: {s["subject"] for s in v} for k, v in parts.items()}
    assert not (subj["train"] & subj["val"] or subj["train"] & subj["test"] or subj["val"] & subj["test"])
    # the whole run on it: a random vit_tiny, linear decoder, two epochs
    monkeypatch.chdir(tmp_path)
    res = segment.main(["--dataset", "mimic_lungs", "--data_dir", str(root), "--decoder", "linear", "--model",
                        "vit_tiny", "--img_size", "56", "--max_steps", "20", "--num_workers", "0",
                        "--n_overlays", "0", "--device", "cpu", "--out_dir", str(tmp_path / "out")])
    assert res["n_train"] + res["n_val"] + res["n_test"] == 12 and 0 <= res["test"]["mean_dice"] <= 1
    assert any("no official split" in d for d in res["deviations"])
    with pytest.raises(UserError, match="no lung-segment-mimic-cxr image pairs"):
        archives.load_mimic_lungs(segment.get_args(["--dataset", "mimic_lungs", "--data_dir", str(tmp_path / "out")]))


# ----------------------------------------------------------------------------------------------------------------
# the shared split

def test_split_keeps_fixed_parts_and_refuses_a_leak():
    pool = [{"path": f"{i}.png", "subject": f"s{i // 2}", "part": None} for i in range(40)]
    fixed = [{"path": f"t{i}.png", "subject": f"t{i}", "part": "test"} for i in range(5)]
    parts = downstream.split_samples(pool + fixed, {"train": 0.8, "val": 0.2, "test": 0.2}, seed=3)
    assert parts["test"] == fixed and len(parts["train"]) + len(parts["val"]) == 40
    assert len({s["subject"] for s in parts["val"]}) == 4  # 20% of the 20 subjects, both images of each
    assert not {s["subject"] for s in parts["train"]} & {s["subject"] for s in parts["val"]}
    leak = fixed + [{"path": "x.png", "subject": "t0", "part": None}] + pool
    with pytest.raises(UserError, match="subject leak: subject t0"):
        downstream.split_samples(leak, {"train": 0.8, "val": 0.2}, seed=3)
    with pytest.raises(UserError, match="the val part is empty"):
        downstream.split_samples(fixed + [{**s, "part": "train"} for s in pool])


def test_unknown_layout_and_missing_root_are_one_line(tmp_path):
    args = segment.get_args([])
    for name, root, msg in (("nope", str(tmp_path), "unknown"), ("vindr", None, "needs --data_dir"),
                            ("rsna", str(tmp_path / "absent"), "no such folder")):
        args.data_dir = root
        with pytest.raises(UserError, match=msg):
            archives.load(name, args)
