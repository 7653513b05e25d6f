"""data.py on the bundled real X-rays: decoding (PNG 8/16-bit, JPEG, TIFF, DICOM made here with pydicom), bad files,
folders, the uint8 cache, the source mix sampler, subject splits and deterministic crops."""
import logging
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
from common import UserError
from conftest import SAMPLE

PNG = SAMPLE / "lungseg" / "images" / "00870a9c.png"  # 8-bit grayscale 256 x 256
JPGS = sorted((SAMPLE / "nih14" / "images").glob("*.jpg"))


def real_u8(path=PNG):
    return np.asarray(Image.open(path).convert("L"), dtype=np.uint8)


def good_folder(tmp_path, n=6):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i, p in enumerate(JPGS[:n]):
        shutil.copy(p, d / ("sub" if i % 2 else ".") / p.name)
    return d


# ---------------------------------------------------------------------------------------------------------------
# decoding

def test_png_8_and_16_bit_and_tiff(tmp_path):
    a = real_u8()
    Image.fromarray(a).save(tmp_path / "a8.png")
    Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    # 12-bit content in a 16-bit file: scaled by the dtype's max (65535), not stretched to the image's max
    Image.fromarray(a.astype(np.uint16) * 16).save(tmp_path / "a12.png")
    Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "a16.tif")
    Image.fromarray(np.stack([a, a // 2, a // 3], -1)).save(tmp_path / "rgb.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")  # really written as 16-bit
    ref = a.astype(np.float64) / 255
    for name in ("a8.png", "a16.png", "a16.tif"):
        img = data.read_image(tmp_path / name)
        assert img.dtype == np.float32 and img.shape == a.shape
        assert np.abs(img - ref).max() < 1e-3, name
    np.testing.assert_allclose(data.read_image(tmp_path / "a12.png"), a.astype(np.float64) * 16 / 65535, atol=1e-6)
    luma = (a * 0.299 + (a // 2) * 0.587 + (a // 3) * 0.114) / 255
    assert np.abs(data.read_image(tmp_path / "rgb.png") - luma).max() < 1.5 / 255


def test_jpeg_matches_pil_and_case_insensitive_find(tmp_path):
    for p in JPGS[:3]:
        img = data.read_image(p)
        ref = np.asarray(Image.open(p).convert("L"), dtype=np.float64) / 255
        assert img.shape == ref.shape and np.abs(img - ref).max() < 1e-6
    shutil.copy(JPGS[0], tmp_path / "UPPER.JPG")
    shutil.copy(PNG, tmp_path / "b.Png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._hidden.png").write_bytes(b"macOS resource fork")
    found = data.find_images(tmp_path)
    assert [p.split("/")[-1] for p in found] == ["UPPER.JPG", "b.Png"]
    assert data.read_image(found[0]).shape == real_u8(JPGS[0]).shape


def make_dicom(path, stored, photometric, slope, intercept, wc=None, ww=None, bits_stored=16, preamble=True):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if wc is not None:
        ds.WindowCenter, ds.WindowWidth = wc, ww
    ds.save_as(path, enforce_file_format=preamble)
    return path


def window_ref(stored, slope, intercept, c, w):
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function, written out independently in float64 with its three cases."""
    x = stored.astype(np.float64) * slope + intercept
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, ((x - (c - 0.5)) / (w - 1) + 0.5)))


def test_dicom_monochrome2_and_1_with_rescale_and_window(tmp_path):
    import pydicom
    a = real_u8().astype(np.int64)
    # MONOCHROME2, 12-bit stored, slope 0.5 / intercept -100, window clipping both ends
    s2 = a * 16 + 5
    x2 = s2 * 0.5 - 100
    c2, w2 = float(np.percentile(x2, 50)), float(np.ptp(x2) * 0.4)
    p2 = make_dicom(tmp_path / "m2.dcm", s2, "MONOCHROME2", 0.5, -100, c2, w2, bits_stored=12)
    assert np.array_equal(pydicom.dcmread(p2).pixel_array, s2)  # the file holds what we meant
    ref2 = window_ref(s2, 0.5, -100, c2, w2)
    assert 0.02 < (ref2 == 0).mean() < 0.5 and 0.02 < (ref2 == 1).mean() < 0.5  # the window really clips
    np.testing.assert_allclose(data.read_image(p2), ref2, atol=1e-6)
    # MONOCHROME1 (low values white), full 16 bits, multi-valued window: first value used, then inverted
    s1 = 65535 - a * 257
    c1, w1 = float(np.median(s1 * 2.0 + 1000)), float(np.ptp(s1 * 2.0) * 0.8)
    p1 = make_dicom(tmp_path / "m1.dcm", s1, "MONOCHROME1", 2.0, 1000, [c1, 7.0], [w1, 3.0])
    ref1 = 1 - window_ref(s1, 2.0, 1000, c1, w1)
    got1 = data.read_image(p1)
    np.testing.assert_allclose(got1, ref1, atol=1e-6)
    # bone bright in both: the inverted MONOCHROME1 image correlates positively with the original PNG
    assert np.corrcoef(got1.ravel(), a.ravel())[0, 1] > 0.95
    # no window: min-max of the rescaled values; no extension but a DICM preamble: still DICOM, and found
    p0 = make_dicom(tmp_path / "scan_no_ext", s2, "MONOCHROME2", 0.5, -100)
    x = s2 * 0.5 - 100.0
    np.testing.assert_allclose(data.read_image(p0), (x - x.min()) / (x.max() - x.min()), atol=1e-6)
    assert [p.split("/")[-1] for p in data.find_images(tmp_path)] == ["m1.dcm", "m2.dcm", "scan_no_ext"]


# ---------------------------------------------------------------------------------------------------------------
# bad files and folders

def bad_folder(tmp_path):
    d = good_folder(tmp_path)
    raw = PNG.read_bytes()
    (d / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("this is a text file renamed to .png\n")
    (d / "notes.txt").write_text("ignored: not an image extension")
    (d / "labels.csv").write_text("path\nx.png\n")
    return d, {str(d / n) for n in ("truncated.png", "empty.png", "text.png")}


def test_bad_files_raise_image_read_error_naming_file(tmp_path):
    d, bad = bad_folder(tmp_path)
    for p in bad:
        with pytest.raises(data.ImageReadError, match=p.split("/")[-1]):
            data.read_image(p)
    with pytest.raises(data.ImageReadError, match="missing.png"):
        data.read_image(tmp_path / "missing.png")


def test_bad_files_skipped_counted_warned_never_crash(tmp_path, caplog):
    d, bad = bad_folder(tmp_path)
    paths = data.find_images(d)
    assert len(paths) == 9 and bad < set(paths)  # 6 good + 3 bad; .txt / .csv not picked up
    ds = data.PretrainDataset(paths, img_size=56, seed=1)
    with caplog.at_level(logging.WARNING, logger="data"):
        for epoch in range(2):  # every index, twice: each bad file warned once only
            batch = torch.stack([ds[(i, epoch)][0] for i in range(len(ds))])
            assert batch.shape == (9, 1, 56, 56) and torch.isfinite(batch).all()
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=[(i, 5) for i in range(9)])
        assert sum(len(x) for x, _ in loader) == 9
    assert ds.skipped == bad
    msgs = [r.getMessage() for r in caplog.records]
    for p in bad:
        assert sum(p in m for m in msgs) == 1, p
    # a bad index is replaced by the next readable file: deterministically, and never the bad file itself
    i = paths.index(str(d / "empty.png"))
    assert torch.equal(ds[(i, 3)][0], data.PretrainDataset(paths, img_size=56, seed=1)[(i, 3)][0])


def test_verify_drops_bad_headers_upfront(tmp_path, caplog):
    d, bad = bad_folder(tmp_path)
    paths = data.find_images(d)
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.PretrainDataset(paths, img_size=28, verify=True)
    summary = [r.getMessage() for r in caplog.records if "skipped 2 unreadable files" in r.getMessage()]
    assert len(summary) == 1 and "empty.png" in summary[0] and "text.png" in summary[0]
    assert ds.skipped == bad - {str(d / "truncated.png")}  # header intact: caught when decoded instead
    [ds[(i, 0)] for i in range(len(ds))]
    assert ds.skipped == bad


def test_missing_and_empty_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.find_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    for d in ("empty", "txt"):
        with pytest.raises(UserError, match=r"no images found.*\.png.*\.dcm"):
            data.find_images(tmp_path / d)
    with pytest.raises(UserError, match="nope"):
        data.parse_sources([str(tmp_path / "nope") + ":2"])
    with pytest.raises(UserError, match="positive"):
        data.parse_sources([str(tmp_path / "txt") + ":0"])
    with pytest.raises(UserError, match="no column 'path'"):
        data.read_csv(SAMPLE / "lungseg" / "manifest.csv", required=("path",))


# ---------------------------------------------------------------------------------------------------------------
# cache

def test_cache_round_trip_equals_direct_decoding(tmp_path, monkeypatch, caplog):
    d, bad = bad_folder(tmp_path)
    for p in sorted((SAMPLE / "lungseg" / "images").glob("*.png"))[:2]:
        shutil.copy(p, d / p.name)
    paths = data.find_images(d)
    cache = data.build_cache(paths, tmp_path / "cache", size=64, workers=0, progress=False)
    assert set(cache.skipped) == bad and len(cache) == 11
    for i, p in enumerate(paths):
        if p in bad:
            continue
        direct = data.resize(data.read_image(p), 64).double().numpy() * 255
        assert cache[i].dtype == np.uint8 and cache[i].shape == (64, 64)
        if p.endswith(".png"):  # decoded exactly as read_image does; only the uint8 rounding differs
            assert np.abs(cache[i] - direct).max() <= 0.5 + 1e-4
        else:  # JPEG decoded at >= 2x size in the DCT domain: equal to that path, close to the full decode
            drafted = data.resize(data.read_image(p, draft=128), 64).double().numpy() * 255
            assert np.abs(cache[i] - drafted).max() <= 0.5 + 1e-4
            assert np.abs(cache[i] - direct).mean() < 1.0
    assert len(pickle.dumps(cache)) < 5000  # workers get the file name, not the pixels
    # a process pool (spawned workers) builds the same cache
    pooled = data.build_cache(paths, tmp_path / "cache_pool", size=64, workers=1, progress=False)
    assert all(np.array_equal(pooled[i], cache[i]) for i in range(len(paths))) and pooled.skipped == cache.skipped
    # second call with the same paths and size reuses the files: no decoding at all
    monkeypatch.setattr(data, "_cache_one", lambda job: pytest.fail("cache was rebuilt"))
    again = data.build_cache(paths, tmp_path / "cache", size=64, workers=0, progress=False)
    assert np.array_equal(again[0], cache[0]) and set(again.skipped) == bad
    # the dataset reads the memmap and never tries the files the cache could not read
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.PretrainDataset(paths, img_size=32, cache=again)
        [ds[(i, 0)] for i in range(len(ds))]
    assert ds.skipped == bad and not any("skipping unreadable" in r.getMessage() for r in caplog.records)
    full = data.PretrainDataset(paths, img_size=64, crop_scale=(1, 1), crop_ratio=(1, 1), cache=again)
    j = next(i for i, p in enumerate(paths) if p not in bad)
    np.testing.assert_allclose(full[(j, 0)][0][0] * data.CXR_STD + data.CXR_MEAN, again[j] / 255.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# mixing sources

def view_csv(tmp_path, views):
    rows = ["path,view"] + [f"{p},{v}" for p, v in zip(JPGS, views)]
    (tmp_path / "views.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "views.csv")


def test_mix_sampler_weights_ranks_determinism():
    sources = data.parse_sources([f"{SAMPLE / 'nih14' / 'labels.csv'}:3", str(SAMPLE / "kermany")])
    sizes = [len(s) for s in sources]
    assert sizes == [80, 120] and [s.weight for s in sources] == [3.0, 1.0]
    assert data.concat_paths(sources)[80] == sources[1].paths[0]
    s = data.MixSampler(sources, epoch_size=800, seed=0)
    counts = Counter(int(i >= 80) for i in s.epoch_indices(0))
    assert counts[0] == 600 and counts[1] == 200  # 3:1 by weight, nih oversampled (80 images, 600 draws)
    assert Counter(s.epoch_indices(0))[0] in (7, 8)  # oversampling = whole copies: every image 7 or 8 times
    # ranks: equal length, disjoint positions; without oversampling also disjoint images
    fair = data.MixSampler(sources, weights=[80, 120], world=3, seed=4)
    lists = [data.MixSampler(sources, weights=[80, 120], rank=r, world=3, seed=4).epoch_indices(2) for r in range(3)]
    assert [len(x) for x in lists] == [66] * 3 == [len(fair)] * 3
    assert len(set().union(*map(set, lists))) == 198
    assert sum(lists, []) == fair.epoch_list(2)[:198].tolist()
    # deterministic in (seed, epoch), different across epochs and seeds; set_epoch drives __iter__
    assert s.epoch_indices(3) == data.MixSampler(sources, epoch_size=800, seed=0).epoch_indices(3)
    assert s.epoch_indices(3) != s.epoch_indices(4)
    assert s.epoch_indices(3) != data.MixSampler(sources, epoch_size=800, seed=1).epoch_indices(3)
    s.set_epoch(5)
    assert list(s) == s.epoch_indices(5) and len(s) == 800


def test_mix_sampler_frontal_ratio(tmp_path):
    views = ["PA"] * 20 + ["LATERAL"] * 10 + ["LL"] * 10 + [""] * 8 + ["AP Supine"] * 20 + ["Frontal"] * 12
    src = data.parse_sources([view_csv(tmp_path, views)])
    assert len(src[0]) == 80 and src[0].views[20] == "LATERAL"
    kind = [data.view_kind(v) for v in views]
    assert Counter(kind) == {"frontal": 52, "lateral": 20, "other": 8}
    s = data.MixSampler(src, epoch_size=1000, frontal_ratio=3.0, seed=2)
    got = Counter(kind[i] for i in s.epoch_indices(0))
    assert got["other"] == 100  # unknown views keep their natural share (8/80)
    assert got["frontal"] == 675 and got["lateral"] == 225  # 3:1 of the rest (natural was 52:20 = 2.6:1)
    nat = Counter(kind[i] for i in data.MixSampler(src, epoch_size=1000, seed=2).epoch_indices(0))
    assert abs(nat["frontal"] / 1000 - 52 / 80) < 0.03  # without the ratio: the natural 52/80


# ---------------------------------------------------------------------------------------------------------------
# splits

def test_subject_splits_disjoint_and_leak_detected():
    rows = data.read_csv(SAMPLE / "kermany" / "labels.csv", required=("patient",))
    subj = [r["patient"] for r in rows]
    assert len(set(subj)) < len(subj)  # some patients have two images: a row split would leak
    parts = data.split_by_subject(subj, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(subj)))
    data.check_disjoint(subj, *parts)
    n_subj = [len({subj[i] for i in p}) for p in parts]
    assert abs(n_subj[0] / sum(n_subj) - 0.7) < 0.02
    assert all(np.array_equal(a, b) for a, b in zip(parts, data.split_by_subject(subj, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, data.split_by_subject(subj, seed=4)))
    folds = data.kfold_by_subject(subj, k=5, seed=0)
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(len(subj)))
    for tr, te in folds:
        data.check_disjoint(subj, tr, te)
        assert len(tr) + len(te) == len(subj)
    ints = [sorted(set(subj)).index(s) for s in subj]  # ids as ints or strings: same patients, same split
    assert all(np.array_equal(a, b) for a, b in zip(data.split_by_subject(ints), data.split_by_subject(map(str, ints))))
    dup = subj.index(next(s for s in subj if subj.count(s) == 2))
    other = [i for i, s in enumerate(subj) if s == subj[dup] and i != dup][0]
    with pytest.raises(UserError, match=subj[dup]):
        data.check_disjoint(subj, np.array([dup, 0]), np.array([other]))


# ---------------------------------------------------------------------------------------------------------------
# crops and preprocessing

def test_crops_deterministic_and_in_range():
    paths = [str(p) for p in JPGS[:4]]
    ds = data.PretrainDataset(paths, img_size=56, seed=7)
    x, step = ds[(2, 11)]
    assert x.shape == (1, 56, 56) and step == 11
    assert torch.equal(x, data.PretrainDataset(paths, img_size=56, seed=7)[(2, 11)][0])  # fresh process, same crop
    assert not torch.equal(x, ds[(2, 12)][0])
    assert not torch.equal(x, data.PretrainDataset(paths, 56, seed=8)[(2, 11)][0])
    x3, step = data.PretrainDataset(paths, 56, in_chans=3, mean=[0.5, 0.4, 0.3], std=0.2)[2]
    assert x3.shape == (3, 56, 56) and step == -1
    rng = np.random.default_rng(0)
    boxes = [data.crop_box(rng, 256, 256) for _ in range(2000)]
    area = np.array([h * w for _, _, h, w in boxes]) / 256 ** 2
    aspect = np.array([w / h for _, _, h, w in boxes])
    assert area.min() > 0.29 and area.max() <= 1 and aspect.min() > 0.74 and aspect.max() < 1.34
    assert all(t >= 0 and l >= 0 and t + h <= 256 and l + w <= 256 for t, l, h, w in boxes)
    assert area.min() < 0.32 and area.max() > 0.95  # spans the whole scale range
    assert 0.55 < area.mean() < 0.65  # ~U(0.3, 1), less the large boxes whose aspect does not fit (as torchvision)
    # full crop, no flip: the dataset output is the CXR-normalised image resized, in the original orientation;
    # hflip=True flips about half the steps
    sq = [str(PNG)]
    ref = data.resize(data.read_image(PNG), 56)
    full = data.PretrainDataset(sq, 56, crop_scale=(1, 1), crop_ratio=(1, 1))
    for step in range(4):
        np.testing.assert_allclose(full[(0, step)][0][0] * data.CXR_STD + data.CXR_MEAN, ref, atol=1e-5)
    flip = data.PretrainDataset(sq, 56, crop_scale=(1, 1), crop_ratio=(1, 1), hflip=True)
    flipped = [torch.allclose(flip[(0, s)][0][0] * data.CXR_STD + data.CXR_MEAN, ref.flip(1), atol=1e-5)
               for s in range(40)]
    assert 8 < sum(flipped) < 32


def test_preprocess_channels_and_normalisation():
    a = real_u8()
    pre = data.Preprocess(256, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    x = pre(a.astype(np.float32) / 255)
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    ref = (a[None] / 255.0 - mean) / std
    assert x.shape == (3, 256, 256) and np.abs(x.numpy() - ref).max() < 1e-5  # same size: no resampling
    y = data.Preprocess(224, data.CXR_MEAN, data.CXR_STD)(a)  # uint8 input, 1 channel, resized
    assert y.shape == (1, 224, 224)
    assert abs(float(y.mean()) * data.CXR_STD + data.CXR_MEAN - a.mean() / 255) < 0.01
    torch.manual_seed(0)
    t = data.Preprocess(224, 0.5, 0.25, train=True)(a)
    assert t.shape == (1, 224, 224) and not torch.equal(t, data.Preprocess(224, 0.5, 0.25)(a))
