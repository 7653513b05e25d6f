"""
Published dataset layouts, read once for all three evaluations (`--dataset NAME --data_dir ROOT`).

    samples, source = archives.load("vindr", args)   # args: the script's flags (data_dir, label_cols, seed, ...)

Every loader returns what the CSV path returns (read_csv_samples; docs/CONVENTIONS.md, Samples): one dict per
image with "path", "subject", "part" ("train" | "val" | "test" | None: split by subject) and what the task needs
("labels", "mask" / "polys" / "boxes", "text"), and a one-line description of where it came from.
The layouts (LAYOUTS; each loader's docstring names its files): vindr (VinDr-CXR), rsna (RSNA Pneumonia) and the
paper's archives chexpert, mimic_cxr, nih, padchest for probe.py; vindr_rib (VinDr-RibCXR), mimic_lungs
(lung-segment-mimic-cxr) for segment.py; mimic (MIMIC-CXR-JPG), iu_xray (IU-Xray, R2Gen's layout), llava_rad
(LLaVA-Rad's MIMIC-CXR test annotations) for report.py. load_boxes reads Chest ImaGenome's zone boxes (--task
zones); PRETRAIN reads the five pretraining archives (pretrain.py / prepare.py --data_dir NAME=PATH).
"""
import ast
import collections
import glob
import os
import re

import numpy as np

import data
from base import UserError

# VinDr-CXR: the paper's six findings, spelled as in image_labels_{train,test}.csv (matched case-insensitively)
VINDR_SIX = ["Lung Opacity", "Cardiomegaly", "Pleural thickening", "Aortic enlargement", "Pulmonary fibrosis",
             "Pleural effusion"]
ZONES = ["right upper lung zone", "right mid lung zone", "right lower lung zone",
         "left upper lung zone", "left mid lung zone", "left lower lung zone"]
RIBS = [f"R{i}" for i in range(1, 11)] + [f"L{i}" for i in range(1, 11)]
XYXY = ("x1", "y1", "x2", "y2")
BINARY = ("0", "1", "0.0", "1.0")  # the only label values of a binary / multi-label column


def load(name, args):
    """(samples, source) of the published layout `name` under args.data_dir; a clear error when it is not there."""
    if name not in LAYOUTS:
        raise UserError(f"--dataset {name!r} unknown: choose from {', '.join(LAYOUTS)}")
    if not args.data_dir:
        raise UserError(f"--dataset {name} needs --data_dir (the dataset's root folder)")
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir}: no such folder")
    return LAYOUTS[name](args)


def as_01(value, where):
    v = str(value).strip()
    if v not in BINARY:
        raise UserError(f"{where}: label {value!r} is not 0 or 1 (multi-label and binary columns hold 0/1)")
    return float(v)


# ----------------------------------------------------------------------------------------------------------------
# the generic CSV format (docs/CONVENTIONS.md)

def read_csv_samples(path, image_root, cols, part=None, path_keys=("path",), drop_blank=None, subject_given=False):
    """One sample per row of a CSV: cols {sample key: column} ('path' and 'subject' at least); path_keys are resolved
    against --image_root (default: the CSV's folder). The subject column must exist, named or default (splitting
    images of one patient apart leaks): --subject_col none makes every image its own subject on purpose. A row
    repeated exactly is dropped and counted; one image listed twice with different values is an error. drop_blank:
    a key whose blank rows are dropped, and counted (the second value returned)."""
    cols = {**cols, "subject": None if cols.get("subject") == "none" else cols.get("subject")}
    rows = data.read_csv(path, required=[c for k, c in cols.items() if k != "subject" and c])
    if cols["subject"] and cols["subject"] not in rows[0]:
        named = "" if subject_given else " (the default)"
        raise UserError(f"{path} has no subject column {cols['subject']!r}{named} (its columns: {', '.join(rows[0])}):"
                        " name the patient id column with --subject_col, or pass --subject_col none to make every "
                        "image its own subject on purpose (one patient's images may then land in train and test)")
    out, dropped, seen, repeated = [], 0, {}, 0
    for i, r in enumerate(rows):
        s = {k: (r.get(c) or "").strip() if c else "" for k, c in cols.items()}
        if drop_blank and not s[drop_blank]:
            dropped += 1
            continue
        for k in path_keys:
            if s.get(k):
                s[k] = data.resolve(path, image_root, s[k])
        if s["path"] in seen:
            if seen[s["path"]][1] != s:
                raise UserError(f"{path} rows {seen[s['path']][0] + 2} and {i + 2} list the image {s['path']} with "
                                "different values: keep one")
            repeated += 1
            continue
        seen[s["path"]] = (i, dict(s))
        s["subject"] = s.get("subject") or os.path.splitext(os.path.basename(s["path"]))[0]
        s["part"] = part
        out.append(s)
    if repeated:
        print(f"warning: {path}: {repeated} repeated row(s) dropped (the same image, the same values)")
    return out, dropped


# ----------------------------------------------------------------------------------------------------------------
# classification (probe.py)

def _is_masked(v):
    """A label a published layout's loader left out on purpose (a float NaN, e.g. CheXpert's -1 with --uncertain
    ignore); text read from a user's CSV is never masked: there a blank or NaN is an error."""
    return isinstance(v, float) and v != v


def label_matrix(samples, task="auto"):
    """(task, classes, label matrix) from the samples' 'labels' {column: text or float}. Only 0/1 is a binary /
    multi-label value: a blank, -1, NaN or a word in a label column is an error naming the row, unless task is
    multiclass (one column of class names); a float NaN from a layout's loader is kept as NaN (not labelled: left
    out of the head's loss and of the metrics). A class that is the same for every image is kept, with a warning:
    it has no AUPRC."""
    cols = list(samples[0]["labels"])
    values = [["nan" if _is_masked(s["labels"][c]) else str(s["labels"][c]).strip() for c in cols] for s in samples]
    masked = [[_is_masked(s["labels"][c]) for c in cols] for s in samples]
    where = [s.get("where", s["path"]) for s in samples]
    if task == "auto":
        task = "multilabel" if len(cols) > 1 else "binary"
    if task == "binary" and len(cols) != 1:
        raise UserError("--task binary needs exactly one 0/1 label column")
    if task == "multiclass" and len(cols) == 1:  # one column of class names
        blank = [w for w, v in zip(where, values) if v[0] in ("", "nan", "NaN")]
        if blank:
            raise UserError(f"{blank[0]}: blank / NaN label in {cols[0]!r} ({len(blank)} rows): not a class; "
                            f"drop those rows")
        classes = sorted({v[0] for v in values})
        return task, classes, [[float(v[0] == c) for c in classes] for v in values]
    bad = [(w, v) for w, vals, m in zip(where, values, masked) for v, mv in zip(vals, m) if v not in BINARY and not mv]
    if bad:
        hint = " (one column of class names? pass --task multiclass)" if len(cols) == 1 else ""
        raise UserError(f"{bad[0][0]}: label {bad[0][1]!r} is not 0 or 1 ({len(bad)} such values): blanks, -1 "
                        f"(uncertain), NaN and words are not binary labels{hint}")
    labels = [[float(v) for v in vals] for vals in values]
    if task == "multiclass" and (any(map(any, masked)) or any(sum(l) != 1 for l in labels)):
        raise UserError("--task multiclass with several columns needs exactly one 1 per row (one-hot columns)")
    for i, c in enumerate(cols):
        known = {l[i] for l in labels if l[i] == l[i]}
        if len(known) == 1:
            n = sum(l[i] == l[i] for l in labels)
            print(f"warning: label {c!r} is {int(known.pop())} for all {n} {'labelled ' * (n < len(labels))}images: "
                  f"its AUPRC / AUROC are undefined ('-') and Agg. leaves it out")
    return task, cols, labels


def load_vindr(args):
    """VinDr-CXR on PhysioNet: ROOT/{train,test}/<image_id>.dicom, ROOT/annotations/image_labels_{train,test}.csv
    (image_id, rad_id, one 0/1 column per finding): the official 15,000 / 3,000 split. Three radiologists read each
    training image (a row each), five each test image (one consensus row); the dataset gives no fusion rule, so we
    take the majority, 2 of 3 (--vindr_consensus any: one reader is enough). No patient id: subject = image_id."""
    root, rule = args.data_dir, args.vindr_consensus
    wanted = [c.strip() for c in args.label_cols.split(",")] if args.label_cols else VINDR_SIX
    out = []
    for split in ("train", "test"):
        f = os.path.join(root, "annotations", f"image_labels_{split}.csv")
        rows = data.read_csv(f, required=["image_id"])
        lower = {h.lower(): h for h in rows[0]}  # VinDr writes 'Pleural thickening', papers 'Pleural Thickening'
        absent = [w for w in wanted if w.lower() not in lower]
        if absent:
            raise UserError(f"{f}: no column(s) {absent}; it has {sorted(rows[0])}")
        votes = {}  # image_id -> one 0/1 vector per reader
        for r in rows:
            votes.setdefault(r["image_id"], []).append([as_01(r[lower[w.lower()]], f) for w in wanted])
        for image_id, v in votes.items():
            n_pos = np.sum(v, axis=0)
            lab = n_pos * 2 > len(v) if rule == "majority" else n_pos >= 1
            out.append({"path": os.path.join(root, split, f"{image_id}.dicom"), "subject": image_id, "part": split,
                        "labels": dict(zip(wanted, map(float, lab)))})
    return out, f"VinDr-CXR {root} (official split; training labels: {rule} of the readers)"


def load_rsna(args):
    """RSNA Pneumonia Detection Challenge: ROOT/stage_2_train_labels.csv (patientId, x, y, width, height, Target;
    a row per box) and ROOT/stage_2_train_images/<patientId>.dcm: one image per patient, labelled max(Target). Only
    the training files carry labels: part None (probe.py: 60/20/20 by subject, or k-fold with --protocol cv)."""
    root = args.data_dir
    f = os.path.join(root, "stage_2_train_labels.csv")
    target = {}
    for r in data.read_csv(f, required=["patientId", "Target"]):
        target[r["patientId"]] = max(target.get(r["patientId"], 0.0), as_01(r["Target"], f))
    return [{"path": os.path.join(root, "stage_2_train_images", f"{i}.dcm"), "subject": i, "part": None,
             "labels": {"Pneumonia": t}} for i, t in target.items()], f"RSNA Pneumonia {root}"


# ----------------------------------------------------------------------------------------------------------------
# the paper's five archives (Table 1), each read from its own metadata as released: pretraining sources
# (pretrain.py / prepare.py --data_dir NAME=PATH, PRETRAIN) and labels for probing (probe.py --dataset, LAYOUTS)

CHEXPERT_14 = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
               "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
               "Fracture", "Support Devices"]  # CheXpert's column order (MIMIC's label files list them A-Z)
NIH_14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
          "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]  # as NIH spells them
CHEXPERT_FILES = ("train.csv", "valid.csv")
MIMIC_META, MIMIC_SPLIT = "mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-split.csv"
MIMIC_PARTS = {"train": None, "validate": "val", "test": "test"}  # the split file's values -> samples' parts
NIH_ENTRY = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # the 2020 revision first
NIH_LISTS = {"train_val_list.txt": None, "test_list.txt": "test"}
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
BRAX_CSV = ("master_spreadsheet_update.csv", "master_spreadsheet.csv")
UNCERTAIN = {"ignore": float("nan"), "zeros": 0.0, "ones": 1.0}  # the CheXpert paper's U-Ignore, U-Zeros, U-Ones
PADCHEST_TOP = 20  # PadChest's default probe labels: its most frequent findings (it has ~190)


def archive_csv(name, root, files, cols):
    """(file, rows) of the first of `files` (or its .gz) under an archive's root; a missing file or a renamed column
    is one line naming both."""
    for f in files:
        for p in (os.path.join(root, f), os.path.join(root, f) + ".gz"):
            if os.path.isfile(p):
                return p, data.read_csv(p, required=cols, hint=f"is {root} {name} as released, with its metadata "
                                                               f"unchanged?")
    raise UserError(f"{name} {root}: no {' or '.join(files)} (or .gz) in it: give the archive's root folder as "
                    f"released (the folder that holds its metadata)")


def _archive_source(name, records):
    """A data.Source of (path, subject, view) records whose image file exists; a row without a path (None) or whose
    file is not there is a counted skip."""
    kept = [r for r in records if r[0] and os.path.isfile(r[0])]
    no_path = sum(not r[0] for r in records)
    skipped = {why: n for why, n in (("row without an image path", no_path),
                                     ("image file missing", len(records) - len(kept) - no_path)) if n}
    if not kept:
        raise UserError(f"{name}: none of its {len(records)} listed images is on disk (is this the folder that holds "
                        f"the images as released?)")
    paths, subjects, views = (list(x) for x in zip(*kept))
    return data.Source(name, paths, views, subjects=subjects, skipped=skipped)


def _chexpert_path(root, p):
    """Path column -> file: rows start with the release's folder (CheXpert-v1.0/ or CheXpert-v1.0-small/), i.e. they
    are relative to the root's parent; dropping that part (not joining the parent) survives a renamed root folder."""
    parts = p.strip().split("/")
    return os.path.join(root, *(parts[1:] if parts[0].startswith("CheXpert") else parts))


def _chexpert_subject(p):
    m = re.search(r"patient\d+", p)
    return m.group(0) if m else p


def pretrain_chexpert(root):
    """CheXpert v1.0 (full or -small): train.csv and valid.csv, view from Frontal/Lateral."""
    rows = [r for f in CHEXPERT_FILES for r in archive_csv("chexpert", root, [f], ["Path", "Frontal/Lateral"])[1]]
    return _archive_source("chexpert", [(_chexpert_path(root, r["Path"]), _chexpert_subject(r["Path"]),
                                         r["Frontal/Lateral"]) for r in rows])


def _mimic_path(root, subject, study, dicom=None):
    """files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg; without a dicom_id the study's folder (its report: that + .txt)."""
    s = str(subject).strip()
    study_dir = os.path.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{str(study).strip()}")
    return os.path.join(study_dir, f"{dicom.strip()}.jpg") if dicom else study_dir


def pretrain_mimic(root):
    """MIMIC-CXR-JPG 2.0.0: every image of mimic-cxr-2.0.0-metadata.csv(.gz), view from ViewPosition (LL, XTABLE
    LATERAL are lateral; LPO, SWIMMERS, blank ... other)."""
    _, rows = archive_csv("mimic", root, [MIMIC_META], ["dicom_id", "subject_id", "study_id", "ViewPosition"])
    return _archive_source("mimic", [(_mimic_path(root, r["subject_id"], r["study_id"], r["dicom_id"]),
                                      r["subject_id"], r["ViewPosition"]) for r in rows])


def _nih_index(root):
    """Image Index -> file: the release unpacks to images_001/images/ ... images_012/images/ (names are unique)."""
    return {os.path.basename(f): f for f in glob.glob(os.path.join(root, "images*", "**", "*.png"), recursive=True)}


def pretrain_nih(root):
    """NIH ChestX-ray14: Data_Entry_2017_v2020.csv (or the original Data_Entry_2017.csv), 'View Position' (PA/AP)."""
    _, rows = archive_csv("nih", root, NIH_ENTRY, ["Image Index", "Patient ID", "View Position"])
    index = _nih_index(root)
    return _archive_source("nih", [(index.get(r["Image Index"].strip()), r["Patient ID"], r["View Position"])
                                   for r in rows])


def _padchest_path(root, r):
    d = r["ImageDir"].strip()  # an integer folder number (0-50, 54), written as 0 or 0.0
    try:
        return os.path.join(root, str(int(float(d))), r["ImageID"].strip()) if d else None
    except ValueError:
        raise UserError(f"padchest {root}: ImageDir {d!r} of {r['ImageID']} is not a folder number")


def pretrain_padchest(root):
    """PadChest: PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz), ImageDir/ImageID (16-bit PNG),
    'Projection' PA, AP, AP_horizontal frontal, L lateral, COSTAL, blank and anything else other."""
    _, rows = archive_csv("padchest", root, [PADCHEST_CSV], ["ImageID", "ImageDir", "PatientID", "Projection"])
    return _archive_source("padchest", [(_padchest_path(root, r), r["PatientID"], r["Projection"]) for r in rows])


def pretrain_brax(root):
    """BRAX 1.1.0: master_spreadsheet_update.csv, PngPath relative to the root, ViewPosition (PA, AP, AP LLD frontal;
    L, LL, RL lateral; RLO, LT-DECUB, blank other)."""
    _, rows = archive_csv("brax", root, BRAX_CSV, ["PngPath", "PatientID", "ViewPosition"])
    return _archive_source("brax", [(os.path.join(root, r["PngPath"].strip()) if r["PngPath"].strip() else None,
                                     r["PatientID"], r["ViewPosition"]) for r in rows])


PRETRAIN = {"chexpert": pretrain_chexpert, "mimic": pretrain_mimic, "nih": pretrain_nih,
            "padchest": pretrain_padchest, "brax": pretrain_brax}


def pretrain_sources(specs, exclude=()):
    """pretrain.py's and prepare.py's --data_dir (folders, CSVs, NAME=PATH archives) less the subjects of the
    --exclude_subjects files, so both build the same image list (and prepare.py's cache matches it)."""
    return data.exclude_subjects(data.parse_sources(specs, named=PRETRAIN), data.read_subject_ids(exclude or ()))


def add_source_args(p):
    """The data flags pretrain.py and prepare.py share."""
    p.add_argument("--data_dir", nargs="+", default=None, metavar="SOURCE",
                   help="image folders, CSV files (column `path`, optional `view`) or published archives as NAME=PATH "
                        f"({', '.join(PRETRAIN)}: read from their own metadata), each optionally :WEIGHT to set its "
                        "share of every epoch")
    p.add_argument("--exclude_subjects", nargs="+", default=None, metavar="FILE",
                   help="leave these subjects out (e.g. the evaluation sets' patients): text files of one id per "
                        "line, or CSVs with a subject_id / subject column (MIMIC's split file: its validate and test "
                        "rows)")


def archive_labels(row, cols, policy, where):
    """A CheXpert-style label row's sample fields: "where" (the row) and "labels" {column: 1 positive, 0 negative,
    blank not mentioned (negative, by the archives' convention), -1 uncertain -> UNCERTAIN[policy] (NaN for ignore:
    that label of that image is left out of the loss and of the metric)}."""
    labels = {}
    for c in cols:
        v = str(row[c]).strip()
        if v not in ("", *BINARY, "-1", "-1.0"):
            raise UserError(f"{where} {c!r}: label {row[c]!r} is not 1, 0, -1 or blank")
        labels[c] = UNCERTAIN[policy] if v.startswith("-") else float(v or 0)
    return {"where": where, "labels": labels}


def _wanted(args, available, default, where, release=None):
    """The probe's label columns: --label_cols (each must be one of `available`) or the dataset's default (each must
    be too: a column missing from the file `where` asks whether `release` is the archive as released)."""
    if not args.label_cols:
        missing = [c for c in default if c not in available]
        if missing:
            raise UserError(f"CSV {where} has no column {missing[0]!r}: is {release} as released?")
        return default
    wanted = [c.strip() for c in args.label_cols.split(",") if c.strip()]
    absent = [c for c in wanted if c not in available]
    if absent:
        raise UserError(f"--label_cols: {where} has no label {absent[0]!r} (it has: {', '.join(available)})")
    return wanted


def _policy_note(name, samples, policy):
    """Print and return how -1 was handled: the count per label, so a masked label's missing rows are visible."""
    masked = {c: sum(np.isnan(s["labels"][c]) for s in samples) for c in samples[0]["labels"]}
    what = {"ignore": "left out of the loss and the metric (NaN)", "zeros": "negative", "ones": "positive"}[policy]
    print(f"{name}: --uncertain {policy}: uncertain (-1) labels {what}; blank (not mentioned) negative"
          + (f"; unlabelled per label: {', '.join(f'{c} {n}' for c, n in masked.items() if n)}"
             if any(masked.values()) else ""))
    return f"uncertain -1: {policy}, blank: negative"


def load_chexpert(args):
    """CheXpert v1.0: train.csv (split by subject into train / validation) and valid.csv as the test set (its labels
    are radiologists' consensus, 0/1 only); the 14 observations (--label_cols a subset); --uncertain for -1."""
    root, out = args.data_dir, []
    for f, part in zip(CHEXPERT_FILES, (None, "test")):
        path, rows = archive_csv("chexpert", root, [f], ["Path"])
        cols = _wanted(args, [c for c in rows[0] if c in CHEXPERT_14], CHEXPERT_14, path, f"{root} CheXpert")
        out += [{"path": _chexpert_path(root, r["Path"]), "subject": _chexpert_subject(r["Path"]), "part": part,
                 **archive_labels(r, cols, args.uncertain, f"{path} row {i + 2}")} for i, r in enumerate(rows)]
    return out, f"CheXpert {root} (train.csv; valid.csv as test; {_policy_note('CheXpert', out, args.uncertain)})"


def load_mimic_cxr(args):
    """MIMIC-CXR-JPG 2.0.0 with its labels: mimic-cxr-2.0.0-{chexpert,negbio}.csv.gz (--mimic_labeler; one row per
    study) joined to every image of the metadata on (subject_id, study_id); the official split (train, validate,
    test). Images of a study without a label row are dropped and counted."""
    root, labeler = args.data_dir, args.mimic_labeler
    f, lab_rows = archive_csv("mimic_cxr", root, [f"mimic-cxr-2.0.0-{labeler}.csv"], ["subject_id", "study_id"])
    cols = _wanted(args, [c for c in CHEXPERT_14 if c in lab_rows[0]], CHEXPERT_14, f, f"{root} MIMIC-CXR-JPG")
    labels = {(r["subject_id"].strip(), r["study_id"].strip()): (i, r) for i, r in enumerate(lab_rows)}
    _, split = archive_csv("mimic_cxr", root, [MIMIC_SPLIT], ["dicom_id", "split"])
    bad = [r["split"] for r in split if r["split"].strip() not in MIMIC_PARTS]
    if bad:
        raise UserError(f"{MIMIC_SPLIT}: split {bad[0]!r} is not one of {', '.join(MIMIC_PARTS)}")
    part_of = {r["dicom_id"].strip(): MIMIC_PARTS[r["split"].strip()] for r in split}
    _, meta = archive_csv("mimic_cxr", root, [MIMIC_META], ["dicom_id", "subject_id", "study_id"])
    out, unlabelled = [], 0
    for m in meta:
        key, dicom = (m["subject_id"].strip(), m["study_id"].strip()), m["dicom_id"].strip()
        if key not in labels or dicom not in part_of:
            unlabelled += 1
            continue
        i, r = labels[key]
        out.append({"path": _mimic_path(root, *key, dicom), "subject": key[0], "part": part_of[dicom],
                    **archive_labels(r, cols, args.uncertain, f"{f} row {i + 2}")})
    if not out:
        raise UserError(f"{root}: no MIMIC-CXR image has a label row in {f} and a split in {MIMIC_SPLIT}")
    if unlabelled:
        print(f"MIMIC-CXR: {unlabelled} image(s) without a {labeler} label row or a split row dropped")
    note = _policy_note("MIMIC-CXR", out, args.uncertain)
    return out, f"MIMIC-CXR-JPG {root} ({labeler} labels, official split; {note})"


def load_nih(args):
    """NIH ChestX-ray14: Data_Entry_2017_v2020.csv 'Finding Labels' (pipe-separated; 'No Finding' = none of the 14),
    the official test_list.txt as the test set and train_val_list.txt split by patient; images found under
    images_NNN/images/. Images in neither list are dropped and counted."""
    root = args.data_dir
    f, rows = archive_csv("nih", root, NIH_ENTRY, ["Image Index", "Patient ID", "Finding Labels"])
    part_of = {}
    for name, part in NIH_LISTS.items():
        p = os.path.join(root, name)
        if not os.path.isfile(p):
            raise UserError(f"nih {root}: no {name} (the official split list, one Image Index per line)")
        with open(p) as fh:
            part_of.update({ln.strip(): part for ln in fh if ln.strip()})
    cols = _wanted(args, NIH_14, NIH_14, f)
    index, out, unlisted = _nih_index(root), [], 0
    for i, r in enumerate(rows):
        name = r["Image Index"].strip()
        if name not in part_of:
            unlisted += 1
            continue
        found = {x.strip() for x in r["Finding Labels"].split("|")} - {"No Finding", ""}
        if found - set(NIH_14):
            raise UserError(f"{f} row {i + 2}: unknown finding {sorted(found - set(NIH_14))[0]!r} (NIH's 14: "
                            f"{', '.join(NIH_14)}, or No Finding)")
        out.append({"path": index.get(name, os.path.join(root, "images", name)), "subject": r["Patient ID"].strip(),
                    "part": part_of[name], "labels": {c: float(c in found) for c in cols}})
    if unlisted:
        print(f"NIH ChestX-ray14: {unlisted} image(s) in neither train_val_list.txt nor test_list.txt dropped")
    return out, f"NIH ChestX-ray14 {root} (official test_list.txt)"


def load_padchest(args):
    """PadChest: the 'Labels' column (a Python list literal, e.g. ['pleural effusion', 'cardiomegaly']; items
    stripped, as some carry a leading space), one 0/1 column per label: --label_cols, else its PADCHEST_TOP most
    frequent labels (meta-labels 'exclude' and 'suboptimal study' left out). No official split: part None (probe.py
    cross-validates by patient). Rows with blank or unreadable Labels, and images the release lacks, are dropped
    and counted."""
    root = args.data_dir
    f, rows = archive_csv("padchest", root, [PADCHEST_CSV], ["ImageID", "ImageDir", "PatientID", "Labels"])
    parsed, dropped = [], 0
    for r in rows:
        try:
            items = ast.literal_eval(r["Labels"].strip())
            assert isinstance(items, (list, tuple))
        except (ValueError, SyntaxError, AssertionError):
            dropped += 1  # ~100 rows of the release have no labels (NaN)
            continue
        parsed.append((r, {str(x).strip() for x in items} - {""}))
    counts = collections.Counter(x for _, found in parsed for x in found if x not in ("exclude", "suboptimal study"))
    default = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:PADCHEST_TOP]]
    cols = _wanted(args, sorted(counts), default, f)
    out = [{"path": _padchest_path(root, r), "subject": r["PatientID"].strip(), "part": None,
            "labels": {c: float(c in found) for c in cols}} for r, found in parsed]
    kept = [s for s in out if s["path"] and os.path.isfile(s["path"])]  # the release misses ~30 of its images
    if dropped or len(kept) < len(out):
        print(f"PadChest: {dropped} row(s) with blank or unreadable Labels and {len(out) - len(kept)} listed image(s) "
              f"not on disk dropped")
    print(f"PadChest labels: {', '.join(cols)}")
    return kept, f"PadChest {root}"


# ----------------------------------------------------------------------------------------------------------------
# segmentation (segment.py)

def load_vindr_rib(args):
    """VinDr-RibCXR: every *<split>*.json under root (Annotations/train/Vindr_RibCXR_train_mask.json,
    .../val/...), each in pandas' column layout: {"img": {"0": "data/train/img/VinDr_RibCXR_train_000.png"},
    "R1": {"0": [{"x": .., "y": ..}, ...]}, ..., "L10": {...}}; paths relative to root. The official split: train
    is split into train + validation by segment.py, val is the test set (with a test JSON too: val = validation)."""
    root, found = args.data_dir, {}
    for f in sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True)):
        name = os.path.basename(f).lower()
        split = next((s for s in ("train", "val", "test") if s in name), None)
        if split is None:
            continue
        j = data.read_json(f)
        if "img" not in j:
            raise UserError(f"{f}: no 'img' key; is this a VinDr-RibCXR annotation JSON?")
        for k, rel in j["img"].items():
            cands = [os.path.join(root, rel), os.path.join(root, rel[:1].swapcase() + rel[1:])]
            found.setdefault(split, []).append({"path": next((c for c in cands if os.path.exists(c)), cands[0]),
                                                "subject": os.path.splitext(os.path.basename(rel))[0],
                                                "polys": {r: j.get(r, {}).get(k) for r in RIBS}})
    if "train" not in found or not ({"val", "test"} & set(found)):
        raise UserError(f"--data_dir {root}: expected VinDr-RibCXR JSONs for train and val (e.g. "
                        f"Annotations/train/Vindr_RibCXR_train_mask.json); found splits {sorted(found) or 'none'}")
    part_of = {"train": None, "val": "val", "test": "test"} if "test" in found else {"train": None, "val": "test"}
    out = [{**s, "part": part_of[k]} for k, v in found.items() for s in v]
    return out, f"VinDr-RibCXR {root} (official split)"


def load_mimic_lungs(args):
    """PhysioNet's lung-segment-mimic-cxr (Chen et al. 2022): 1,141 frontal MIMIC-CXR images, each stored as two
    segmented images (the lungs, and the rest) named by the MIMIC dicom_id with 'lung' or 'rest' in the file name,
    in any folders under --data_dir. Mask: the lung image's non-black part; X-ray: the two images summed (they
    partition it), or the MIMIC-CXR-JPG original when --image_root holds <dicom_id>.jpg. Subject: MIMIC's
    p<subject> in the path, else the dicom_id. No official split: part None (segment.py splits by subject)."""
    root, pairs = args.data_dir, {}
    for f in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        stem, ext = os.path.splitext(os.path.basename(f))
        kind = "lung" if "lung" in stem.lower() else "rest" if "rest" in stem.lower() else None
        if kind and ext.lower() in data.IMAGE_EXTS:
            key = re.sub(r"[_\-. ]*(lungs?|rest)[_\-. ]*", "", stem, flags=re.I) or stem
            pairs.setdefault((os.path.dirname(f), key), {})[kind] = f
    jpgs = glob.glob(os.path.join(args.image_root, "**", "*.jpg"), recursive=True) if args.image_root else []
    originals = {os.path.splitext(os.path.basename(f))[0]: f for f in jpgs}
    out, unpaired = [], 0
    for (folder, key), files in sorted(pairs.items()):
        if "lung" not in files:
            unpaired += 1
            continue
        m = re.search(r"p(\d{8})", folder)
        s = {"path": originals.get(key) or files["lung"], "subject": m.group(1) if m else key, "part": None,
             "mask": files["lung"], "mask_rule": "nonzero"}
        if key not in originals:
            s["compose"] = [files["lung"], files.get("rest")]  # the X-ray = lungs + the rest
        out.append(s)
    if not out:
        raise UserError(f"--data_dir {root}: no lung-segment-mimic-cxr image pairs (files named <dicom_id>_lung.png "
                        f"and <dicom_id>_rest.png, or similar)")
    note = f", {unpaired} 'rest' image(s) without a lung image skipped" if unpaired else ""
    print(f"lung-segment-mimic-cxr: {len(out)} images{note}")
    return out, f"lung-segment-mimic-cxr {root}"


def load_boxes(path, scale=1.0):
    """Zone boxes per image key (file stem): {key: {zone: (x1, y1, x2, y2)}} from a folder of Chest ImaGenome
    scene-graph JSONs (original_* = pixels of the original image) or a CSV path,zone,x1,y1,x2,y2."""
    out = {}
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
        if not files:
            raise UserError(f"--boxes {path}: no .json scene graphs in it")
        for f in files:
            g = data.read_json(f)
            key = str(g.get("image_id") or os.path.basename(f).replace("_SceneGraph.json", "").replace(".json", ""))
            for o in g.get("objects", []):
                if o.get("bbox_name") in ZONES:
                    out.setdefault(key, {})[o["bbox_name"]] = tuple(scale * float(o[f"original_{c}"]) for c in XYXY)
    else:
        for r in data.read_csv(path, required=("path", "zone", *XYXY)):
            zone = r["zone"].strip().replace("_", " ").lower()
            if zone not in ZONES:
                raise UserError(f"--boxes {path}: zone {r['zone']!r} is not one of {', '.join(ZONES)}")
            key = os.path.splitext(os.path.basename(r["path"]))[0]
            out.setdefault(key, {})[zone] = tuple(scale * float(r[c]) for c in XYXY)
    return out


# ----------------------------------------------------------------------------------------------------------------
# report generation (report.py)

SECTION = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)]):", re.M)


def report_sections(text):
    """{"findings": ..., "impression": ...} of a MIMIC-CXR free-text report (whichever it has). Headers are
    upper-case words ending in ':' at a line start, named as in MIT-LCP's section_parser: 'conclusion' and any name
    with 'impression' count as impression, any other with 'finding' as findings. Whitespace is collapsed; the first
    non-empty section of a kind wins (some reports have an empty FINDINGS header and a second one with the text)."""
    heads = list(SECTION.finditer(text))
    found = {}
    for h, nxt in zip(heads, heads[1:] + [None]):
        name = h.group(1).lower().strip()
        if name in ("findings and impression", "findings/impression", "conclusion") or "impression" in name:
            name = "impression"
        elif "finding" in name:
            name = "findings"
        body = " ".join(text[h.end():nxt.start() if nxt else len(text)].split())
        if body and name in ("findings", "impression"):
            found.setdefault(name, body)
    return found


def extract_findings(text):
    """The FINDINGS section of a MIMIC-CXR report, else its IMPRESSION, else None (--mimic_rule study)."""
    found = report_sections(text)
    return found.get("findings") or found.get("impression")


def load_mimic(args):
    """MIMIC-CXR-JPG with the official split (train / validate / test). --mimic_rule paper (default): every frontal
    image (ViewPosition PA or AP) whose report has a non-empty Findings section, as the paper states it (146,909 /
    7,250 / 2,461 image-report pairs); --mimic_rule study: one frontal image per study (PA preferred) with its
    Findings, else its Impression. The counts kept and dropped per split are printed."""
    root, rule = args.data_dir, args.mimic_rule
    rep_root = args.reports_dir or root
    _, split_rows = archive_csv("mimic", root, [MIMIC_SPLIT], ["dicom_id", "subject_id", "split"])
    split = {r["dicom_id"]: r for r in split_rows}
    frontal = {}  # study -> [(rank of view, dicom_id)] of its frontal images
    for m in archive_csv("mimic", root, [MIMIC_META], ["dicom_id", "study_id", "ViewPosition"])[1]:
        view = (m.get("ViewPosition") or "").upper()
        if view in ("PA", "AP") and m["dicom_id"] in split:
            frontal.setdefault(m["study_id"], []).append((0 if view == "PA" else 1, m["dicom_id"]))
    parts = {"train": "train", "validate": "val", "test": "test"}
    out, sections = [], {}
    dropped = {k: {"no report": 0, "no findings": 0} for k in ("train", "val", "test")}
    for study, views in sorted(frontal.items()):
        for _, dicom in (sorted(views) if rule == "paper" else [min(views)]):
            r = split[dicom]
            s, part = str(r["subject_id"]), parts[r["split"]]
            if study not in sections:
                txt = _mimic_path(rep_root, s, study) + ".txt"
                sections[study] = report_sections(open(txt).read()) if os.path.exists(txt) else None
            sec = sections[study]
            text = sec and (sec.get("findings") if rule == "paper" else sec.get("findings") or sec.get("impression"))
            if not text:
                dropped[part]["no report" if sec is None else "no findings"] += 1
                continue
            out.append({"path": _mimic_path(root, s, study, dicom), "subject": s, "text": text, "part": part})
    if not out:
        raise UserError(f"no MIMIC-CXR frontal image with a report under {rep_root}/files: set --reports_dir")
    what = "frontal images" if rule == "paper" else "studies (one frontal image each)"
    print(f"MIMIC-CXR --mimic_rule {rule}: " + "; ".join(
        f"{k} {sum(s['part'] == k for s in out)} {what} kept, {d['no findings']} without "
        f"{'findings' if rule == 'paper' else 'findings/impression'}, {d['no report']} without a report file"
        for k, d in dropped.items()))
    return out, f"MIMIC-CXR (--mimic_rule {rule})"


def load_iu_xray(args):
    """IU-Xray in R2Gen's layout: annotation.json {"train"|"val"|"test": [{"id", "report", "image_path": [...]}]},
    images under DATA_DIR/images; the first (frontal) image of each study; blank reports dropped and counted;
    reports lower-cased as R2Gen and the papers scoring on it do. --iu_split test (default): every study is test
    data (the paper's out-of-distribution test); --iu_split r2gen keeps R2Gen's train / val / test."""
    ann = os.path.join(args.data_dir, "annotation.json")
    if not os.path.exists(ann):
        raise UserError(f"{ann} not found: --data_dir must hold R2Gen's annotation.json and images/")
    a, img_root = data.read_json(ann), args.image_root or os.path.join(args.data_dir, "images")
    out, blank, iu_split = [], 0, args.iu_split
    for part in ("train", "val", "test"):
        for e in a.get(part, []):
            if not (e.get("report") or "").strip():
                blank += 1
                continue
            out.append({"path": os.path.join(img_root, e["image_path"][0]), "subject": str(e["id"]),
                        "text": " ".join(e["report"].split()).lower(), "part": "test" if iu_split == "test" else part})
    return out, f"IU-Xray (R2Gen annotation.json, --iu_split {iu_split}, lower-cased; {blank} blank report(s) dropped)"


def load_llava_rad(args):
    """LLaVA-Rad's MIMIC-CXR test set (PhysioNet llava-rad-mimic-cxr-annotation 1.0.0,
    chat_test_MIMIC_CXR_all_gpt4extract_rulebased_v1.json, given as --annotations): a JSON list of
    {"id", "image" (relative to MIMIC-CXR-JPG's files/, maybe prefixed "mimic/"), "conversations": [{"from": "human",
    ...}, {"from": "gpt", "value": findings}], "view", "reason", "generate_method"}, kept as LLaVA-Rad's
    mimic_test_findings loader keeps it: generate_method "rule-based", findings a string, view AP or PA (2,461 in the
    paper). Images under --data_dir (MIMIC-CXR-JPG 2.0.0, or its files/ folder). Every entry is test data."""
    path = getattr(args, "annotations", None)
    if not path:
        raise UserError("--dataset llava_rad needs --annotations FILE (chat_test_MIMIC_CXR_all_gpt4extract_rulebased_"
                        "v1.json from PhysioNet's llava-rad-mimic-cxr-annotation)")
    rows = data.read_json(path)
    files = os.path.join(args.data_dir, "files")
    files = files if os.path.isdir(files) else args.data_dir
    if not isinstance(rows, list):
        raise UserError(f"{path}: not LLaVA-Rad's annotation layout (a JSON list of entries)")
    out, dropped = [], {"not rule-based": 0, "no findings": 0, "not AP/PA": 0}
    for i, d in enumerate(rows):
        conv = d.get("conversations") if isinstance(d, dict) else None
        if not (isinstance(conv, list) and len(conv) >= 2 and isinstance(conv[1], dict) and isinstance(
                d.get("image"), str) and all(k in d for k in ("view", "generate_method"))):
            raise UserError(f"{path}: entry {i} is not in LLaVA-Rad's layout (needs image, conversations [human, "
                            f"gpt], view, generate_method)")
        text = conv[1].get("value")
        why = ("not rule-based" if d["generate_method"] != "rule-based" else
               "no findings" if not isinstance(text, str) else "not AP/PA" if d["view"] not in ("AP", "PA") else None)
        if why:
            dropped[why] += 1
            continue
        image = d["image"][len("mimic/"):] if d["image"].startswith("mimic/") else d["image"]
        m = re.search(r"(?:^|/)p(\d+)/s\d+/", image)
        out.append({"path": os.path.join(files, image), "subject": m.group(1) if m else str(d.get("id", i)),
                    "text": text, "part": "test"})
    note = ", ".join(f"{v} {k}" for k, v in dropped.items())
    if not out:
        raise UserError(f"{path}: no entry left after LLaVA-Rad's test filter ({note})")
    print(f"LLaVA-Rad MIMIC-CXR test: {len(out)} frontal images with rule-based findings kept ({note} dropped)")
    return out, f"LLaVA-Rad MIMIC-CXR test annotations {path} ({len(out)} kept; {note} dropped)"


LAYOUTS = {"vindr": load_vindr, "rsna": load_rsna, "chexpert": load_chexpert, "mimic_cxr": load_mimic_cxr,
           "nih": load_nih, "padchest": load_padchest, "vindr_rib": load_vindr_rib, "mimic_lungs": load_mimic_lungs,
           "mimic": load_mimic, "iu_xray": load_iu_xray, "llava_rad": load_llava_rad}
