"""data.py on the bundled real X-rays: decoding (PNG 8/16-bit, JPEG, TIFF, DICOM made here with pydicom), bad files,
folders, the prepared cache (prepare.py), the source mix sampler, subject splits and deterministic crops."""
import builtins
import errno
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
import imagecache
from base import UserError
from conftest import ROOT, SAMPLE

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


def test_verify_drops_unreadable_files_upfront(tmp_path, caplog):
    d, bad = bad_folder(tmp_path)
    paths = data.find_images(d)
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.PretrainDataset(paths, img_size=28, verify=True)
    summary = [r.getMessage() for r in caplog.records if "skipped 3 unreadable files" in r.getMessage()]
    assert len(summary) == 1 and "empty.png" in summary[0] and "text.png" in summary[0]
    assert ds.skipped == bad  # a file cut short after an intact header is decoded, and dropped, up front too
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
# prepared cache (prepare.py)

SMALL = sorted((SAMPLE / "kermany").rglob("*.jpg"))  # paediatric films, some under 150 px on their short side


def cache_folder(tmp_path):
    d, bad = bad_folder(tmp_path)
    for p in sorted((SAMPLE / "lungseg" / "images").glob("*.png"))[:2]:
        shutil.copy(p, d / p.name)
    small = next(p for p in SMALL if min(Image.open(p).size) < 120)
    shutil.copy(small, d / "small.jpeg")
    return data.find_images(d), bad, str(d / "small.jpeg")


def test_prepared_cache_round_trip_equals_direct_decoding(tmp_path, monkeypatch, caplog):
    paths, bad, small = cache_folder(tmp_path)
    side = 120
    cache = imagecache.prepare_cache(paths, tmp_path / "c", side, workers=0, chunk_size=4, progress=False)
    assert set(cache.skipped) == bad and len(cache) == 12 and cache.info["small"] == 1
    assert cache.info["bytes"] == sum(int(cache.height[i]) * int(cache.width[i]) for i in np.flatnonzero(cache.ok))
    png = imagecache.prepare_cache(paths, tmp_path / "p", side, fmt="png", workers=1, chunk_size=5, progress=False)
    for i, p in enumerate(paths):
        if p in bad:
            with pytest.raises(data.ImageReadError):
                cache[i]
            continue
        full = data.read_image(p)
        img = cache[i]
        assert img.dtype == np.uint8 and img.shape == imagecache.stored_shape(*full.shape, side)
        assert min(img.shape) == min(side, min(full.shape))  # short side shrunk to `side`, aspect kept
        assert abs(img.shape[0] / img.shape[1] - full.shape[0] / full.shape[1]) < 0.02
        assert np.array_equal(png[i], img)  # PNG is lossless: both formats hold the same pixels
        if p == small:  # smaller than `side`: stored exactly as decoded, never upsampled
            assert img.shape == full.shape and np.abs(img - full * 255).max() <= 0.5 + 1e-4
            assert cache.small[i]
        elif p.endswith(".png"):  # decoded exactly as read_image does; only the uint8 rounding differs
            direct = data.resize(full, img.shape).double().numpy() * 255
            assert np.abs(img - direct).max() <= 0.5 + 1e-4
        else:  # JPEG decoded at >= 2x size in the DCT domain: equal to that path, close to the full decode
            drafted = data.resize(data.read_image(p, draft=2 * side), img.shape).double().numpy() * 255
            assert np.abs(img - drafted).max() <= 0.5 + 1e-4
            assert np.abs(img - data.resize(full, img.shape).double().numpy() * 255).mean() < 1.0
    assert len(pickle.dumps(cache)) < 5000  # workers get the folder name and index arrays, not pixels
    # a second call with the same paths and settings reuses the chunks: no decoding at all
    monkeypatch.setattr(imagecache, "_prepare_image", lambda *a: pytest.fail("cache was rebuilt"))
    again = imagecache.prepare_cache(paths, tmp_path / "c", side, workers=0, chunk_size=4, progress=False)
    assert np.array_equal(again[0], cache[0]) and set(again.skipped) == bad
    # the dataset reads the cache and never tries the files the cache could not read
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.PretrainDataset(paths, img_size=32, cache=imagecache.open_cache(tmp_path / "c", paths))
        [ds[(i, 0)] for i in range(len(ds))]
    assert ds.skipped == bad and not any("skipping unreadable" in r.getMessage() for r in caplog.records)
    whole = data.PretrainDataset(paths, img_size=side, crop_scale=(1, 1), crop_ratio=(1, 1), cache=again)
    j = paths.index(next(p for p in paths if p.endswith(".png") and p not in bad))
    np.testing.assert_allclose(whole[(j, 0)][0][0] * data.CXR_STD + data.CXR_MEAN, again[j] / 255.0, atol=1e-5)


def test_cache_crops_never_upsampled(tmp_path):
    img_size, scale, ratio = 48, (0.3, 1.0), (3 / 4, 4 / 3)
    side = imagecache.min_stored_side(img_size, scale, ratio)
    assert imagecache.min_stored_side(224, (0.3, 1.0)) == 473  # the paper's settings: 2 x 224 = 448 is not enough
    # the worst crop (smallest area, most extreme aspect) of a stored square is still img_size on its short side
    assert min(np.sqrt(scale[0] * side ** 2 * r) for r in ratio) >= img_size - 0.5
    paths = [str(p) for p in JPGS[:6]] + [str(p) for p in sorted((SAMPLE / "lungseg" / "images").glob("*.png"))[:2]]
    for s, name in ((side, "ok"), (2 * img_size, "2x")):
        cache = imagecache.prepare_cache(paths, tmp_path / name, s, workers=0, progress=False)
        assert cache.info["small"] == 0
        ds = data.PretrainDataset(paths, img_size, crop_scale=scale, crop_ratio=ratio, cache=cache)
        sides = [min(ds.crop_of(i, np.random.default_rng([0, step, i]))[2][2:]) for i in range(len(paths))
                 for step in range(300)]
        if name == "ok":
            assert min(sides) >= img_size  # no crop is ever upsampled
        else:  # short side only 2 x img_size: some crops are smaller than the output, i.e. upsampled
            assert min(sides) < img_size


def _cache_bytes(cache):
    return [None if not cache.ok[i] else bytes(cache[i]) for i in range(len(cache))]


def test_cache_split_over_two_processes_equals_single_build_and_resumes(tmp_path, monkeypatch, capsys):
    import prepare
    d, bad = bad_folder(tmp_path)
    sources = [str(d), str(SAMPLE / "lungseg" / "images")]
    src = ["--data_dir", *sources, "--img_size", "32", "--chunk_size", "5", "--workers", "1"]
    prepare.main([*src, "--cache_dir", str(tmp_path / "one")])
    out = capsys.readouterr().out
    assert "3 unreadable skipped" in out and "GB per 100k images" in out
    # two processes at once, one shard each (as two ranks or two nodes would run it), no coordination
    procs = [subprocess.Popen([sys.executable, str(ROOT / "prepare.py"), *src, "--cache_dir", str(tmp_path / "two")],
                              env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = imagecache.open_cache(tmp_path / "one"), imagecache.open_cache(tmp_path / "two")
    assert a.info == b.info and _cache_bytes(a) == _cache_bytes(b)
    for k in ("chunk", "offset", "nbytes", "height", "width", "small"):
        assert np.array_equal(getattr(a, k), getattr(b, k))
    # one shard alone: no index yet, pretraining refuses the unfinished cache; the other shard completes it
    prepare.main([*src, "--cache_dir", str(tmp_path / "seq"), "--shard", "1/2"])
    assert "other shards are still running" in capsys.readouterr().out
    with pytest.raises(UserError, match="unfinished prepared cache"):
        imagecache.open_cache(tmp_path / "seq")
    prepare.main([*src, "--cache_dir", str(tmp_path / "seq"), "--shard", "0/2"])
    assert _cache_bytes(imagecache.open_cache(tmp_path / "seq")) == _cache_bytes(a)
    # killed mid-chunk: chunk 2's marker never written, a half temp file left; a rerun redoes exactly that chunk
    chunks = tmp_path / "one" / "chunks"
    (chunks / "000002.json").unlink()
    (tmp_path / "one" / "index.json").unlink()
    (chunks / "000002.bin.tmp999").write_bytes(b"half")
    done = []
    real = imagecache._prepare_chunk
    monkeypatch.setattr(imagecache, "_prepare_chunk", lambda job: done.append(job[1]) or real(job))
    paths = data.concat_paths(data.parse_sources(sources))
    c = imagecache.prepare_cache(paths, tmp_path / "one", a.side, workers=0, chunk_size=5, progress=False)
    assert done == [2] and not (chunks / "000002.bin.tmp999").exists()
    assert _cache_bytes(c) == _cache_bytes(a)


def test_cache_mismatch_is_a_clear_error(tmp_path):
    paths = [str(p) for p in JPGS[:3]]
    imagecache.prepare_cache(paths, tmp_path / "c", 64, workers=0, progress=False)
    with pytest.raises(UserError, match="another image list"):
        imagecache.open_cache(tmp_path / "c", paths[:2])
    with pytest.raises(UserError, match="another image list"):
        imagecache.prepare_cache(paths[:2], tmp_path / "c", 64, workers=0, progress=False)
    with pytest.raises(UserError, match="upsampled"):
        imagecache.open_cache(tmp_path / "c", paths, min_side=imagecache.min_stored_side(224))
    with pytest.raises(UserError, match="no prepared cache"):
        imagecache.open_cache(tmp_path / "nothing")


def test_corrupt_cache_is_named_never_trained_on(tmp_path, caplog):
    """A chunk overwritten with random bytes of the same size, or cut short, fails its checksums: counted, named
    skips (never garbage pixels); an unreadable index is one line."""
    paths = [str(p) for p in JPGS[:9]]
    imagecache.prepare_cache(paths, tmp_path / "c", 64, workers=0, chunk_size=3, progress=False)
    good = imagecache.open_cache(tmp_path / "c", paths)
    first = [good[i].copy() for i in range(3)]
    bin0, bin1 = tmp_path / "c" / "chunks" / "000000.bin", tmp_path / "c" / "chunks" / "000001.bin"
    bin0.write_bytes(np.random.default_rng(0).integers(0, 256, bin0.stat().st_size, dtype=np.uint8).tobytes())
    bin1.write_bytes(bin1.read_bytes()[:100])
    cache = imagecache.open_cache(tmp_path / "c", paths)
    (tmp_path / "c" / "chunks" / "000002.bin").rename(tmp_path / "c" / "moved")
    with pytest.raises(data.ImageReadError, match="000002.bin cannot be read"):
        cache[6]
    (tmp_path / "c" / "moved").rename(tmp_path / "c" / "chunks" / "000002.bin")
    for i in range(6):
        with pytest.raises(data.ImageReadError, match=f"chunks/00000{i // 3}.bin is corrupt"):
            cache[i]
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.PretrainDataset(paths, img_size=32, cache=cache)
        assert ds.load(0)[0] == 6  # the next readable image: chunk 2 is intact
    assert paths[0] in ds.skipped and any("000000.bin is corrupt" in r.getMessage() for r in caplog.records)
    imagecache.prepare_cache(paths, tmp_path / "d", 64, workers=0, chunk_size=3, progress=False)
    assert all(np.array_equal(imagecache.open_cache(tmp_path / "d")[i], first[i]) for i in range(3))
    (tmp_path / "d" / "index.npz").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(UserError, match="index.npz is unreadable"):
        imagecache.open_cache(tmp_path / "d", paths)


def test_full_disk_while_preparing_leaves_no_temp_file_and_resumes(tmp_path, monkeypatch):
    paths = [str(p) for p in JPGS[:4]]

    class FullDisk(io.BytesIO):  # buffered: the disk is found full when the buffer is flushed, at close
        def __init__(self, path):
            super().__init__()
            self.path = path

        def close(self):
            if not self.closed:
                data, big = self.getvalue(), len(self.getvalue()) > 1000
                builtins.open(self.path, "wb").write(data[:1000] if big else data)
                super().close()
                if big:
                    raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(imagecache, "open", lambda p, mode="r", *a: FullDisk(p) if "w" in mode
                        else builtins.open(p, mode, *a), raising=False)
    with pytest.raises(UserError, match="No space left on device.*finished chunks are intact"):
        imagecache.prepare_cache(paths, tmp_path / "c", 64, workers=0, chunk_size=2, progress=False)
    assert not [f for f in os.listdir(tmp_path / "c" / "chunks") if ".tmp" in f]
    monkeypatch.undo()  # space is back: the build resumes and completes
    cache = imagecache.prepare_cache(paths, tmp_path / "c", 64, workers=0, chunk_size=2, progress=False)
    assert len(cache) == 4 and cache.info["stored"] == 4


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
