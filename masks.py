"""
I-JEPA multi-block masking: which patches the context encoder sees and which target blocks the predictor must
predict, sampled per batch and returned as lists of (B, K) patch-index tensors for model.apply_masks.

    import masks
    mc = masks.MaskCollator(grid=(16, 16))              # 224 px / patch 14; I-JEPA defaults
    masks_enc, masks_pred = mc.sample(batch_size=128, step=0)
    # masks_enc: [LongTensor (B, Kc)] * n_enc     masks_pred: [LongTensor (B, Kt)] * n_pred

    loader = DataLoader(ds, batch_size=B, collate_fn=mc)  # ds yields (image (C,H,W), step) pairs
    images, masks_enc, masks_pred = next(iter(loader))

    masks.add_mask_args(parser); ...; mc = masks.MaskCollator.from_args(args, grid=vit.grid, rank=env.rank)
    masks.save_mask_preview(images, masks_enc, masks_pred, vit.grid, "out/pretrain/masks.png")

Sampling, as in I-JEPA (Assran et al. 2023, sec. 3): per batch one target block size (scale, aspect ratio) and one
square context block size; per image n_pred target blocks and n_enc context blocks at random positions; each
context loses every patch that is in a target (no trivial copying) unless allow_overlap; a context left with
min_keep patches or fewer is re-drawn (every block must keep MORE than min_keep: I-JEPA's strict `>`), and after 20
failed positions one target constraint is dropped (I-JEPA's fallback). Finally every mask of a kind is cut to the
shortest in the batch so the lists stack into tensors.

Differences from facebookresearch/ijepa src/masks/multiblock.py, each a fix:
  * the top-left corner is drawn from [0, H - h] inclusive (the reference draws randint(0, H - h), exclusive, and
    also forces h < H, so the last row and column of the grid were never inside any block);
  * scale and aspect ratio are drawn independently (the reference reuses one uniform for both, so big blocks were
    always tall);
  * cutting a context to the batch minimum keeps a random subset of its patches, not the first K in row-major order
    (which systematically dropped the bottom of every context; --mask_trim first restores it for comparisons);
  * randomness is a pure function of (seed, rank, step), not a counter shared by DataLoader workers: masks are
    identical after --resume, independent of --num_workers, and differ across ranks and steps.
"""
import numpy as np
import torch

import base

RETRIES = 20  # positions tried per context block before relaxing one target constraint (I-JEPA's timeout)
# I-JEPA's ViT-H/14 ImageNet configuration: the defaults of MaskCollator and of its flags
DEFAULTS = dict(enc_scale=(0.85, 1.0), pred_scale=(0.15, 0.2), aspect=(0.75, 1.5), n_enc=1, n_pred=4, min_keep=10,
                allow_overlap=False)


class MaskCollator:
    """Samples I-JEPA multi-block masks for a patch grid; also usable as a DataLoader collate_fn."""

    def __init__(self, grid=(16, 16), enc_scale=DEFAULTS["enc_scale"], pred_scale=DEFAULTS["pred_scale"],
                 aspect=DEFAULTS["aspect"], n_enc=DEFAULTS["n_enc"], n_pred=DEFAULTS["n_pred"],
                 min_keep=DEFAULTS["min_keep"], allow_overlap=False, trim="random", seed=0, rank=0):
        self.H, self.W = (int(grid), int(grid)) if np.isscalar(grid) else (int(grid[0]), int(grid[1]))
        self.grid = (self.H, self.W)
        self.enc_scale, self.pred_scale = tuple(map(float, enc_scale)), tuple(map(float, pred_scale))
        self.aspect = tuple(map(float, aspect))
        self.n_enc, self.n_pred, self.min_keep = int(n_enc), int(n_pred), int(min_keep)
        self.allow_overlap, self.seed, self.rank = bool(allow_overlap), int(seed), int(rank)
        self.trim = trim
        self.relaxed = 0  # context masks in the last sample() that needed the fallback (diagnostics, tests)
        self._validate()

    # ------------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_args(cls, args, grid, rank=0):
        return cls(grid=grid, enc_scale=args.enc_mask_scale, pred_scale=args.pred_mask_scale,
                   aspect=args.aspect_ratio, n_enc=args.num_enc_masks, n_pred=args.num_pred_masks,
                   min_keep=DEFAULTS["min_keep"] if args.min_keep is None else args.min_keep,
                   allow_overlap=args.allow_overlap,
                   trim=getattr(args, "mask_trim", "random"), seed=getattr(args, "seed", 0), rank=rank)

    def _validate(self):
        E = base.UserError
        if self.H < 1 or self.W < 1:
            raise E(f"patch grid {self.H}x{self.W} is empty; check --img_size and --patch_size")
        for flag, (lo, hi) in (("--enc_mask_scale", self.enc_scale), ("--pred_mask_scale", self.pred_scale)):
            if not (0 < lo <= hi <= 1):
                raise E(f"{flag} {lo} {hi}: need 0 < MIN <= MAX <= 1 (fractions of the patch grid)")
        if not (0 < self.aspect[0] <= self.aspect[1]):
            raise E(f"--aspect_ratio {self.aspect[0]} {self.aspect[1]}: need 0 < MIN <= MAX (height / width)")
        if self.n_enc < 1 or self.n_pred < 1:
            raise E("--num_enc_masks and --num_pred_masks must be at least 1")
        if self.seed < 0 or self.rank < 0:
            raise E(f"--seed must be >= 0 (got seed {self.seed}, rank {self.rank})")
        if self.trim not in ("random", "first"):
            raise E(f"--mask_trim {self.trim}: choose random or first")
        if self.min_keep < 0:
            raise E(f"--min_keep must be at least 0 (got {self.min_keep}; blocks keep more than min_keep patches)")
        # the sampler could loop forever if a block can never hold more than min_keep patches: refuse such settings
        for flag, scale, aspect in (("--pred_mask_scale", self.pred_scale, self.aspect),
                                    ("--enc_mask_scale", self.enc_scale, (1.0, 1.0))):
            smallest = self._smallest_block(scale[0], aspect)
            if smallest <= self.min_keep:
                raise E(f"--min_keep {self.min_keep}: every block must keep more than that, but the smallest block "
                        f"{flag} {scale[0]} allows on a {self.H}x{self.W} patch grid has {smallest} patches; lower "
                        f"--min_keep (to at most {smallest - 1}) or raise {flag}")

    def block_size(self, scale, aspect):
        """(h, w) in patches of a block covering `scale` of the grid with height/width `aspect` (numpy-vectorised).
        Rounded half-up, then clipped to the grid: a block may span the whole height or width (h <= H)."""
        area = np.asarray(scale, dtype=np.float64) * self.H * self.W
        h = np.floor(np.sqrt(area * aspect) + 0.5).clip(1, self.H).astype(np.int64)
        w = np.floor(np.sqrt(area / np.asarray(aspect, dtype=np.float64)) + 0.5).clip(1, self.W).astype(np.int64)
        return h, w

    def _smallest_block(self, scale_min, aspect):
        # h and w both grow with scale, so the minimum area is at scale_min; over the aspect range the area is
        # piecewise constant between the ratios where sqrt(area*r) or sqrt(area/r) crosses k + 1/2, so checking
        # those ratios, the midpoints between them and the ends finds the exact minimum
        a = scale_min * self.H * self.W
        k = np.arange(max(self.H, self.W) + 2) + 0.5
        r = np.concatenate([aspect, k ** 2 / a, a / k ** 2])
        r = np.unique(r[(r >= aspect[0]) & (r <= aspect[1])])
        r = np.concatenate([r, (r[1:] + r[:-1]) / 2])
        h, w = self.block_size(scale_min, r)
        return int((h * w).min())

    def summary(self):
        ctx = "overlapping the targets" if self.allow_overlap else "minus the targets"
        return (f"masks: {self.n_pred} target block(s) of {self.pred_scale[0]:.0%}-{self.pred_scale[1]:.0%} of the "
                f"{self.H}x{self.W} patch grid (aspect {self.aspect[0]}-{self.aspect[1]}), {self.n_enc} context "
                f"block(s) of {self.enc_scale[0]:.0%}-{self.enc_scale[1]:.0%} {ctx}, min_keep {self.min_keep}")

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    def _corners(self, rng, shape, h, w):
        """Uniform top-left corners of h x w blocks, up to H - h inclusive: every grid cell is reachable."""
        return rng.integers(0, self.H - h + 1, size=shape), rng.integers(0, self.W - w + 1, size=shape)

    def _paint(self, top, left, h, w):
        """Boolean (*top.shape, H*W) masks of the h x w blocks at the given corners."""
        rows, cols = np.arange(self.H), np.arange(self.W)
        in_r = (rows >= top[..., None]) & (rows < top[..., None] + h)
        in_c = (cols >= left[..., None]) & (cols < left[..., None] + w)
        return (in_r[..., :, None] & in_c[..., None, :]).reshape(*top.shape, self.H * self.W)

    def _to_indices(self, rng, m):
        """(M, N) boolean masks -> (M, K) int64 ascending patch indices, K = the fewest patches in any row. Longer
        rows keep a uniformly random subset of K (trim="random") or, as I-JEPA does, their first K (trim="first")."""
        counts = m.sum(1)
        K = int(counts.min())
        if (counts == K).all():
            return np.nonzero(m)[1].reshape(len(m), K)
        if self.trim == "random":
            keys = rng.random(m.shape)
        else:
            keys = np.broadcast_to(np.arange(m.shape[1], dtype=np.float64), m.shape).copy()
        keys[~m] = np.inf  # outside the mask: never among the K smallest keys
        idx = np.argpartition(keys, K - 1, axis=1)[:, :K]
        idx.sort(axis=1)
        return idx

    def sample(self, batch_size, step):
        """Masks for one batch: (masks_enc, masks_pred), lists of n_enc / n_pred LongTensors (B, K); a pure function
        of (seed, rank, step)."""
        B, N = int(batch_size), self.H * self.W
        rng = np.random.default_rng([self.seed, self.rank, int(step)])

        u = rng.random(3)  # one block size per batch for the targets and one for the contexts
        lo, hi = self.pred_scale
        ph, pw = self.block_size(lo + u[0] * (hi - lo), self.aspect[0] + u[1] * (self.aspect[1] - self.aspect[0]))
        lo, hi = self.enc_scale
        eh, ew = self.block_size(lo + u[2] * (hi - lo), 1.0)  # square, as in I-JEPA

        tgt = self._paint(*self._corners(rng, (B, self.n_pred), ph, pw), ph, pw)  # (B, n_pred, N)
        taken = tgt.any(1) if not self.allow_overlap else np.zeros((B, N), dtype=bool)  # patches a context may not use

        # the I-JEPA retry loop, vectorised: draw all RETRIES corners at once and take the first whose block keeps
        # more than min_keep patches outside the targets (the same distribution as drawing one at a time until
        # success). Patches kept = block area - target patches inside it, read off a summed-area table of the target
        # union in O(1) per candidate instead of painting B * RETRIES full masks
        top, left = self._corners(rng, (B, self.n_enc, RETRIES), eh, ew)
        S = np.zeros((B, self.H + 1, self.W + 1), dtype=np.int32)
        S[:, 1:, 1:] = taken.reshape(B, self.H, self.W).cumsum(1).cumsum(2)
        bi = np.arange(B)[:, None, None]
        inside = S[bi, top + eh, left + ew] - S[bi, top, left + ew] - S[bi, top + eh, left] + S[bi, top, left]
        ok = eh * ew - inside > self.min_keep  # (B, n_enc, RETRIES)
        first = ok.argmax(-1)[..., None]  # first valid retry (0 where none is valid; fixed below)
        top, left = np.take_along_axis(top, first, -1)[..., 0], np.take_along_axis(left, first, -1)[..., 0]
        ctx = self._paint(top, left, eh, ew) & ~taken[:, None]  # (B, n_enc, N)

        # I-JEPA's fallback; with no target constraint left the context is a bare block, which _validate guarantees
        # holds more than min_keep patches
        self.relaxed = 0
        for b, e in zip(*np.nonzero(~ok.any(-1))):
            self.relaxed += 1
            for keep in range(self.n_pred - 1, -1, -1):
                c = self._paint(*self._corners(rng, (RETRIES,), eh, ew), eh, ew) & ~tgt[b, :keep].any(0)
                good = c.sum(-1) > self.min_keep
                if good.any():
                    ctx[b, e] = c[good.argmax()]
                    break

        enc = self._to_indices(rng, ctx.transpose(1, 0, 2).reshape(self.n_enc * B, N))
        pred = self._to_indices(rng, tgt.transpose(1, 0, 2).reshape(self.n_pred * B, N))
        masks_enc = [torch.from_numpy(np.ascontiguousarray(x)) for x in enc.reshape(self.n_enc, B, -1)]
        masks_pred = [torch.from_numpy(np.ascontiguousarray(x)) for x in pred.reshape(self.n_pred, B, -1)]
        return masks_enc, masks_pred

    def __call__(self, batch):
        """DataLoader collate_fn: batch is a list of (image (C,H,W), step) with one step for the whole batch (the
        sampler supplies it, so masks depend on the optimiser step, not on which worker collates)."""
        steps = {int(s) for _, s in batch}
        if len(steps) != 1:
            raise ValueError(f"MaskCollator: one batch carries several steps {sorted(steps)}; the sampler must "
                             "give every item of a batch the same step")
        images = torch.stack([img for img, _ in batch])
        return (images, *self.sample(len(batch), steps.pop()))


def add_mask_args(p):
    """Flags for every masking parameter, defaults DEFAULTS."""
    g = p.add_argument_group("masking (I-JEPA multi-block)")
    g.add_argument("--enc_mask_scale", type=float, nargs=2, default=DEFAULTS["enc_scale"], metavar=("MIN", "MAX"),
                   help="context block size as a fraction of the patch grid")
    g.add_argument("--pred_mask_scale", type=float, nargs=2, default=DEFAULTS["pred_scale"], metavar=("MIN", "MAX"),
                   help="target block size as a fraction of the patch grid")
    g.add_argument("--aspect_ratio", type=float, nargs=2, default=DEFAULTS["aspect"], metavar=("MIN", "MAX"),
                   help="target block height / width")
    g.add_argument("--num_enc_masks", type=int, default=DEFAULTS["n_enc"], help="context blocks per image")
    g.add_argument("--num_pred_masks", type=int, default=DEFAULTS["n_pred"], help="target blocks per image")
    g.add_argument("--min_keep", type=int, default=DEFAULTS["min_keep"],
                   help="every context and target block keeps MORE than this many patches (I-JEPA's strict >)")
    g.add_argument("--allow_overlap", action="store_true", help="let the context include target patches")
    g.add_argument("--mask_trim", default="random", choices=["random", "first"],
                   help="how contexts are cut to the batch's shortest: a random subset of patches, or the first ones "
                        "in row-major order as in the I-JEPA code (biased against the image bottom)")
    return g


# ----------------------------------------------------------------------------------------------------------------
# picture: what the masking does (pretrain.py writes out_dir/masks.png at start)

CONTEXT_RGB = (40, 110, 255)
TARGET_RGB = [(255, 60, 60), (255, 170, 0), (0, 200, 90), (220, 60, 220), (0, 210, 230), (255, 255, 80)]


def save_mask_preview(images, masks_enc, masks_pred, grid, path, n=4):
    """PNG of the first n images: context patches tinted blue, each target block tinted and outlined in its own
    colour; untouched patches (neither seen nor predicted) stay grey. images: (B, C, H, W), any normalisation."""
    from PIL import Image, ImageDraw

    H, W = (grid, grid) if np.isscalar(grid) else grid
    n = min(n, len(images))
    cell = max(4, round(256 / max(H, W)))  # about 256 px per panel whatever the grid
    pad, top = 6, 18
    caption = ("blue: context the encoder sees; coloured outlines: target blocks to predict; "
               "grey: neither (outside the context block, or trimmed so all contexts have one length)")
    text_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(caption)) + 2 * pad
    sheet = Image.new("RGB", (max(n * (W * cell + pad) + pad, text_w), H * cell + top + pad), (255, 255, 255))
    ImageDraw.Draw(sheet).text((pad, 3), caption, fill=(0, 0, 0))
    for i in range(n):
        x = images[i].detach().float().cpu().mean(0).numpy()  # grayscale whatever the channel count
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
        gray = Image.fromarray((x * 255).astype(np.uint8)).resize((W * cell, H * cell), Image.BILINEAR)
        rgb = np.asarray(gray.convert("RGB"), dtype=np.float32)
        # per-pixel patch index, so any mask (not only rectangles) can be painted by fancy indexing
        pid = (np.arange(H * cell)[:, None] // cell) * W + np.arange(W * cell)[None, :] // cell
        for m in masks_enc:
            sel = np.isin(pid, m[i].cpu().numpy())
            rgb[sel] = 0.55 * rgb[sel] + 0.45 * np.array(CONTEXT_RGB)
        outlines = []
        for t, m in enumerate(masks_pred):
            colour = TARGET_RGB[t % len(TARGET_RGB)]
            on = np.zeros(H * W, dtype=bool)
            on[m[i].cpu().numpy()] = True
            sel = on[pid]
            rgb[sel] = 0.7 * rgb[sel] + 0.3 * np.array(colour)
            outlines.append((on.reshape(H, W), colour))
        panel = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(panel)
        for on, colour in outlines:  # outline = patch edges whose neighbour is outside the block
            p = np.pad(on, 1)
            for r, c in zip(*np.nonzero(on)):
                x0, y0, x1, y1 = c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1
                if not p[r, c + 1]:  # nothing above: top edge
                    d.line([(x0, y0), (x1, y0)], fill=colour, width=2)
                if not p[r + 2, c + 1]:  # nothing below
                    d.line([(x0, y1), (x1, y1)], fill=colour, width=2)
                if not p[r + 1, c]:  # nothing to the left
                    d.line([(x0, y0), (x0, y1)], fill=colour, width=2)
                if not p[r + 1, c + 2]:  # nothing to the right
                    d.line([(x1, y0), (x1, y1)], fill=colour, width=2)
        sheet.paste(panel, (pad + i * (W * cell + pad), top))
    sheet.save(path)
    return path
