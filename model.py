"""
The networks, in plain PyTorch: the Vision Transformer (context / target encoder), the I-JEPA predictor, and the
segmentation decoders (UPerNet, linear) that sit on a frozen ViT.

    from model import build_vit, Predictor
    enc = build_vit("vit_base", img_size=224, patch_size=14)   # ViT-B/14, 86M parameters (3-channel stem)
    tokens = enc(x)                                   # (B, 256, 768), final LayerNorm applied
    ctx = enc(x, masks=[idx])                         # only the patches listed in idx (B, K) go through the blocks
    feats = enc.forward_features(x, layers=[4, 6, 8, 12])   # patch tokens of those blocks (1-based), for UPerNet

Module and parameter names follow Meta's I-JEPA code (patch_embed.proj, blocks.N.attn.qkv, ...) so its checkpoints
load by name. Attention is one function, `attention()`, with three implementations chosen per module (set_attn).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VIT_CONFIGS = {  # name: (width, depth, heads)
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}


# ----------------------------------------------------------------------------------------------------------------
# attention: one entry point, three implementations

def attention(q, k, v, impl="sdpa"):
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (B, H, N, D); non-causal, no mask."""
    if impl == "triton":
        from triton_attn.attention import attention as triton_attention  # imported lazily: triton is optional on CPU
        return triton_attention(q, k, v)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if impl == "math":  # the scale on q (N x D multiplies, not N x N); softmax in q's dtype (it sums in fp32)
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    raise ValueError(f"unknown attention implementation {impl!r}: use triton, sdpa or math")


def default_attention(device, dtype=torch.float32):
    """triton on CUDA if its start-up self-check passes there (triton_attn/selfcheck.py), else sdpa; but math to
    train in bf16 / fp16 on a CPU, where SDPA's backward runs 2-3x slower than math (its forward alone is faster:
    the evaluations keep sdpa). README, Speed."""
    if device.type != "cuda":
        return "sdpa" if dtype == torch.float32 else "math"
    from triton_attn.selfcheck import default_attention as checked  # imported lazily: triton is optional on CPU
    return checked(device)


def set_attn(model, impl):
    """Switch every attention module in `model` to `impl` (triton | sdpa | math)."""
    if impl not in ("triton", "sdpa", "math"):
        raise ValueError(f"unknown attention implementation {impl!r}: use triton, sdpa or math")
    for m in model.modules():
        if isinstance(m, Attention):
            m.impl = impl
    return model


# ----------------------------------------------------------------------------------------------------------------
# position embeddings and masks

def sincos_pos_embed(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos embeddings (MAE / I-JEPA), (grid_h * grid_w, dim): first half encodes x, second half y."""
    assert dim % 4 == 0, "sin-cos position embeddings need a width divisible by 4"

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    yy, xx = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, xx), one_axis(dim // 2, yy)], axis=1)
    return torch.from_numpy(emb).float()


def resize_pos_embed(pos, old_hw, new_hw, antialias=False, offset=0.0):
    """Bicubic resize of patch-grid position embeddings (1, h*w, D) -> (1, H*W, D), in float32 (any CLS position is
    kept separately). antialias / offset reproduce the published DINOv2 variants exactly: Hugging Face Dinov2 (size,
    no antialias), Dinov2WithRegisters and Meta's register models (antialias), Meta's original DINOv2 code (scale
    factor (new + 0.1) / old, which moves the sampling grid slightly compared with giving the size)."""
    if tuple(old_hw) == tuple(new_hw):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, old_hw[0], old_hw[1], d).permute(0, 3, 1, 2)
    size = (dict(scale_factor=tuple((n + offset) / o for n, o in zip(new_hw, old_hw))) if offset
            else dict(size=tuple(new_hw)))
    grid = F.interpolate(grid.float(), mode="bicubic", align_corners=False, antialias=antialias, **size)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)


def apply_masks(x, masks):
    """Gather tokens x (B, N, D) at each index tensor in masks (each (B, K)); results stacked along the batch in
    mask order: [mask 0 for every image, mask 1 for every image, ...], as in I-JEPA."""
    out = [torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.size(-1))) for m in masks]
    return torch.cat(out, dim=0)


def repeat_interleave_batch(x, B, repeat):
    """[b0..bB-1 of chunk 0, ...] -> each chunk of B rows repeated `repeat` times in place (I-JEPA's helper)."""
    N = len(x) // B
    return torch.cat([torch.cat([x[i * B:(i + 1) * B] for _ in range(repeat)], dim=0) for i in range(N)], dim=0)


# ----------------------------------------------------------------------------------------------------------------
# transformer blocks

class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, impl="sdpa"):
        super().__init__()
        self.num_heads, self.impl = num_heads, impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attention(*qkv.unbind(0), self.impl)  # unbind: its backward is one stack, not 3 zero-fills and 2 adds
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT / DINOv2); only built when a loaded encoder has it."""

    def __init__(self, dim, init=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, layer_scale=None, impl="sdpa", eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, impl)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


INIT_SCHEMES = ("meta", "rescaled")


@torch.no_grad()
def _trunc_normal_(w, std=0.02, bound=2.0):
    """N(0, std) truncated at +-bound (absolute, as timm / Meta), drawn as a normal clamped to +-bound: at std 0.02
    the bounds are 100 sigma away, so the distribution is the same, but trunc_normal_'s inverse-CDF method in
    float32 maps a uniform draw of exactly -1 to erfinv(-1) = -inf, clamped to -2: about one weight per few million
    comes out at -2.0, a 100-sigma outlier (Meta's init of a ViT-S has one, in blocks.7.attn.qkv)."""
    assert bound >= 10 * std, "clamping only equals truncation when the bound is many sigma away"
    return w.normal_(0.0, std).clamp_(-bound, bound)


def init_weights(module, scheme="meta"):
    """(Re-)initialise every layer of `module` (an encoder, a predictor, or anything holding them) in place.

    scheme="meta" (the default, what RadJEPa and I-JEPA were trained with): every nn.Linear trunc_normal(std 0.02)
    with zero bias, every LayerNorm weight 1 / bias 0, the patch-embedding conv trunc_normal(std 0.02) / bias 0.
    That is the ViT's own _init_weights in Meta's code followed by helper.init_model, which re-initialises every
    Linear after construction and so undoes the per-layer rescale the constructors apply (fix_init_weight).
    scheme="rescaled" keeps that rescale: each block's residual output layers (attn.proj, mlp.fc2) are further
    divided by sqrt(2 * layer), as Meta's constructors leave them before init_model runs.
    CLS / register / mask tokens and the fixed position embeddings are not touched. Returns `module`."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}: use {' or '.join(INIT_SCHEMES)}")
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            _trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if scheme == "rescaled":
        for m in module.modules():  # per transformer stack: encoder blocks, predictor blocks
            blocks = getattr(m, "blocks", None) if isinstance(m, VisionTransformer) else \
                getattr(m, "predictor_blocks", None) if isinstance(m, Predictor) else None
            for i, blk in enumerate(blocks or []):
                blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))
    return module


# ----------------------------------------------------------------------------------------------------------------
# the encoder

class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        w = self.proj.weight
        if x.shape[1] == 1 and w.shape[1] > 1:
            # a grayscale X-ray into an RGB-trained stem: summing the kernel over colour is exactly the same as
            # replicating the gray channel, without materialising three copies of the image
            x = F.conv2d(x, w.sum(1, keepdim=True), self.proj.bias, stride=self.proj.stride)
        else:
            x = self.proj(x)
        # contiguous tokens: else every residual add keeps the conv's (B, D, N) layout, and each LayerNorm and Linear
        # of an unmasked forward copies its input
        return x.flatten(2).transpose(1, 2).contiguous()


class VisionTransformer(nn.Module):
    """ViT without a CLS token by default (JEPA encoders). The stem has 3 input channels by default, as in I-JEPA
    and the released RadJEPa weights; a 1-channel (grayscale) batch is accepted by either stem. CLS, register
    tokens, learned position embeddings and layer scale exist for the published encoders that have them (DINOv2,
    RAD-DINO). `self.config` holds the constructor arguments: an exported encoder stores them to be rebuilt."""

    def __init__(self, img_size=224, patch_size=14, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, cls_token=False, num_register_tokens=0, learned_pos=False,
                 layer_scale=None, eps=1e-6, interp_antialias=False, interp_offset=0.0, attn="sdpa", init="meta"):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           cls_token=cls_token, num_register_tokens=num_register_tokens, learned_pos=learned_pos,
                           layer_scale=layer_scale, eps=eps, interp_antialias=interp_antialias,
                           interp_offset=interp_offset)
        self.interp = dict(antialias=interp_antialias, offset=interp_offset)  # how pos_embed is resized (DINOv2)
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token and learned_pos else None
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens
                                else None)
        self.num_prefix_tokens = int(cls_token) + num_register_tokens
        pos = sincos_pos_embed(embed_dim, *self.grid).unsqueeze(0)
        # fixed sin-cos is a parameter with requires_grad=False (as in I-JEPA) so it travels in the state dict
        self.pos_embed = nn.Parameter(pos, requires_grad=learned_pos)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layer_scale, attn, eps)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        init_weights(self, init)
        for p in (self.cls_token, self.register_tokens):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def embed(self, x, masks=None):
        """Patchify and add positions (resized when the input is not at the training resolution); then keep only
        the patches in `masks` if given; then put CLS / register tokens in front."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)
        x = x + resize_pos_embed(self.pos_embed, self.grid, (H // self.patch_size, W // self.patch_size),
                                 **self.interp).to(x.dtype)
        if masks is not None:
            x = apply_masks(x, masks)
        prefix = []
        if self.cls_token is not None:
            cls = self.cls_token if self.cls_pos_embed is None else self.cls_token + self.cls_pos_embed
            prefix.append(cls.expand(x.shape[0], -1, -1))
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(x.shape[0], -1, -1))
        return torch.cat(prefix + [x], dim=1) if prefix else x

    def forward(self, x, masks=None):
        """Final-LayerNormed tokens (prefix tokens first, if any); with masks, only those patches (apply_masks)."""
        x = self.embed(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, x, layers=None, norm=False):
        """Patch tokens (prefix tokens dropped) of the blocks in `layers` (1-based, e.g. [4, 6, 8, 12]) as a list
        of (B, N, D); LayerNorm-ed with the final norm if norm=True. Without layers: the final normed tokens."""
        if layers is None:
            return self.forward(x)
        want, out = set(layers), {}
        bad = [l for l in want if not 1 <= l <= len(self.blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range 1..{len(self.blocks)}")
        x = self.embed(x)
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x)
            if i in want:
                y = x[:, self.num_prefix_tokens:]
                out[i] = self.norm(y) if norm else y
            if i == max(want):
                break  # blocks past the deepest requested layer are not needed
        return [out[l] for l in layers]

    def global_embedding(self, x, last_layers=1):
        """The image-level embedding used by the linear probe: CLS token when the encoder has one, otherwise the
        mean of the final patch tokens (JEPA encoders). last_layers > 1 concatenates that many final layers."""
        if last_layers == 1:
            t = self.forward(x)
            return t[:, 0] if self.cls_token is not None else t[:, self.num_prefix_tokens:].mean(1)
        x, outs = self.embed(x), []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - last_layers:
                t = self.norm(x)
                outs.append(t[:, 0] if self.cls_token is not None else t[:, self.num_prefix_tokens:].mean(1))
        return torch.cat(outs, dim=-1)


def build_vit(name="vit_base", **kw):
    """A ViT by size name (vit_tiny ... vit_huge); keyword arguments go to VisionTransformer."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(VIT_CONFIGS)}")
    dim, depth, heads = VIT_CONFIGS[name]
    return VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads, **kw)


# ----------------------------------------------------------------------------------------------------------------
# the I-JEPA predictor

class Predictor(nn.Module):
    """Narrow transformer that predicts target-encoder features at target positions from the context tokens.

    Context tokens are projected to the predictor width and given their positions; one learned mask token plus the
    position embedding of each target patch stands in for every target; the transformer runs on [context, targets]
    and the target slots, projected back to the encoder width, are the predictions."""

    def __init__(self, grid, embed_dim=768, pred_dim=384, depth=12, num_heads=12, mlp_ratio=4.0, attn="sdpa",
                 init="meta"):
        super().__init__()
        self.grid = tuple(grid)
        self.predictor_embed = nn.Linear(embed_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        pos = sincos_pos_embed(pred_dim, *self.grid).unsqueeze(0)
        self.predictor_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.predictor_blocks = nn.ModuleList(Block(pred_dim, num_heads, mlp_ratio, True, None, attn)
                                              for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_dim, embed_dim)
        init_weights(self, init)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, ctx, masks_ctx, masks_tgt):
        """ctx: context-encoder output (len(masks_ctx) * B, Kc, D); masks_*: lists of (B, K) patch indices.
        Returns predictions (len(masks_ctx) * len(masks_tgt) * B, Kt, D), ordered like apply_masks(target)."""
        n_ctx_masks = len(masks_ctx)
        B = len(ctx) // n_ctx_masks
        x = self.predictor_embed(ctx)
        pos = self.predictor_pos_embed.expand(B, -1, -1).to(x.dtype)
        x = x + apply_masks(pos, masks_ctx)
        n_ctx = x.shape[1]
        tgt = repeat_interleave_batch(apply_masks(pos, masks_tgt), B, repeat=n_ctx_masks)
        tgt = self.mask_token.to(x.dtype) + tgt
        x = torch.cat([x.repeat(len(masks_tgt), 1, 1), tgt], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        return self.predictor_proj(self.predictor_norm(x[:, n_ctx:]))


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------------------------
# segmentation decoders on a frozen ViT (segment.py): feature pyramid + UPerNet, and the linear baseline
#
# The ViT-B (768-d) UPerNet has the paper's Table 4 "39.3M" parameters: FeaturePyramid 7,081,728 + mmseg's UPerHead
# (channels 512, pool_scales (1, 2, 3, 6); BN affine parameters counted, running statistics are buffers) 32,256,000
# + 513 per class: 39.3M from 1 to 23 classes (tests/test_segment.py). mmseg's auxiliary FCNHead (+1.77M: 41.1M in
# all) is not in the paper's figure, nor in this code.

class ConvModule(nn.Sequential):
    """mmseg's ConvModule: conv without bias (the BN that follows has one) + BatchNorm + ReLU."""

    def __init__(self, cin, cout, k, padding=0):
        super().__init__(nn.Conv2d(cin, cout, k, padding=padding, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class FeaturePyramid(nn.Module):
    """BEiT's multi-scale adapter (mmseg BEiT backbone): a plain ViT has one stride (the patch size), UPerNet wants
    four. Layer features (in the order given, e.g. blocks 4, 6, 8, 12) become strides p/4, p/2, p, 2p: upsample x4
    by two 2x2 transposed convs with BN + GELU between, x2 by one, keep x1, max-pool x0.5."""

    def __init__(self, dim):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2)

    def forward(self, feats):
        assert len(feats) == 4, "the feature pyramid takes exactly four layers"
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


class UPerNet(nn.Module):
    """Unified Perceptual Parsing head (Xiao et al. 2018) as mmseg's UPerHead, on the BEiT feature pyramid.

    Input: four (B, dim, h, w) ViT feature maps (same h, w). The pyramid makes them four scales; the pyramid pooling
    module (average pools to 1, 2, 3, 6 cells) adds global context to the coarsest; an FPN (1x1 laterals, top-down
    sum, 3x3 convs) carries it back to the finest scale; all four levels are upsampled, concatenated and fused by a
    3x3 conv; dropout 0.1 and a 1x1 classifier give logits at stride p/4."""

    def __init__(self, dim, num_classes, channels=512, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        self.pyramid = FeaturePyramid(dim)
        n_levels = 4
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(dim, channels, 1))
                                         for s in pool_scales)
        self.bottleneck = ConvModule(dim + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(dim, channels, 1) for _ in range(n_levels - 1))
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in range(n_levels - 1))
        self.fpn_bottleneck = ConvModule(n_levels * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's classifier init
        nn.init.zeros_(self.conv_seg.bias)

    def psp_forward(self, x):
        size = x.shape[2:]
        pooled = [F.interpolate(m(x), size=size, mode="bilinear", align_corners=False) for m in self.psp_modules]
        return self.bottleneck(torch.cat([x] + pooled, dim=1))

    def forward(self, feats):
        feats = self.pyramid(feats)
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])] + [self.psp_forward(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse context added into each finer level
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="bilinear", align_corners=False)
        outs = [conv(l) for conv, l in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class LinearDecoder(nn.Module):
    """The linear baseline: a 1x1 conv (a per-patch linear classifier) on the last layer, dim + 1 parameters per
    class. Logits at the patch stride; SegModel upsamples them bilinearly."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.conv_seg = nn.Conv2d(dim, num_classes, 1)

    def forward(self, feats):
        return self.conv_seg(feats[-1])


class SegModel(nn.Module):
    """Frozen ViT + trainable decoder. The encoder runs under no_grad in eval mode whatever mode the decoder is in;
    its patch tokens from `layers` (1-based blocks) are LayerNorm-ed with the encoder's own final norm (as DINOv2's
    get_intermediate_layers(norm=True): every layer on one scale, no decoder parameters spent on it), reshaped to
    (B, D, H/p, W/p) and decoded; logits come back at the input's size."""

    def __init__(self, encoder, decoder, layers, norm=True):
        super().__init__()
        self.encoder, self.decoder, self.layers, self.norm = encoder, decoder, list(layers), norm
        self.encoder.eval().requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # frozen: dropout-free anyway, but keep any norm statistics fixed
        return self

    @torch.no_grad()
    def features(self, x):
        B, _, H, W = x.shape
        h, w = H // self.encoder.patch_size, W // self.encoder.patch_size
        feats = self.encoder.forward_features(x, layers=self.layers, norm=self.norm)
        return [f.transpose(1, 2).reshape(B, -1, h, w) for f in feats]

    def forward(self, x):
        logits = self.decoder([f.detach() for f in self.features(x)])
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
