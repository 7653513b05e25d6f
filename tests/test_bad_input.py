"""Bad input to the three evaluations gets one clear line (exit 2) or an explicit, counted decision: label columns
that are not 0/1, a one-class column, images changed under the feature cache, a corrupt cache, impossible flags,
blank reports. Also the same-architecture random baseline (--baseline random)."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

import base
import downstream
import probe
import report
import segment
from base import UserError
from conftest import SAMPLE
from encoders import load_encoder, save_encoder
from model import VisionTransformer, build_vit

KERMANY = SAMPLE / "kermany" / "labels.csv"
TINY = ["--model", "vit_tiny", "--img_size", "56", "--num_workers", "0", "--epochs", "2",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no out/pretrain/encoder.safetensors here: no --encoder means random init
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kermany_csv(tmp_path, n=16, edit=None, images=None):
    """n bundled Kermany rows with absolute (or copied) image paths; edit(i, row) may change a row."""
    rows = list(csv.DictReader(open(KERMANY)))
    rows = [r for r in rows if r["pneumonia"] == "1"][:n // 2] + [r for r in rows if r["pneumonia"] == "0"][:n // 2]
    out = tmp_path / "t.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for i, r in enumerate(rows):
            src = SAMPLE / "kermany" / r["path"]
            if images is not None:  # private copies, so a test may rewrite them
                images.mkdir(exist_ok=True)
                shutil.copy(src, images / f"{i}.jpeg")
                src = images / f"{i}.jpeg"
            r = {**r, "path": str(src)}
            w.writerow(edit(i, r) if edit else r)
    return out


def one_line_error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        base.run(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------------------------------------------
# label columns

@pytest.mark.parametrize("bad", ["", "-1", "NaN", "yes"])
def test_a_label_that_is_not_0_or_1_is_refused(tmp_path, capsys, bad):
    f = kermany_csv(tmp_path, edit=lambda i, r: {**r, "pneumonia": bad} if i == 3 else r)
    err = one_line_error(probe.main, TINY + ["--csv", str(f), "--subject_col", "patient", "--label_cols",
                                             "pneumonia", "--out_dir", str(tmp_path / "o")], capsys)
    assert f"row 5: label {bad!r} is not 0 or 1" in err and "--task multiclass" in err
    # several columns (multi-label): the same check, here on the column of class names
    with pytest.raises(UserError, match="label 'bacterial' is not 0 or 1"):
        probe.load_table(probe.get_args(["--csv", str(kermany_csv(tmp_path)), "--subject_col", "patient",
                                         "--label_cols", "pneumonia,label"]))
    with pytest.raises(UserError, match="names a column twice"):
        probe.load_table(probe.get_args(["--csv", str(f), "--label_cols", "pneumonia,pneumonia"]))


def test_class_names_only_with_multiclass_and_never_blank(tmp_path):
    args = ["--csv", str(kermany_csv(tmp_path)), "--subject_col", "patient", "--label_cols", "label"]
    with pytest.raises(UserError, match="pass --task multiclass"):
        probe.load_table(probe.get_args(args))
    table = probe.load_table(probe.get_args(args + ["--task", "multiclass"]))
    assert table.task == "multiclass" and table.classes == ["bacterial", "normal"]  # the rows kermany_csv picks
    blank = kermany_csv(tmp_path, edit=lambda i, r: {**r, "label": ""} if i == 0 else r)
    with pytest.raises(UserError, match="blank / NaN label"):
        probe.load_table(probe.get_args(args[:1] + [str(blank)] + args[2:] + ["--task", "multiclass"]))


def test_a_one_class_column_warns(tmp_path, capsys):
    f = kermany_csv(tmp_path, edit=lambda i, r: {**r, "pneumonia": "1"})
    probe.load_table(probe.get_args(["--csv", str(f), "--subject_col", "patient", "--label_cols", "pneumonia"]))
    assert "warning: label 'pneumonia' is 1 for all 16 images" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# the feature cache

def test_feature_cache_follows_the_file_content_and_survives_corruption(tmp_path, capsys):
    f = kermany_csv(tmp_path, images=tmp_path / "img")
    argv = TINY + ["--csv", str(f), "--subject_col", "patient", "--label_cols", "pneumonia", "--folds", "2",
                   "--out_dir", str(tmp_path / "o")]
    probe.main(argv)
    first = sorted((tmp_path / "o" / "features").glob("*.pt"))
    probe.main(argv)
    assert "features: reusing" in capsys.readouterr().out
    # an image rewritten in place (another X-ray under the same name): new key, embeddings recomputed
    shutil.copy(tmp_path / "img" / "9.jpeg", tmp_path / "img" / "2.jpeg")
    os.utime(tmp_path / "img" / "2.jpeg", ns=(1, 1))
    probe.main(argv)
    assert "reusing" not in capsys.readouterr().out
    files = sorted((tmp_path / "o" / "features").glob("*.pt"))
    assert len(files) == 2 and files != first
    new = next(p for p in files if p not in first)
    a, b = (torch.load(p, weights_only=True)["feats"] for p in (first[0], new))
    assert torch.allclose(a[9], b[9]) and not torch.allclose(a[2], b[2]) and torch.allclose(b[2], b[9])
    # a corrupt cache file: a warning and a recomputation, not a traceback
    new.write_bytes(b"truncated")
    res = probe.main(argv)
    out = capsys.readouterr().out
    assert "is unreadable" in out and "recomputing" in out and np.isfinite(res["agg"]["auroc"]["mean"])
    assert torch.allclose(torch.load(new, weights_only=True)["feats"], b, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# impossible flags, in every script

@pytest.mark.parametrize("flags,msg", [(["--model", "bogus"], "--model 'bogus' unknown"),
                                       (["--batch_size", "0"], "--batch_size 0: must be a whole number >= 1"),
                                       (["--lr", "-0.1"], "--lr -0.1: must be a finite number > 0"),
                                       (["--epochs", "0"], "--epochs 0: must be a whole number >= 1")])
@pytest.mark.parametrize("script", [probe, segment, report])
def test_impossible_flags_are_one_line(script, flags, msg, capsys, tmp_path):
    err = one_line_error(script.main, flags + ["--out_dir", str(tmp_path / "o")], capsys)
    assert msg in err
    assert not (tmp_path / "o" / "results.json").exists()  # nothing written for a run that cannot be right


def test_blank_reports_are_dropped_and_counted(tmp_path, capsys):
    rows = list(csv.DictReader(open(SAMPLE / "reports" / "reports.csv")))
    with open(tmp_path / "r.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**r, "path": str(SAMPLE / "reports" / r["path"]), "text": "  " if i % 10 == 0 else r["text"]})
    parts, source = report.load_samples(report.get_args(["--csv", str(tmp_path / "r.csv"), "--subject_col",
                                                         "patientid"]))
    n_blank = len(range(0, len(rows), 10))
    assert f"warning: {n_blank} row(s) with a blank 'text' dropped" in capsys.readouterr().out
    assert sum(len(v) for v in parts.values()) == len(rows) - n_blank and f"{n_blank} row(s)" in source


# ----------------------------------------------------------------------------------------------------------------
# the baseline: a random encoder of the same architecture

def test_random_like_has_the_architecture_and_preprocessing_but_not_the_weights(tmp_path):
    torch.manual_seed(3)
    vit = build_vit("vit_tiny", img_size=56, patch_size=14, in_chans=1)
    with torch.no_grad():
        vit.pos_embed.add_(1.0)  # unlike any init
    save_encoder(vit, str(tmp_path / "e.safetensors"), mean=[0.3], std=[0.2])
    loaded, info = load_encoder(str(tmp_path / "e.safetensors"))
    rand, rinfo = downstream.random_like(loaded, info)
    assert rand.config == loaded.config and rinfo.format == "random-init"
    assert (rinfo.img_size, rinfo.mean, rinfo.std) == (info.img_size, info.mean, info.std)
    sa, sb = loaded.state_dict(), rand.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    assert not torch.allclose(sa["blocks.0.attn.qkv.weight"], sb["blocks.0.attn.qkv.weight"])
    assert all(not p.requires_grad for p in rand.parameters())


def test_probe_baseline_random_compares_against_the_same_architecture(tmp_path):
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=56, patch_size=14, embed_dim=384, depth=2, num_heads=6)  # not TINY's vit_tiny
    save_encoder(vit, str(tmp_path / "e.safetensors"))
    f = kermany_csv(tmp_path, n=48)  # enough test images per fold for pooled and per-fold AUROC to agree roughly
    res = probe.main(TINY + ["--csv", str(f), "--subject_col", "patient", "--label_cols", "pneumonia", "--folds", "2",
                             "--encoder", str(tmp_path / "e.safetensors"), "--baseline", "random", "--n_boot", "50",
                             "--out_dir", str(tmp_path / "o")])
    base = json.loads((tmp_path / "o" / "baseline_random" / "results.json").read_text())
    assert base["encoder"].startswith("random-init of the architecture of") and base["feature_dim"] == 384
    assert res["feature_dim"] == 384
    cmp = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert cmp["b"].endswith("predictions.csv") and "baseline_random" in cmp["b"]
    assert 0 < cmp["metrics"]["auroc"]["Agg."]["p_one_tailed"] <= 1
    assert res["baseline"]["metrics"]["auroc"]["Agg."]["a"] == pytest.approx(res["agg"]["auroc"]["mean"], abs=0.2)


# ----------------------------------------------------------------------------------------------------------------
# subjects and repeated rows: what would leak one patient into two parts, or count an image twice

def test_subject_column_must_exist_unless_none_is_asked_for(tmp_path, capsys):
    f = kermany_csv(tmp_path)
    base_args = ["--csv", str(f), "--label_cols", "pneumonia"]
    with pytest.raises(UserError, match="no subject column 'patient_id'.*--subject_col none"):
        probe.load_table(probe.get_args(base_args + ["--subject_col", "patient_id"]))  # mistyped: it is 'patient'
    with pytest.raises(UserError, match=r"no subject column 'subject' \(the default\)"):
        probe.load_table(probe.get_args(base_args))  # the default name, absent from this CSV
    own = probe.load_table(probe.get_args(base_args + ["--subject_col", "none"]))  # on purpose: image = subject
    assert len(set(own.subjects)) == len(own.paths) == 16
    named = probe.load_table(probe.get_args(base_args + ["--subject_col", "patient"]))
    patients = [r["patient"] for r in csv.DictReader(open(f))]
    assert list(named.subjects) == patients and not set(own.subjects) & set(patients)


def test_repeated_rows_are_counted_and_dropped_conflicting_ones_refused(tmp_path, capsys):
    f = kermany_csv(tmp_path)
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines + lines[1:4]) + "\n")  # three rows listed twice, the same values
    t = probe.load_table(probe.get_args(["--csv", str(f), "--subject_col", "patient", "--label_cols", "pneumonia"]))
    assert len(t.paths) == 16 and "3 repeated row(s) dropped" in capsys.readouterr().out
    flipped = lines[1].replace(",1,", ",0,") if ",1," in lines[1] else lines[1].replace(",0,", ",1,")
    assert flipped != lines[1]
    f.write_text("\n".join(lines + [flipped]) + "\n")  # the same image with another label
    with pytest.raises(UserError, match="rows 2 and 18 list the image .* with different values"):
        probe.load_table(probe.get_args(["--csv", str(f), "--subject_col", "patient", "--label_cols", "pneumonia"]))
