"""
The paper's baselines that model.py's ViT cannot express, in plain PyTorch, with model.VisionTransformer's interface:

    tokens = enc(x)                                  # (B, prefix + N, D) final-normed tokens, N patch tokens
    feats = enc.forward_features(x, layers=[...])    # patch tokens of those stages, each (B, N, D) (segment.py)
    g = enc.global_embedding(x)                      # (B, D): CLS / pooled embedding (probe.py)
    enc.patch_size, enc.embed_dim, enc.blocks, enc.num_prefix_tokens, enc.cls_token, enc.config

build_encoder(config) rebuilds any of them (or the plain ViT) from its `config` dict.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import VisionTransformer


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x) (CLIP's weights were trained with it, not with erf GELU)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def swiglu_hidden(dim, mlp_ratio):
    """SwiGLU's width as DINOv2 computes it: 2/3 of int(dim * mlp_ratio), rounded up to 8 (4096 for ViT-g)."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLU(nn.Module):
    """DINOv2's SwiGLU feed-forward: w12 gives [gate, value], silu(gate) * value, then w3."""

    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = swiglu_hidden(dim, mlp_ratio)
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class ViTVariant(VisionTransformer):
    """model.VisionTransformer with CLIP's options (pre_norm: ln_pre on [CLS, patches]; act "quick_gelu"; no
    patch_bias; its final norm, ln_post, on every token) and DINOv2 ViT-g's (ffn "swiglu")."""

    def __init__(self, pre_norm=False, act="gelu", ffn="mlp", patch_bias=True, **kw):
        if ffn == "swiglu":  # build the plain MLPs one unit wide: they are replaced (ViT-g's would take 3 GB)
            ratio, kw["mlp_ratio"] = kw.get("mlp_ratio", 4.0), 1 / kw.get("embed_dim", 768)
        super().__init__(**kw)
        if ffn == "swiglu":
            self.config["mlp_ratio"] = ratio
        self.config.update(variant="vit", pre_norm=pre_norm, act=act, ffn=ffn, patch_bias=patch_bias)
        dim = self.embed_dim
        if not patch_bias:
            p = self.patch_embed.proj
            self.patch_embed.proj = nn.Conv2d(p.in_channels, dim, p.kernel_size, stride=p.stride, bias=False)
        for blk in self.blocks:
            if ffn == "swiglu":
                blk.mlp = SwiGLU(dim, self.config["mlp_ratio"])
            elif act == "quick_gelu":
                blk.mlp.act = QuickGELU()
            elif act != "gelu":
                raise ValueError(f"unknown activation {act!r}")
        self.norm_pre = nn.LayerNorm(dim, eps=self.config["eps"]) if pre_norm else None

    def embed(self, x, masks=None):
        x = super().embed(x, masks)
        return self.norm_pre(x) if self.norm_pre is not None else x


# ----------------------------------------------------------------------------------------------------------------
# ResNet-50 (BioViL / BioViL-T image trunk): torchvision's v1.5 (stride on the 3x3 conv)

class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50Encoder(nn.Module):
    """torchvision's ResNet-50 without its classifier, in torchvision's parameter names, as a frozen encoder (BatchNorm
    on running statistics): the final map (stride 32) is the patch tokens, its average the global embedding
    (hi-ml-multimodal's ImageEncoder). forward_features(layers) counts the 16 bottleneck blocks as layers (UPerNet
    takes 5, 8, 10, 16); each block's map is average-pooled to stride 32 and zero-padded to the final width, so every
    layer is one (B, N, 2048) token grid like a ViT's, with no added parameters (the decoder's 1x1 convs see the
    padded channels as constants)."""

    def __init__(self, layers=(3, 4, 6, 3), width=64, in_chans=3, img_size=224):
        super().__init__()
        self.config = dict(variant="resnet50", layers=list(layers), width=width, in_chans=in_chans, img_size=img_size)
        self.conv1, self.bn1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
        cin, stages = width, []
        for i, n in enumerate(layers):
            w = width * 2 ** i
            stages.append(nn.Sequential(Bottleneck(cin, w, stride=1 if i == 0 else 2),
                                        *[Bottleneck(w * 4, w) for _ in range(n - 1)]))
            cin = w * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.embed_dim, self.patch_size, self.num_heads, self.num_prefix_tokens, self.cls_token = cin, 32, 0, 0, None
        self.grid = (img_size // 32, img_size // 32)

    @property
    def blocks(self):
        return [b for s in (self.layer1, self.layer2, self.layer3, self.layer4) for b in s]

    def stem(self, x):
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of the ResNet stride 32")
        gray = x.shape[1] == 1 and self.conv1.in_channels > 1  # into an RGB stem: the same as replicating the channel
        x = F.conv2d(x, self.conv1.weight.sum(1, keepdim=True), stride=2, padding=3) if gray else self.conv1(x)
        return F.max_pool2d(F.relu(self.bn1(x)), 3, 2, 1)

    def feature_map(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return x

    def forward(self, x, masks=None):
        if masks is not None:
            raise ValueError("a ResNet has no patch tokens to mask")
        return self.feature_map(x).flatten(2).transpose(1, 2)

    def forward_features(self, x, layers=None, norm=False):
        """Token grids (B, N, D) of the bottleneck blocks in `layers` (1-based); norm: the ViT's interface, unused."""
        if layers is None:
            return self.forward(x)
        size = (x.shape[-2] // 32, x.shape[-1] // 32)
        x, blocks, out = self.stem(x), self.blocks, {}
        bad = [l for l in set(layers) if not 1 <= l <= len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range 1..{len(blocks)}")
        for i, b in enumerate(blocks[:max(layers)], start=1):
            x = b(x)
            if i in layers:
                m = x if x.shape[-2:] == size else F.adaptive_avg_pool2d(x, size)
                if m.shape[1] < self.embed_dim:
                    m = F.pad(m, (0, 0, 0, 0, 0, self.embed_dim - m.shape[1]))
                out[i] = m.flatten(2).transpose(1, 2)
        return [out[l] for l in layers]

    def global_embedding(self, x, last_layers=1):
        """Average of the final map (B, 2048); last_layers > 1 adds the averages of earlier blocks (zero-padded)."""
        if last_layers == 1:
            return self.feature_map(x).mean((2, 3))
        n = len(self.blocks)
        feats = self.forward_features(x, layers=list(range(n - last_layers + 1, n + 1)))
        return torch.cat([f.mean(1) for f in feats], dim=-1)


def build_encoder(config, attn="sdpa"):
    """An encoder from its `config` dict (what save_encoder stores): the plain ViT, a ViTVariant or a ResNet."""
    cfg = dict(config)
    variant = cfg.pop("variant", None)
    if variant == "resnet50":
        return ResNet50Encoder(**cfg)
    return (ViTVariant if variant == "vit" else VisionTransformer)(attn=attn, **cfg)
