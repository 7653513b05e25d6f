"""segment.py and the segmentation decoders in model.py, on the bundled real X-rays and lung masks."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage

import base
import archives
import seglabels
import segment
from conftest import SAMPLE
from model import LinearDecoder, UPerNet, count_params

LUNGSEG = SAMPLE / "lungseg"
MASKS = sorted((LUNGSEG / "masks").glob("*.png"))


def lungs(path):
    return seglabels.lungs_label(seglabels.read_mask(path))


# ---------------------------------------------------------------------------------------------------------------
# Dice

def numpy_dice(pred, truth, c):
    """Direct float64 computation: 2|P & T| / (|P| + |T|) over the pixels whose truth is not 'ignore'."""
    valid = truth != 255
    p = (pred == c) & valid
    t = (truth == c) & valid
    return 2.0 * np.sum(p & t, dtype=np.float64) / (np.sum(p, dtype=np.float64) + np.sum(t, dtype=np.float64))


def test_dice_matches_direct_computation_on_real_masks():
    path = LUNGSEG / "masks" / "1880e301.png"  # the sample with an annotated 'ignore' region
    truth = lungs(path)
    assert (truth == 255).sum() > 500
    rng = np.random.default_rng(0)
    pred = np.roll(truth, (7, -5), axis=(0, 1)).copy()   # a shifted prediction: partial overlap
    pred[pred == 255] = 0
    pred[rng.random(pred.shape) < 0.05] = 1              # scattered false positives
    pred[truth == 255] = 2                               # predictions inside 'ignore' must not count
    got = segment.dice_per_class(torch.from_numpy(pred), torch.from_numpy(truth), 2)
    want = [numpy_dice(pred, truth, 1), numpy_dice(pred, truth, 2)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert 0.3 < want[0] < 0.95 and 0.3 < want[1] < 0.95
    # a class absent from both truth and prediction is undefined (NaN), not a free 1.0 or a penalising 0
    empty = segment.dice_per_class(torch.zeros(5, 5, dtype=torch.long), torch.zeros(5, 5, dtype=torch.long), 1)
    assert np.isnan(empty).all()


# ---------------------------------------------------------------------------------------------------------------
# left / right

def test_right_lung_is_on_the_image_left_in_every_sample():
    for path in MASKS:
        lab = lungs(path)
        W = lab.shape[1]
        xs1, xs2 = np.nonzero(lab == 1)[1], np.nonzero(lab == 2)[1]
        assert len(xs1) > 1000 and len(xs2) > 1000, path.name
        # radiological convention: patient's right lung (class 1 'right_lung') on the image's left half
        assert xs1.mean() < W / 2 < xs2.mean(), path.name
        # each lung is one whole component: a retrocardiac left lung reaching past the midline is not cut
        comps, n = ndimage.label(lab == 1)
        assert n == 1 or np.bincount(comps.ravel())[2:].max() < 50, path.name
    assert segment.TASKS["lungs"][0] == ["right_lung", "left_lung"]


def test_touching_lungs_are_cut_between_them():
    lab = lungs(LUNGSEG / "masks" / "1052b0fe.png")
    mask = np.where(lab == 1, 255, 0).astype(np.uint8) | np.where(lab == 2, 255, 0).astype(np.uint8)
    rows = np.nonzero((lab == 1).any(1) & (lab == 2).any(1))[0]
    r = rows[len(rows) // 2]  # a 3-px bridge of 'lung' across the mediastinum joins the two lungs into one
    xs1, xs2 = np.nonzero(lab[r] == 1)[0], np.nonzero(lab[r] == 2)[0]
    mask[r - 1:r + 2, xs1.max():xs2.min() + 1] = 255
    assert ndimage.label(mask > 0)[1] == 1
    got = seglabels.lungs_label(mask)
    keep = np.ones(mask.shape, bool)
    keep[r - 1:r + 2] = False
    assert (got[keep] == lab[keep]).mean() > 0.999


def test_left_right_survives_the_full_training_pipeline():
    args = segment.get_args([])
    assert args.task == "lungs" and args.use_flip is False  # flips never for a task with laterality
    with pytest.raises(base.UserError):
        segment.get_args(["--flip", "on"])
    for task in ("zones", "ribs"):
        assert segment.TASKS[task][1], task
    samples = [{"path": str(LUNGSEG / "images" / p.name), "mask": str(p), "subject": p.stem} for p in MASKS[:8]]
    ds = segment.SegDataset(samples, "lungs", 112)
    x, y = segment.collate([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)
    for _ in range(5):
        xa, ya = segment.augment(x, y, args.use_flip)
        assert xa.shape == x.shape and set(torch.unique(ya).tolist()) <= {0, 1, 2, 255}
        cols = torch.arange(112).float() + 0.5
        for b in range(len(ya)):
            m1, m2 = (ya[b] == 1).float(), (ya[b] == 2).float()
            c1, c2 = (m1.sum(0) * cols).sum() / m1.sum(), (m2.sum(0) * cols).sum() / m2.sum()
            assert c1 < 56 < c2
    # the same pipeline with flips (task 'lung' has no sides) does mirror some images: the check above can fail
    torch.manual_seed(0)
    assert segment.get_args(["--task", "lung"]).use_flip
    _, yf = segment.augment(x, y, True)
    mirrored = [((yf[b] == 1).float().sum(0) * cols).sum() / (yf[b] == 1).sum() > 56 for b in range(len(yf))]
    assert any(mirrored) and not all(mirrored)


# ---------------------------------------------------------------------------------------------------------------
# parameter counts (paper Table 4: UPerNet 39.3M for ViT-B; linear: 769 per class at 768-d)

def test_decoder_parameter_counts():
    D, C = 768, 512
    conv_bn = lambda cin, cout, k: cin * cout * k * k + 2 * cout   # ConvModule: conv without bias + BN affine
    pyramid = 3 * (D * D * 4 + D) + 2 * D                           # 3 ConvTranspose2d(2x2) + 1 BN
    head = (4 * conv_bn(D, C, 1) + conv_bn(D + 4 * C, C, 3)       # PPM (1, 2, 3, 6) + its bottleneck
            + 3 * conv_bn(D, C, 1) + 3 * conv_bn(C, C, 3)         # FPN laterals + 3x3 convs
            + conv_bn(4 * C, C, 3))                                # fusion of the 4 levels
    u = UPerNet(D, 21)                                             # the ribs: 20 + background
    assert count_params(u) == pyramid + head + (C + 1) * 21
    assert pyramid == 7_081_728 and count_params(u.pyramid) == pyramid
    for n_cls in (3, 7, 21):                                       # lungs, zones, ribs (+ background)
        assert round((pyramid + head + (C + 1) * n_cls) / 1e6, 1) == 39.3
    assert count_params(u.conv_seg) == (C + 1) * 21
    for n_cls in (1, 3, 21):
        assert count_params(LinearDecoder(D, n_cls)) == 769 * n_cls


def test_decoders_output_shapes():
    from model import SegModel, build_vit
    enc = build_vit("vit_tiny", img_size=112)
    x = torch.randn(2, 1, 56, 56)  # 4 x 4 patches (position embeddings resized): small and fast
    for dec, layers in ((UPerNet(192, 3, channels=32), [4, 6, 8, 12]), (LinearDecoder(192, 3), [12])):
        m = SegModel(enc, dec, layers).train()
        out = m(x)
        assert out.shape == (2, 3, 56, 56)
        out.sum().backward()
        assert all(p.grad is None for p in enc.parameters())  # the encoder stays frozen
        assert not enc.training


# ---------------------------------------------------------------------------------------------------------------
# loaders in the published formats, on real sample images

def zone_boxes(lab):
    """Per lung (from the real mask): its bounding box cut into thirds, named as Chest ImaGenome names them."""
    out = {}
    for cls, side in ((1, "right"), (2, "left")):
        ys, xs = np.nonzero(lab == cls)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        cuts = np.linspace(y0, y1, 4).round().astype(int)
        for k, level in enumerate(("upper", "mid", "lower")):
            out[f"{side} {level} lung zone"] = (int(x0), int(cuts[k]), int(x1), int(cuts[k + 1]))
    return out


def scene_graph(image_id, boxes):
    """A Chest ImaGenome scene graph (silver_dataset/scene_graph/<dicom_id>_SceneGraph.json) holding the boxes in
    original-image pixels, plus a non-zone object that must be ignored."""
    objs = []
    for name, (x1, y1, x2, y2) in list(boxes.items()) + [("trachea", (100, 0, 130, 60))]:
        objs.append({"object_id": f"{image_id}_{name}", "x1": x1 * 224 // 256, "y1": y1 * 224 // 256,
                     "x2": x2 * 224 // 256, "y2": y2 * 224 // 256, "width": (x2 - x1) * 224 // 256,
                     "height": (y2 - y1) * 224 // 256, "bbox_name": name, "synsets": ["C0000000"],
                     "name": name.capitalize(), "original_x1": x1, "original_y1": y1, "original_x2": x2,
                     "original_y2": y2, "original_width": x2 - x1, "original_height": y2 - y1})
    return {"image_id": image_id, "viewpoint": "PA", "patient_id": 10000032, "study_id": 50414267,
            "objects": objs, "attributes": [], "relationships": []}


def test_zones_from_scene_graph_json_and_csv(tmp_path):
    names = [p.stem for p in MASKS[:3]]
    sg = tmp_path / "scene_graph"
    sg.mkdir()
    rows = ["path,zone,x1,y1,x2,y2"]
    for n in names:
        boxes = zone_boxes(lungs(LUNGSEG / "masks" / f"{n}.png"))
        (sg / f"{n}_SceneGraph.json").write_text(json.dumps(scene_graph(n, boxes)))
        rows += [f"images/{n}.png,{z},{b[0]},{b[1]},{b[2]},{b[3]}" for z, b in boxes.items()]
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,mask\n" + "".join(f"images/{n}.png,masks/{n}.png\n" for n in names))
    args = segment.get_args(["--task", "zones", "--csv", str(manifest), "--image_root", str(LUNGSEG),
                             "--boxes", str(sg), "--subject_col", "none"])
    from_json = segment.load_csv(str(manifest), args, archives.load_boxes(str(sg), 1.0))
    from_csv = segment.load_csv(str(manifest), args, archives.load_boxes(str(tmp_path / "boxes.csv"), 1.0))
    assert len(from_json) == len(from_csv) == 3
    for sj, sc in zip(from_json, from_csv):
        assert set(sj["boxes"]) == set(segment.ZONES)
        shape = seglabels.read_mask(sj["mask"]).shape
        zj, zc = seglabels.make_label(sj, "zones", shape), seglabels.make_label(sc, "zones", shape)
        np.testing.assert_array_equal(zj, zc)
        lab = lungs(sj["mask"])
        in_zone, in_lung = (zj > 0) & (zj != 255), (lab > 0) & (lab != 255)
        assert not (in_zone & ~in_lung).any()  # zones lie inside the lung
        for k, name in enumerate(segment.ZONES, start=1):
            x1, y1, x2, y2 = sj["boxes"][name]
            ys, xs = np.nonzero(zj == k)
            assert len(ys) > 100, name
            assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2, name
            # right zones come from the lung on the image's left (radiological convention)
            assert (xs.mean() < shape[1] / 2) == name.startswith("right"), name
        assert (zj[lab == 1] != 255).mean() > 0.99 and (zj[lab == 0] == 0).all()


def point_in_polygon(px, py, poly):
    """Even-odd ray casting in float64, the independent reference for PIL's polygon fill."""
    inside = np.zeros(px.shape, bool)
    n = len(poly)
    for i in range(n):
        (x1, y1), (x2, y2) = poly[i], poly[(i + 1) % n]
        cross = (y1 > py) != (y2 > py)
        xint = x1 + (py - y1) * (x2 - x1) / np.where(y2 == y1, 1e-12, y2 - y1)
        inside ^= cross & (px < xint)
    return inside


def test_vindr_rib_json_official_split(tmp_path):
    # VinDr-RibCXR layout: data/<split>/img/*.png, Annotations/<split>/Vindr_RibCXR_<split>_mask.json written by
    # pandas' DataFrame.to_json (column-major: {"img": {"0": path}, "R1": {"0": [{"x", "y"}, ...]}, ...})
    rng = np.random.default_rng(0)
    imgs = sorted((LUNGSEG / "images").glob("*.png"))
    polys_of = {}
    for split, chosen in (("train", imgs[:6]), ("val", imgs[6:9])):
        (tmp_path / "data" / split / "img").mkdir(parents=True)
        (tmp_path / "Annotations" / split).mkdir(parents=True)
        ann = {"img": {}}
        for r in segment.RIBS:
            ann[r] = {}
        for k, src in enumerate(chosen):
            rel = f"data/{split}/img/VinDr_RibCXR_{split}_{k:03d}.png"
            shutil.copy(src, tmp_path / rel)
            ann["img"][str(k)] = rel
            for j, r in enumerate(segment.RIBS):
                if r == "L10" and k == 0:
                    ann[r][str(k)] = "None"  # a rib the readers could not see
                    continue
                side = 0 if r.startswith("R") else 128   # R ribs on the image's left
                y0 = 20 + 20 * (j % 10)
                x = side + np.array([10, 110, 115, 15]) + rng.integers(-3, 4, 4)
                y = np.array([y0, y0 + 8, y0 + 30, y0 + 22]) + rng.uniform(-2, 2, 4)
                ann[r][str(k)] = [{"x": float(a), "y": float(b)} for a, b in zip(x, y)]
            polys_of[rel] = {r: ann[r][str(k)] for r in segment.RIBS}
        name = tmp_path / "Annotations" / split / f"Vindr_RibCXR_{split}_mask.json"
        name.write_text(json.dumps(ann))
    args = segment.get_args(["--task", "ribs", "--dataset", "vindr_rib", "--data_dir", str(tmp_path)])
    parts = segment.load_parts(args)
    assert len(parts["test"]) == 3 and all("/val/" in s["path"] for s in parts["test"])  # official val = test
    assert len(parts["train"]) + len(parts["val"]) == 6 and all("/train/" in s["path"] for s in parts["val"])
    s = parts["test"][0]
    shape = seglabels.read_mask(s["path"]).shape
    lab = seglabels.make_label(s, "ribs", shape)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    rel = os.path.relpath(s["path"], tmp_path)
    assert not (lab == segment.RIBS.index("L10") + 1).any()
    refs = {k: point_in_polygon(xx, yy, [(p["x"], p["y"]) for p in polys_of[rel][r]])
            for k, r in enumerate(segment.RIBS, start=1) if polys_of[rel][r] != "None"}
    count = sum(refs.values())
    assert (count > 1).sum() > 500  # the test polygons do overlap their neighbours
    for k, ref in refs.items():
        got, own = lab == k, ref & (count == 1)
        # where one polygon alone covers a pixel it is that rib (PIL also fills the outline: a 1-px margin)
        assert (got & own).sum() / own.sum() > 0.9 and (got & ~ref).sum() < 0.15 * own.sum(), k
    assert (lab[count > 1] == 255).mean() > 0.8  # where two ribs overlap: ignored
    assert (lab[count == 0] == 0).mean() > 0.98


# ---------------------------------------------------------------------------------------------------------------
# the linear decoder solved to convergence; a short UPerNet run whose validation Dice rises; outputs and --compare

def test_linear_decoder_is_solved_and_compare_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/pretrain/encoder.safetensors here: the random encoder, whatever ran before
    out = tmp_path / "run"
    res = segment.main(["--decoder", "linear", "--model", "vit_tiny", "--img_size", "112", "--num_workers", "0",
                        "--n_overlays", "2", "--device", "cpu", "--out_dir", str(out)])
    conv = res["convergence"]
    assert conv["solver"] == "lbfgs" and conv["converged"] and conv["grad_max"] <= segment.SEG_GRAD_TOL
    rows = [json.loads(l) for l in open(out / "log.jsonl")]
    val = [r["val_loss"] for r in rows]
    # the sweep over L2 strengths (strongest first) ends at the first one worse than the best, which is kept
    assert val.index(min(val)) == len(val) - 2 and res["best_val_loss"] == pytest.approx(min(val))
    assert res["test"]["mean_dice"] > 0.4 and set(res["test"]["dice"]) == {"right_lung", "left_lung"}
    assert "random-init" in json.load(open(out / "results.json"))["encoder"]
    assert len(list((out / "overlays").glob("*.png"))) == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["l2"] == conv["l2"] and state["val_loss"] == pytest.approx(min(val))
    # --compare: a copy with every Dice lowered by 0.05 must come out worse, by the shared paired bootstrap
    lines = open(out / "per_image_dice.csv").read().splitlines()
    worse = [lines[0]] + [",".join(c if i < 2 or c == "" else f"{float(c) - 0.05:.6f}" for i, c in
                                   enumerate(l.split(","))) for l in lines[1:]]
    (tmp_path / "worse.csv").write_text("\n".join(worse) + "\n")
    cmp = segment.main(["--compare", str(out), str(tmp_path / "worse.csv"), "--out_dir", str(tmp_path / "cmp"),
                        "--n_boot", "200"])
    r = cmp["metrics"]["dice"]["mean Dice"]
    assert r["delta"] == pytest.approx(5.0, abs=1e-3) and r["p_one_tailed"] < 0.01  # Dice x100, as in the table
    assert (tmp_path / "cmp" / "compare.json").exists()


def test_upernet_training_run_reports_its_convergence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "up"
    res = segment.main(["--model", "vit_tiny", "--img_size", "56", "--batch_size", "21", "--lr", "1e-3", "--epochs",
                        "8", "--num_workers", "0", "--n_overlays", "0", "--device", "cpu", "--out_dir", str(out)])
    rows = [json.loads(l) for l in open(out / "log.jsonl")]
    val = [r["val_dice"] for r in rows if "val_dice" in r]
    assert len(val) == 8 and max(val[-3:]) > val[0] + 0.15, val
    conv = res["convergence"]
    assert conv["solver"] == "adam" and len(conv["val_loss"]) == 8 and conv["note"].startswith("decoder:")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == res["best_epoch"]


# ---------------------------------------------------------------------------------------------------------------
# preprocessing: centre crop of image and label together; a loaded encoder keeps its own resolution

def test_centre_crop_takes_image_and_label_together(tmp_path):
    from PIL import Image
    src = sorted((LUNGSEG / "images").glob("*.png"))[0]
    img, mask = np.asarray(Image.open(src).convert("L")), seglabels.read_mask(LUNGSEG / "masks" / src.name)
    assert img.shape == mask.shape == (256, 256)
    pad = lambda a: np.pad(a, ((0, 0), (40, 40)))  # a wider picture: the centre square is the original
    Image.fromarray(pad(img)).save(tmp_path / "wide.png")
    Image.fromarray(pad(mask)).save(tmp_path / "wide_mask.png")
    wide = {"path": str(tmp_path / "wide.png"), "mask": str(tmp_path / "wide_mask.png"), "subject": "a"}
    orig = {"path": str(src), "mask": str(LUNGSEG / "masks" / src.name), "subject": "a"}
    xw, yw, fw = segment.SegDataset([wide], "lungs", 112, full=True)[0]
    xo, yo, fo = segment.SegDataset([orig], "lungs", 112, full=True)[0]
    assert xw.shape == (1, 112, 112) and torch.allclose(xw, xo) and torch.equal(yw, yo) and torch.equal(fw, fo)
    assert fw.shape == (256, 256)  # Dice is measured on the crop at its own resolution


def test_a_loaded_encoder_keeps_its_resolution(tmp_path, monkeypatch):
    from encoders import save_encoder
    from model import build_vit
    monkeypatch.chdir(tmp_path)
    save_encoder(build_vit("vit_tiny", img_size=56, patch_size=14), str(tmp_path / "e.safetensors"))
    run = lambda *f: segment.main(["--encoder", str(tmp_path / "e.safetensors"), "--decoder", "linear", "--max_steps",
                                   "20", "--batch_size", "8", "--num_workers", "0", "--n_overlays", "0", "--device",
                                   "cpu", "--out_dir", str(tmp_path / "o"), *f])
    assert run("--img_size", "112")["img_size"] == 56  # --img_size shapes a random encoder only
    assert run("--enc_img_size", "84")["img_size"] == 84  # the one override of a loaded encoder
