"""masks.py: I-JEPA multi-block masks. Statistics over many sampled batches, checked against float64 formulas
written here independently of masks.py, plus determinism, DataLoader use, flags and the preview PNG on real X-rays."""
import argparse
import math

import numpy as np
import pytest
import torch
from PIL import Image

import base
import masks
from conftest import SAMPLE


def grids(mask_list, H, W):
    """list of (B, K) index tensors -> bool (len, B, H, W)"""
    out = np.zeros((len(mask_list), len(mask_list[0]), H * W), dtype=bool)
    for k, m in enumerate(mask_list):
        np.put_along_axis(out[k], m.numpy(), True, axis=1)
    return out.reshape(len(mask_list), -1, H, W)


@pytest.mark.parametrize("grid,min_keep", [((16, 16), 10), ((37, 37), 10), ((4, 6), 1)])
def test_shapes_ranges_unique_min_keep(grid, min_keep):
    H, W = grid
    mc = masks.MaskCollator(grid=grid, min_keep=min_keep)
    for step in range(20):
        enc, pred = mc.sample(32, step)
        assert len(enc) == 1 and len(pred) == 4
        for group in (enc, pred):
            K = group[0].shape[1]
            assert K > min_keep  # I-JEPA keeps a block only if it has MORE than min_keep patches
            for m in group:
                assert m.dtype == torch.int64 and m.shape == (32, K)  # equal lengths: they stack
                assert m.min() >= 0 and m.max() < H * W
                a = m.numpy()
                assert (np.diff(a, axis=1) > 0).all()  # ascending, hence unique within each mask


def test_target_blocks_are_rectangles_within_scale_and_aspect():
    H = W = 16
    N = H * W
    (s0, s1), (r0, r1) = (0.15, 0.2), (0.75, 1.5)
    mc = masks.MaskCollator(grid=(H, W), pred_scale=(s0, s1), aspect=(r0, r1))
    # h = round(sqrt(area * r)) grows with scale and aspect, w = round(sqrt(area / r)) grows with scale and shrinks
    # with aspect, so the extremes are at the corners of the (scale, aspect) box
    rnd = lambda x: math.floor(x + 0.5)
    h_lo, h_hi = rnd(math.sqrt(s0 * N * r0)), rnd(math.sqrt(s1 * N * r1))
    w_lo, w_hi = rnd(math.sqrt(s0 * N / r1)), rnd(math.sqrt(s1 * N / r0))
    sizes = set()
    for step in range(300):
        _, pred = mc.sample(8, step)
        g = grids(pred, H, W)
        batch_sizes = set()
        for blk in g.reshape(-1, H, W):
            rows, cols = np.nonzero(blk.any(1))[0], np.nonzero(blk.any(0))[0]
            h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            assert blk.sum() == h * w  # a full rectangle
            assert h_lo <= h <= h_hi and w_lo <= w <= w_hi, (h, w)
            # area within the scale range up to rounding each side by half a patch
            assert s0 * N - (h + w) / 2 - 0.25 <= h * w <= s1 * N + (h + w) / 2 + 0.25
            batch_sizes.add((h, w))
        assert len(batch_sizes) == 1  # one target size per batch (I-JEPA)
        sizes |= batch_sizes
    # scale and aspect drawn independently: a large but wide block exists (the reference, which reuses one uniform
    # for both, only makes large blocks tall)
    assert any(h * w >= 0.185 * N and h < w for h, w in sizes), sizes
    assert any(h > w for h, w in sizes) and len(sizes) >= 4


def test_blocks_clipped_to_grid():
    mc = masks.MaskCollator(grid=(4, 6), pred_scale=(0.9, 1.0), aspect=(0.1, 10.0), min_keep=1)
    h, w = mc.block_size(np.array([1.0, 1.0, 0.9]), np.array([10.0, 0.1, 1.0]))
    assert (h <= 4).all() and (w <= 6).all() and (h >= 1).all() and (w >= 1).all()
    enc, pred = mc.sample(16, 0)  # a block as tall as the grid still gets a valid position
    assert all(m.max() < 24 for m in enc + pred)


@pytest.mark.parametrize("grid,min_keep", [((16, 16), 10), ((37, 37), 10), ((4, 6), 1)])
def test_context_never_overlaps_targets(grid, min_keep):
    H, W = grid
    mc = masks.MaskCollator(grid=grid, min_keep=min_keep)
    for step in range(30):
        enc, pred = mc.sample(16, step)
        assert mc.relaxed == 0
        ctx, tgt = grids(enc, H, W).any(0), grids(pred, H, W).any(0)
        assert not (ctx & tgt).any()
    # with allow_overlap the context block keeps target patches (it is a plain square of 85-100% of the grid)
    mc = masks.MaskCollator(grid=grid, min_keep=min_keep, allow_overlap=True)
    enc, pred = mc.sample(16, 0)
    assert (grids(enc, H, W).any(0) & grids(pred, H, W).any(0)).any()
    assert enc[0].shape[1] >= 0.85 * H * W * 0.75  # square clipped to the grid, so at least ~(0.85 HW) patches


@pytest.mark.parametrize("grid,min_keep", [((16, 16), 10), ((37, 37), 10), ((4, 6), 1)])
def test_every_cell_reachable_and_no_spatial_bias(grid, min_keep):
    H, W = grid
    mc = masks.MaskCollator(grid=grid, min_keep=min_keep, seed=3)
    ctx_cov, tgt_cov = np.zeros((H, W)), np.zeros((H, W))
    for step in range(300):
        enc, pred = mc.sample(8, step)
        ctx_cov += grids(enc, H, W).sum((0, 1))
        tgt_cov += grids(pred, H, W).sum((0, 1))
    # the reference draws corners with randint(0, H - h): its last row / column are never covered
    assert (tgt_cov > 0).all(), np.argwhere(tgt_cov == 0)
    assert (ctx_cov > 0).all(), np.argwhere(ctx_cov == 0)
    assert tgt_cov[-1].sum() > 0 and tgt_cov[:, -1].sum() > 0 and ctx_cov[-1].sum() > 0 and ctx_cov[:, -1].sum() > 0
    # masks are symmetric under flipping the grid; cutting contexts to the batch minimum keeps a random subset, so
    # the bottom rows are as often in the context as the top rows (taking the first K indices would starve them)
    rows, cols = ctx_cov.sum(1), ctx_cov.sum(0)
    assert abs(rows[-1] / rows[0] - 1) < 0.15 and abs(cols[-1] / cols[0] - 1) < 0.15, (rows, cols)
    bottom, top = rows[H - H // 2:].sum(), rows[:H // 2].sum()
    assert abs(bottom / top - 1) < 0.05


def test_trim_first_reproduces_reference_bias():
    # the reference's cut (first K indices) starves the bottom of the context; the default random cut does not
    H = W = 16
    cov = {}
    for trim in ("first", "random"):
        mc = masks.MaskCollator(grid=(H, W), trim=trim)
        cov[trim] = sum(grids(mc.sample(32, step)[0], H, W).sum((0, 1, 3)) for step in range(50))
    first, rand = cov["first"], cov["random"]
    assert first.sum() == rand.sum()  # same lengths, only which patches differ
    assert first[H // 2:].sum() < 0.8 * first[:H // 2].sum()
    assert abs(rand[H // 2:].sum() / rand[:H // 2].sum() - 1) < 0.05


def test_fallback_relaxes_and_keeps_min_keep():
    # 4 targets of 20-25% on an 8x8 grid can cover nearly all of the context: I-JEPA's fallback must kick in
    mc = masks.MaskCollator(grid=(8, 8), pred_scale=(0.2, 0.25), min_keep=11)
    relaxed = 0
    for step in range(40):
        enc, pred = mc.sample(16, step)
        relaxed += mc.relaxed
        assert enc[0].shape[1] > 11 and pred[0].shape[1] > 11  # strict, as I-JEPA's len(mask) > min_keep
    assert relaxed > 0


def test_deterministic_in_seed_rank_step():
    def get(seed=0, rank=0, step=5):
        enc, pred = masks.MaskCollator(seed=seed, rank=rank).sample(16, step)  # a fresh object, as after resume
        return torch.cat([m.flatten() for m in enc + pred])
    a = get()
    assert torch.equal(a, get())
    for other in (get(rank=1), get(step=6), get(seed=1)):
        assert other.shape != a.shape or not torch.equal(other, a)
    mc = masks.MaskCollator()
    mc.sample(16, 99)  # no hidden state carried from call to call
    enc, pred = mc.sample(16, 5)
    assert torch.equal(torch.cat([m.flatten() for m in enc + pred]), a)


class Steps(torch.utils.data.Dataset):
    """item i of a batch of 4 carries step i // 4, as the pretraining sampler does"""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((1, 8, 8), float(i)), i // 4


@pytest.mark.parametrize("workers", [0, 2])
def test_collate_fn_independent_of_workers(workers):
    mc = masks.MaskCollator(grid=(16, 16), seed=7)
    dl = torch.utils.data.DataLoader(Steps(), batch_size=4, collate_fn=mc, num_workers=workers)
    for step, (images, enc, pred) in enumerate(dl):
        assert images.shape == (4, 1, 8, 8) and images[:, 0, 0, 0].tolist() == [4 * step + j for j in range(4)]
        ref_enc, ref_pred = mc.sample(4, step)
        assert all(torch.equal(a, b) for a, b in zip(enc + pred, ref_enc + ref_pred))
    with pytest.raises(ValueError, match="several steps"):
        mc([(torch.zeros(1, 8, 8), 0), (torch.zeros(1, 8, 8), 1)])


def test_flags_and_validation():
    p = argparse.ArgumentParser()
    masks.add_mask_args(p)
    p.add_argument("--seed", type=int, default=0)
    d = p.parse_args([])
    assert tuple(d.enc_mask_scale) == (0.85, 1.0) and tuple(d.pred_mask_scale) == (0.15, 0.2)
    assert tuple(d.aspect_ratio) == (0.75, 1.5)
    assert (d.num_enc_masks, d.num_pred_masks, d.min_keep, d.allow_overlap, d.mask_trim) == (1, 4, 10, False, "random")
    a = p.parse_args("--pred_mask_scale 0.1 0.3 --aspect_ratio 0.5 2 --num_pred_masks 2 --num_enc_masks 2 "
                     "--min_keep 4 --allow_overlap --enc_mask_scale 0.7 0.9 --seed 3".split())
    mc = masks.MaskCollator.from_args(a, grid=(20, 20), rank=2)
    assert (mc.pred_scale, mc.aspect, mc.enc_scale) == ((0.1, 0.3), (0.5, 2.0), (0.7, 0.9))
    assert (mc.n_pred, mc.n_enc, mc.min_keep, mc.allow_overlap, mc.seed, mc.rank) == (2, 2, 4, True, 3, 2)
    assert mc.grid == (20, 20)
    enc, pred = mc.sample(4, 0)
    assert len(enc) == 2 and len(pred) == 2
    bad = [dict(pred_scale=(0.0, 0.2)), dict(pred_scale=(0.3, 0.2)), dict(enc_scale=(0.85, 1.2)),
           dict(aspect=(-1, 1)), dict(aspect=(2, 1)), dict(trim="last"), dict(n_pred=0), dict(n_enc=0),
           dict(min_keep=-1),
           dict(grid=(4, 6)),  # default min_keep 10 > the 3-4 patch targets of a 4x6 grid
           dict(grid=(0, 16))]
    for kw in bad:
        with pytest.raises(base.UserError):
            masks.MaskCollator(**kw)
    # the smallest target at 16x16, scale 0.15, is 6x6=36 or 5x7=35 patches: blocks must keep MORE than min_keep
    # (I-JEPA's strict >), so min_keep 34 is fine and 35 is refused
    # (h = round(sqrt(38.4 r)), w = round(sqrt(38.4 / r)): r in [0.75, 0.94) gives 5 x 7 = 35)
    masks.MaskCollator(min_keep=34)
    with pytest.raises(base.UserError, match="min_keep"):
        masks.MaskCollator(min_keep=35)
    masks.MaskCollator(min_keep=0)  # 0: any non-empty block


def test_preview_png_on_real_xrays(tmp_path):
    paths = sorted((SAMPLE / "nih14" / "images").glob("*.jpg"))[:4]
    assert len(paths) == 4
    imgs = [np.asarray(Image.open(p).convert("L").resize((224, 224)), dtype=np.float32) / 255 for p in paths]
    images = torch.from_numpy(np.stack(imgs))[:, None].repeat(1, 3, 1, 1)
    images = (images - 0.5) / 0.25  # normalised like training input: the preview must undo any normalisation
    H = W = 16
    mc = masks.MaskCollator(grid=(H, W), seed=1)
    enc, pred = mc.sample(4, 0)
    out = masks.save_mask_preview(images, enc, pred, (H, W), tmp_path / "masks.png", n=3)
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    cell, pad, top = 16, 6, 18  # layout of save_mask_preview for a 16x16 grid
    assert png.shape[0] == top + H * cell + pad and png.shape[1] >= pad + 3 * (W * cell + pad)
    ctx, tgt = grids(enc, H, W).any(0), grids(pred, H, W)
    checked = {"ctx": 0, "tgt": 0, "none": 0}
    for i in range(3):
        for r in range(H):
            for c in range(W):
                px = png[top + r * cell + cell // 2, pad + i * (W * cell + pad) + c * cell + cell // 2]
                in_t = tgt[:, i, r, c]
                if ctx[i, r, c]:
                    assert px[2] > px[0] + 30, px  # tinted blue
                    checked["ctx"] += 1
                elif in_t.sum() == 1 and in_t[0]:
                    assert px[0] > px[2] + 30, px  # target 0 is tinted red
                    checked["tgt"] += 1
                elif not in_t.any():
                    assert px[0] == px[1] == px[2]  # untouched patch: the X-ray in grey
                    checked["none"] += 1
    assert min(checked.values()) > 0, checked
    # the X-ray itself shows through: grey patches differ from one another (not a blank panel)
    gray = png[top:top + H * cell, pad:pad + W * cell]
    assert gray.std() > 20
