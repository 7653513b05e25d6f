"""The paper's five pretraining archives (Table 1) and their label files, each written by the test in its published
layout (file and column names as released, a few rows, tiny images): the source table, view balancing, subject
exclusion, the uncertain-label policies against hand-computed masks and metrics, and the one-line errors."""
import csv
import gzip
import math
import os
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import archives
import data
import probe
from base import UserError
from conftest import ROOT

CHEXPERT_HEAD = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + archives.CHEXPERT_14
MIMIC_META_HEAD = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                   "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                   "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
NIH_HEAD = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position," \
           "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"  # commas inside names, unquoted, as released
PADCHEST_HEAD = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                 "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
                 "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM",
                 "PixelAspectRatio_DICOM", "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM",
                 "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM",
                 "ExposureInuAs_DICOM", "ExposureTime", "RelativeXRayExposure_DICOM", "ReportID", "Report",
                 "MethodLabel", "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS",
                 "LocalizationsCUIS"]
BRAX_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
               "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
               "Fracture", "Support Devices"]
# the 8 leading columns are known only by name (7 of them) and count; the order here is a guess, read by name
BRAX_HEAD = ["DicomPath", "PngPath", "PatientID", "PatientSex", "PatientAge", "AccessionNumber", "StudyDate",
             "ImageID"] + BRAX_LABELS + ["ViewPosition", "Rows", "Columns", "Manufacturer"]


def _image(path, bits=8, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(os.path.basename(path).encode()))
    if bits == 16:  # PadChest and BRAX ship 16-bit grayscale PNGs
        Image.fromarray(rng.integers(0, 65535, (64, 64)).astype(np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (64, 64)).astype(np.uint8)).save(path, fmt)


def _write(path, header, rows, gz=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _chexpert(root):
    """CheXpert-v1.0-small: 5 train rows (4 patients), 3 valid rows; Cardiomegaly / Edema with 1, 0, -1, blank."""
    d = root / "CheXpert-v1.0-small"

    def row(split, patient, view, cardio, edema, blank=""):
        kind = "frontal" if view == "Frontal" else "lateral"
        n = 2 if kind == "lateral" else 1
        p = f"CheXpert-v1.0-small/{split}/{patient}/study1/view{n}_{kind}.jpg"
        _image(str(root / p), fmt="JPEG")
        labels = {c: blank for c in archives.CHEXPERT_14} | {"Cardiomegaly": cardio, "Edema": edema}
        return [p, "Female", 60, view, "AP" if view == "Frontal" else ""] + [labels[c] for c in archives.CHEXPERT_14]

    _write(d / "train.csv", CHEXPERT_HEAD, [
        row("train", "patient00001", "Frontal", "1.0", "-1.0"), row("train", "patient00001", "Lateral", "1.0", "-1.0"),
        row("train", "patient00002", "Frontal", "-1.0", ""), row("train", "patient00003", "Frontal", "0.0", "1.0"),
        row("train", "patient00004", "Frontal", "", "0.0")])
    _write(d / "valid.csv", CHEXPERT_HEAD, [  # radiologists' consensus: 0/1 only
        row("valid", "patient64541", "Frontal", "1.0", "0.0", "0.0"),
        row("valid", "patient64542", "Frontal", "0.0", "1.0", "0.0"),
        row("valid", "patient64543", "Lateral", "0.0", "0.0", "0.0")])
    return d


def _dicom_id(i):
    return "-".join(f"{i * 7919 + k:08x}" for k in range(5))


MIMIC_IMAGES = [  # dicom index, subject, study, ViewPosition, split
    (1, "10000032", "50414267", "PA", "train"), (2, "10000032", "50414267", "LATERAL", "train"),
    (3, "10000033", "50000001", "AP", "train"), (4, "10000033", "50000001", "", "train"),
    (5, "10000034", "50000002", "LL", "validate"), (6, "10000035", "50000003", "PA", "test")]


def _mimic(root):
    d = root / "mimic-cxr-jpg" / "2.0.0"
    meta, split = [], []
    for i, s, st, view, part in MIMIC_IMAGES:
        _image(str(d / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{_dicom_id(i)}.jpg"), fmt="JPEG")
        meta.append([_dicom_id(i), s, st, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506, 80556.875,
                     "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
        split.append([_dicom_id(i), st, s, part])
    _write(d / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_META_HEAD, meta, gz=True)
    _write(d / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split, gz=True)
    abc = sorted(archives.CHEXPERT_14)  # MIMIC's label files list the observations alphabetically, one row per study
    lab = {"50414267": {"No Finding": "1.0"}, "50000001": {"Edema": "-1.0", "Cardiomegaly": "1.0"},
           "50000002": {"Edema": "1.0"}, "50000003": {"Cardiomegaly": "0.0"}}
    rows = [[s, st] + [lab[st].get(c, "") for c in abc] for s, st in sorted({(x[1], x[2]) for x in MIMIC_IMAGES})]
    for name in ("chexpert", "negbio"):
        _write(d / f"mimic-cxr-2.0.0-{name}.csv.gz", ["subject_id", "study_id"] + abc, rows, gz=True)
    return d


def _nih(root):
    d = root / "nih"
    rows = [("00000001_000.png", "Cardiomegaly", 1, "PA", "images_001"),
            ("00000001_001.png", "Cardiomegaly|Emphysema", 1, "PA", "images_001"),
            ("00000002_000.png", "No Finding", 2, "AP", "images_001"),
            ("00000003_000.png", "Effusion", 3, "PA", "images_002")]
    os.makedirs(d, exist_ok=True)
    with open(d / "Data_Entry_2017_v2020.csv", "w") as f:
        f.write(NIH_HEAD + "\n")
        for name, labels, pid, view, folder in rows:
            f.write(f"{name},{labels},0,{pid},57,M,{view},2682,2749,0.14300000000000002,0.14300000000000002\n")
            _image(str(d / folder / "images" / name))
    (d / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000003_000.png\n")
    (d / "test_list.txt").write_text("00000002_000.png")  # no final newline
    return d


def _padchest(root):
    d = root / "padchest"
    rows = [("1_aaaaaa.png", "0", "A", "PA", "['normal']", True),
            ("2_bbbbbb.png", "0", "A", "L", "['cardiomegaly', ' pleural effusion']", True),
            ("3_cccccc.png", "54", "B", "COSTAL", "['cardiomegaly']", True),
            ("4_dddddd.png", "54", "C", "", "", True),  # blank projection (other); no labels (dropped by the probe)
            ("5_eeeeee.png", "1", "D", "AP_horizontal", "['normal']", False),  # a listed image that is not there
            ("6_ffffff.png", "", "E", "PA", "['normal']", False)]  # a row without a folder number
    out = []
    for i, (image, folder, pid, proj, labels, exists) in enumerate(rows):
        r = dict.fromkeys(PADCHEST_HEAD, "")
        r.update({"": i, "ImageID": image, "ImageDir": folder, "PatientID": pid, "Projection": proj,
                  "Labels": labels, "Report": "linea 1\nlinea 2", "MethodLabel": "Physician"})
        out.append([r[c] for c in PADCHEST_HEAD])
        if exists:
            _image(str(d / folder / image), bits=16)
    _write(d / archives.PADCHEST_CSV, PADCHEST_HEAD, out)
    return d


def _brax(root):
    d = root / "brax"
    rows = [("1", "PA"), ("1", "L"), ("2", "AP LLD"), ("3", "RLO"), ("3", "")]
    out = []
    for k, (pid, view) in enumerate(rows):
        png = f"images/id_{pid}/Study_{k}/Series_{k}/image-{k}.png"
        _image(str(d / png), bits=16)
        r = {"DicomPath": png.replace("images/", "Anonymized_DICOMs/").replace(".png", ".dcm"), "PngPath": png,
             "PatientID": pid, "PatientSex": "M", "PatientAge": "85 or more", "AccessionNumber": k, "StudyDate": 1,
             "ImageID": k, "ViewPosition": view, "Rows": 64, "Columns": 64, "Manufacturer": 3}
        out.append([r.get(c, "") for c in BRAX_HEAD])
    _write(d / "master_spreadsheet_update.csv", BRAX_HEAD, out)
    return d


@pytest.fixture
def arch(tmp_path):
    root = tmp_path / "archives"
    return {"chexpert": _chexpert(root), "mimic": _mimic(root), "nih": _nih(root), "padchest": _padchest(root),
            "brax": _brax(root)}


def _specs(arch, mimic_weight=""):
    return [f"{k}={v}{mimic_weight if k == 'mimic' else ''}" for k, v in arch.items()]


# ----------------------------------------------------------------------------------------------------------------
# pretraining sources

def test_source_table_numbers(arch):
    sources = archives.pretrain_sources(_specs(arch))
    got = {s.name: (len(set(s.subjects)), len(s), *[sum(data.view_kind(v) == k for v in s.views)
                                                  for k in ("frontal", "lateral", "other")], s.skipped)
           for s in sources}
    assert got == {"chexpert": (7, 8, 6, 2, 0, {}),  # the Path prefix CheXpert-v1.0-small/ is the root folder
                   "mimic": (4, 6, 3, 2, 1, {}),  # PA AP PA; LATERAL LL; blank
                   "nih": (3, 4, 4, 0, 0, {}),
                   "padchest": (3, 4, 1, 1, 2, {"image file missing": 1, "row without an image path": 1}),
                   "brax": (3, 5, 2, 1, 2, {})}  # PA, AP LLD; L; RLO, blank
    table = data.source_table(sources).splitlines()
    assert table[0].split(" | ")[:7] == ["source  ", "subjects", "images", "frontal", "lateral", "other", "excluded"]
    assert table[4].split(" | ")[-1] == "1 image file missing, 1 row without an image path"
    assert table[-1].split() == "total | 20 | 27 | 16 | 6 | 5 | 0 | 2".split()
    # the generic sources keep working beside the named ones
    mixed = archives.pretrain_sources([str(arch["nih"]), f"brax={arch['brax']}:2"])
    assert [(s.name, len(s), s.weight, s.subjects is None) for s in mixed] == [(str(arch["nih"]), 4, 1.0, True),
                                                                               ("brax", 5, 2.0, False)]


def test_padchest_16bit_read_as_16bit(arch):
    src = archives.pretrain_padchest(str(arch["padchest"]))
    with Image.open(src.paths[0]) as im:
        assert im.mode.startswith("I")  # the fixture really is 16-bit, as released
    img = data.read_image(src.paths[0])
    assert img.dtype == np.float32 and 0 <= img.min() < img.max() <= 1


def test_view_balancing_to_ratio(arch):
    mimic = archives.pretrain_mimic(str(arch["mimic"]))  # 3 frontal, 2 lateral, 1 other
    sampler = data.MixSampler([mimic], frontal_ratio=3.0, epoch_size=400)
    # other keeps its share: round(400 / 6) = 67; the other 333 split 3:1 -> 250 frontal, 83 lateral
    assert sampler.plan() == [(250, 83, 67)]
    kinds = [data.view_kind(mimic.views[i]) for i in sampler.epoch_list(0)]
    assert (kinds.count("frontal"), kinds.count("lateral"), kinds.count("other")) == (250, 83, 67)
    table = data.source_table([mimic], sampler).splitlines()
    assert [c.strip() for c in table[0].split("|")][7:10] == ["epoch frontal", "epoch lateral", "epoch other"]
    assert [c.strip() for c in table[1].split("|")][7:10] == ["250", "83", "67"]


def test_exclude_subjects_counts(arch, tmp_path):
    ids = tmp_path / "eval_subjects.txt"
    ids.write_text("# evaluation patients\np10000033\npatient00002\n\n")
    split = arch["mimic"] / "mimic-cxr-2.0.0-split.csv.gz"  # its validate + test subjects: 10000034, 10000035
    assert data.read_subject_ids([split]) == {"10000034", "10000035"}
    sources = archives.pretrain_sources(_specs(arch), [str(ids), str(split)])
    assert {s.name: s.excluded for s in sources} == {"chexpert": 1, "mimic": 4, "nih": 0, "padchest": 0, "brax": 0}
    mimic = next(s for s in sources if s.name == "mimic")
    assert mimic.subjects == ["10000032", "10000032"] and len(mimic.views) == 2
    assert data.source_table(sources).splitlines()[2].split()[:13:2] == ["mimic", "1", "2", "1", "1", "0", "4"]
    with pytest.raises(UserError, match="no subject ids"):  # a folder cannot be filtered: say so, never ignore
        archives.pretrain_sources([str(arch["nih"])], [str(ids)])


def test_missing_file_and_renamed_column_one_line(arch):
    os.remove(arch["nih"] / "Data_Entry_2017_v2020.csv")
    with pytest.raises(UserError, match="Data_Entry_2017_v2020.csv") as e:
        archives.pretrain_nih(str(arch["nih"]))
    assert "\n" not in str(e.value)
    f = arch["chexpert"] / "train.csv"
    f.write_text(f.read_text().replace("Frontal/Lateral", "View", 1))
    with pytest.raises(UserError, match=r"train.csv has no column 'Frontal/Lateral'") as e:
        archives.pretrain_chexpert(str(arch["chexpert"]))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="unknown archive 'chexpret'"):
        data.parse_sources([f"chexpret={arch['chexpert']}"], named=archives.PRETRAIN)


def test_pretrain_command_prints_table_and_trains(arch, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--data_dir", *_specs(arch, ":2"), "--frontal_ratio", "3",
           "--exclude_subjects", str(arch["mimic"] / "mimic-cxr-2.0.0-split.csv.gz"), "--max_steps", "2",
           "--model", "vit_tiny", "--img_size", "56", "--batch_size", "4", "--num_workers", "0", "--min_keep", "1",
           "--monitor_every", "0", "--pred_depth", "2", "--pred_dim", "96", "--out_dir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    assert "sources (the paper's Table 1" in r.stdout and "1 image file missing" in r.stdout
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("mimic "))
    assert row.split(" | ")[6].strip() == "2"  # its validate and test subjects' images left out
    assert (out / "encoder.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------
# probing on the archives' labels

def _args(root, **kw):
    return SimpleNamespace(**{"data_dir": str(root), "label_cols": None, "uncertain": "ignore",
                              "mimic_labeler": "chexpert", **kw})


N = math.nan
# rows: train p1 frontal, p1 lateral, p2, p3, p4; valid p64541, p64542, p64543 (see _chexpert)
CARDIO = {"ignore": [1, 1, N, 0, 0, 1, 0, 0], "zeros": [1, 1, 0, 0, 0, 1, 0, 0], "ones": [1, 1, 1, 0, 0, 1, 0, 0]}
EDEMA = {"ignore": [N, N, 0, 1, 0, 0, 1, 0], "zeros": [0, 0, 0, 1, 0, 0, 1, 0], "ones": [1, 1, 0, 1, 0, 0, 1, 0]}
P_CARDIO = [0.9, 0.2, 0.8, 0.3, 0.1, 0.7, 0.4, 0.6]
# AUROC by hand, pairs (positive scored above negative) / (positives x negatives):
# ignore: row 3 left out; positives .9 .2 .7 vs negatives .3 .1 .4 .6: (4 + 1 + 4) / 12
# zeros: row 3 negative (.8): (5 + 1 + 4) / 15; ones: row 3 positive: (4 + 1 + 4 + 4) / 16
AUROC = {"ignore": 9 / 12, "zeros": 10 / 15, "ones": 13 / 16}


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_chexpert_uncertain_policy(arch, policy, capsys):
    args = _args(arch["chexpert"], uncertain=policy, label_cols="Cardiomegaly,Edema")
    samples, source = archives.load("chexpert", args)
    assert [s["part"] for s in samples] == [None] * 5 + ["test"] * 3  # valid.csv is the test set
    assert [s["subject"] for s in samples][:3] == ["patient00001", "patient00001", "patient00002"]
    task, classes, labels = archives.label_matrix(samples)
    Y = np.array(labels)
    assert task == "multilabel" and classes == ["Cardiomegaly", "Edema"]
    np.testing.assert_array_equal(Y[:, 0], CARDIO[policy])
    np.testing.assert_array_equal(Y[:, 1], EDEMA[policy])
    P = np.stack([P_CARDIO, np.linspace(0.1, 0.8, 8)], 1)
    assert probe.metrics(Y, P)["auroc"][0] == pytest.approx(AUROC[policy])
    assert f"uncertain -1: {policy}" in source and f"--uncertain {policy}" in capsys.readouterr().out


def test_mimic_labels_joined_to_images(arch):
    samples, _ = archives.load("mimic_cxr", _args(arch["mimic"], uncertain="ignore"))
    by = {os.path.basename(s["path"]): s for s in samples}
    assert len(samples) == 6 and all(os.path.exists(s["path"]) for s in samples)
    s3 = by[_dicom_id(3) + ".jpg"]  # study 50000001: Cardiomegaly 1, Edema -1 -> NaN, the rest blank -> 0
    assert s3["labels"]["Cardiomegaly"] == 1.0 and math.isnan(s3["labels"]["Edema"]) and s3["part"] is None
    assert s3["labels"]["Pneumonia"] == 0.0
    assert [by[_dicom_id(i) + ".jpg"]["part"] for i in (5, 6)] == ["val", "test"]


def test_nih_and_padchest_labels(arch, capsys):
    samples, _ = archives.load("nih", _args(arch["nih"]))
    lab = {os.path.basename(s["path"]): (s["part"], s["labels"]["Cardiomegaly"], s["labels"]["Emphysema"])
           for s in samples}
    assert lab == {"00000001_000.png": (None, 1.0, 0.0), "00000001_001.png": (None, 1.0, 1.0),
                   "00000002_000.png": ("test", 0.0, 0.0), "00000003_000.png": (None, 0.0, 0.0)}
    assert all(os.path.exists(s["path"]) for s in samples)
    args = _args(arch["padchest"], label_cols="cardiomegaly,pleural effusion")
    samples, _ = archives.load("padchest", args)
    assert [(s["subject"], s["labels"]["cardiomegaly"], s["labels"]["pleural effusion"]) for s in samples] == [
        ("A", 0.0, 0.0), ("A", 1.0, 1.0), ("B", 1.0, 0.0)]  # C has no labels, D's and E's images are not there
    assert "1 row(s) with blank or unreadable Labels and 2 listed image(s) not on disk dropped" in \
        capsys.readouterr().out
    args.label_cols = "pneumonia"
    with pytest.raises(UserError, match="no label 'pneumonia'"):
        archives.load("padchest", args)


def test_probe_records_uncertain_policy(arch, tmp_path):
    res = probe.main(["--dataset", "chexpert", "--data_dir", str(arch["chexpert"]), "--uncertain", "ignore",
                      "--label_cols", "Cardiomegaly,Edema", "--model", "vit_tiny", "--img_size", "56", "--repeats",
                      "1", "--num_workers", "0", "--out_dir", str(tmp_path / "probe")])
    d = data.read_json(tmp_path / "probe" / "results.json")["data"]
    assert d["uncertain"] == "ignore" and d["unlabelled"] == {"Cardiomegaly": 1, "Edema": 2}
    assert d["positives"] == {"Cardiomegaly": 3, "Edema": 2} and "uncertain -1: ignore" in d["source"]
    assert res["per_fold"][0]["n_test"] == 3  # valid.csv
