"""Loading published encoders (encoders.py) against independent references: transformers' own Dinov2 models (a
test-only dependency), a float64 re-implementation of Meta's I-JEPA ViT forward, and key names transcribed from
Meta's I-JEPA / DINOv2 code. Inputs are real chest X-rays from sample_data."""
import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import downstream
import encoders
from base import UserError
from conftest import SAMPLE
from encoders import load_encoder, save_encoder
from model import VisionTransformer, resize_pos_embed

TOL = 1e-5


def xray(size, mean, std, n=2):
    """n real X-rays, bicubic-resized to size x size, normalised per channel (len(mean) channels)."""
    paths = sorted((SAMPLE / "nih14" / "images").glob("*.jpg"))[:n]
    out = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("L").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        out.append(torch.stack([(torch.from_numpy(a) - m) / s for m, s in zip(mean, std)]))
    return torch.stack(out)


def perturb(model, seed=0):
    """Random biases, norms and layer scales too (HF initialises them to constants), so a swapped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# facebook/dinov2-*'s preprocessor_config.json (BitImageProcessor): shortest edge 256, centre crop 224, ImageNet
DINOV2_PROCESSOR = ('{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true, "image_mean": [0.485, 0.456, '
                    '0.406], "image_std": [0.229, 0.224, 0.225], "image_processor_type": "BitImageProcessor", '
                    '"resample": 3, "size": {"shortest_edge": 256}}')
RAD_DINO_PROCESSOR = ('{"crop_size": {"height": 518, "width": 518}, "do_center_crop": true, "image_mean": [0.5307, '
                      '0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583], "size": {"shortest_edge": 518}}')


def make_hf(kind, tmp, processor=True, **cfg):
    """A randomly initialised transformers Dinov2Model (or Dinov2WithRegistersModel, 4 registers), saved with
    save_pretrained beside facebook/dinov2's preprocessor_config.json (processor=False: without it): the reference
    implementation, and the files a user would point --encoder at."""
    transformers = pytest.importorskip("transformers")  # a test-only dependency
    torch.manual_seed(0)
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56)
    base.update(cfg)
    if kind == "registers":
        if not hasattr(transformers, "Dinov2WithRegistersModel"):
            pytest.skip("this transformers has no Dinov2WithRegistersModel")
        m = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **base))
    else:
        m = transformers.Dinov2Model(transformers.Dinov2Config(**base))
    perturb(m.eval())
    m.save_pretrained(tmp)
    if processor:
        (Path(tmp) / "preprocessor_config.json").write_text(DINOV2_PROCESSOR)
    return m


def hf_forward(m, x):
    with torch.no_grad():
        return m(pixel_values=x, output_hidden_states=True)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face Dinov2 / Dinov2WithRegisters

@pytest.mark.parametrize("kind,cfg", [("dinov2", {}), ("dinov2", {"qkv_bias": False, "mlp_ratio": 2}),
                                      ("registers", {})])
def test_hf_dinov2_same_features(tmp_path, kind, cfg):
    m = make_hf(kind, tmp_path / "hf", **cfg)
    p = argparse.ArgumentParser()
    encoders.add_encoder_args(p)
    vit, info = encoders.load_encoder_from_args(p.parse_args(["--encoder", str(tmp_path / "hf")]))
    assert info.format == "dinov2-hf" and "auto-detected" in info.source
    assert (info.img_size, info.mean, info.in_chans) == (224, encoders.IMAGENET_MEAN, 3)
    R = 4 if kind == "registers" else 0
    assert vit.num_prefix_tokens == 1 + R
    for size in (56, 84):  # native (4 x 4 positions) and resized to 6 x 6 (HF's interpolate_pos_encoding)
        x = xray(size, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
        ref = hf_forward(m, x)
        with torch.no_grad():
            out, cls = vit(x), vit.global_embedding(x)
            feats = vit.forward_features(x, layers=[1, 2])
        assert out.shape == ref.last_hidden_state.shape
        torch.testing.assert_close(cls, ref.pooler_output, atol=TOL, rtol=0)
        torch.testing.assert_close(out[:, 1 + R:], ref.last_hidden_state[:, 1 + R:], atol=TOL, rtol=0)
        torch.testing.assert_close(out[:, 1:1 + R], ref.last_hidden_state[:, 1:1 + R], atol=TOL, rtol=0)
        for f, h in zip(feats, ref.hidden_states[1:]):  # intermediate blocks (segment.py's UPerNet inputs)
            torch.testing.assert_close(f, h[:, 1 + R:], atol=TOL, rtol=0)
        assert ref.pooler_output.std() > 0.5  # features of a real image, not near-zero noise


def test_hf_in_memory_names_and_preprocessor_config(tmp_path):
    """transformers 5's own parameter names (q_proj, o_proj) load too; a preprocessor_config.json beside the
    weights (as in the microsoft/rad-dino snapshot) sets the preprocessing; --encoder_format rad-dino forces it."""
    m = make_hf("dinov2", tmp_path / "ref", processor=False)
    d = tmp_path / "mem"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
    assert any(".q_proj." in k for k in load_file(str(d / "model.safetensors")))
    (d / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    with pytest.raises(UserError, match="--encoder_format dinov2-hf or --encoder_format rad-dino"):
        load_encoder(str(d / "model.safetensors"))  # no processor file: DINOv2 or RAD-DINO? Never a guess
    vit, info = load_encoder(str(d / "model.safetensors"), fmt="dinov2-hf")
    assert (info.img_size, info.mean) == (224, encoders.IMAGENET_MEAN)
    x = xray(56, [0.5307] * 3, [0.2583] * 3)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), hf_forward(m, x).last_hidden_state, atol=TOL, rtol=0)
    (d / "preprocessor_config.json").write_text(RAD_DINO_PROCESSOR)
    _, info = load_encoder(str(d))
    assert (info.img_size, info.mean, info.std) == (518, [0.5307] * 3, [0.2583] * 3)
    _, info = load_encoder(str(tmp_path / "ref"), fmt="rad-dino")
    assert (info.format, info.img_size, info.mean, info.in_chans) == ("rad-dino", 518, [0.5307] * 3, 3)


# ----------------------------------------------------------------------------------------------------------------
# Meta's original DINOv2 naming (facebookresearch/dinov2: DinoVisionTransformer, NestedTensorBlock, LayerScale)

def to_meta_dinov2(sd, depth, regs, chunks=0):
    """A Hugging Face Dinov2 state dict rewritten in Meta's names; chunks > 0: FSDP block chunks (blocks.C.N)."""
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "mask_token": sd["embeddings.mask_token"], "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"]}
    if regs:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    for i in range(depth):
        b, h = (f"blocks.{i // (depth // chunks)}.{i}." if chunks else f"blocks.{i}."), f"encoder.layer.{i}."
        for wb in ("weight", "bias"):
            out[b + "attn.qkv." + wb] = torch.cat([sd[f"{h}attention.attention.{n}.{wb}"] for n in ("query", "key", "value")])
            out[b + "attn.proj." + wb] = sd[f"{h}attention.output.dense.{wb}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{b}{n}.{wb}"] = sd[f"{h}{n}.{wb}"]
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = sd[h + "layer_scale1.lambda1"], sd[h + "layer_scale2.lambda1"]
    return out


@pytest.mark.parametrize("kind,wrap", [("dinov2", "flat"), ("dinov2", "teacher_chunked"), ("registers", "flat")])
def test_meta_dinov2_naming_loads_identically(tmp_path, kind, wrap):
    # 64-d heads, as every published DINOv2: Meta's files do not store the head count
    m = make_hf(kind, tmp_path / "hf", hidden_size=128, num_attention_heads=2)
    hf_vit, _ = load_encoder(str(tmp_path / "hf"))
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    regs = 4 if kind == "registers" else 0
    meta = to_meta_dinov2(sd, 2, regs, chunks=2 if wrap == "teacher_chunked" else 0)
    if wrap == "teacher_chunked":  # a DINOv2 training checkpoint: heads beside the backbone
        meta = {"teacher": {**{"backbone." + k: v for k, v in meta.items()}, "dino_head.last_layer.weight": torch.zeros(3, 3)}}
    torch.save(meta, tmp_path / "dinov2.pth")
    vit, info = load_encoder(str(tmp_path / "dinov2.pth"))
    assert info.format == "dinov2" and (info.img_size, info.in_chans) == (224, 3)
    a, b = vit.state_dict(), hf_vit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = xray(56, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), hf_forward(m, x).last_hidden_state, atol=TOL, rtol=0)
    # off the native grid Meta's code resizes positions its own way: registers models antialias with an output
    # size (like HF's Dinov2WithRegisters), the others use scale factor (new + 0.1) / old (transcribed below)
    pos = vit.pos_embed
    mine = resize_pos_embed(pos, (4, 4), (6, 6), **vit.interp)
    grid = pos.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    if regs:
        meta_ref = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True)
    else:
        meta_ref = F.interpolate(grid, scale_factor=(6.1 / 4, 6.1 / 4), mode="bicubic", antialias=False)
        assert (mine - resize_pos_embed(pos, (4, 4), (6, 6))).abs().max() > 1e-4  # the offset does change values
    torch.testing.assert_close(mine, meta_ref.permute(0, 2, 3, 1).reshape(1, 36, -1), atol=1e-6, rtol=0)


def rad_dino_folder(tmp, processor=True):
    """microsoft/rad-dino's hub folder as it is today: the Hugging Face Dinov2 files (config.json, model.safetensors,
    preprocessor_config.json) plus what it added for fine-tuning: backbone_compatible.safetensors (the same weights
    in Meta's DINOv2 naming, mask token included), dino_head.safetensors and the training configs. Returns the
    transformers reference model."""
    m = make_hf("dinov2", tmp, processor=False, hidden_size=128, num_attention_heads=2)
    if processor:
        (tmp / "preprocessor_config.json").write_text(RAD_DINO_PROCESSOR)
    meta = to_meta_dinov2(load_file(str(tmp / "model.safetensors")), 2, 0)
    save_file({k: v.contiguous() for k, v in meta.items()}, str(tmp / "backbone_compatible.safetensors"))
    save_file({"mlp.0.weight": torch.randn(16, 128), "last_layer.weight_g": torch.ones(8, 1)},
              str(tmp / "dino_head.safetensors"))
    (tmp / "vitb14_cxr.yaml").write_text("student:\n  arch: vit_base\n  patch_size: 14\n")
    (tmp / "ssl_default_config.yaml").write_text("train:\n  batch_size_per_gpu: 64\n")
    return m


@pytest.mark.parametrize("processor", [True, False])
def test_rad_dino_hub_folder_and_its_dinov2_code_checkpoint(tmp_path, processor):
    """Today's RAD-DINO folder, and its backbone_compatible.safetensors on its own, load as RAD-DINO (518 px, its
    own statistics), never as a generic DINOv2 at 224 px; both give transformers' features."""
    m = rad_dino_folder(tmp_path / "rad-dino", processor)
    lone = tmp_path / "elsewhere"
    lone.mkdir()
    (lone / "backbone_compatible.safetensors").write_bytes(
        (tmp_path / "rad-dino" / "backbone_compatible.safetensors").read_bytes())
    x = xray(56, [0.5307] * 3, [0.2583] * 3)
    ref = hf_forward(m, x).last_hidden_state
    for path in (tmp_path / "rad-dino", tmp_path / "rad-dino" / "backbone_compatible.safetensors",
                 lone / "backbone_compatible.safetensors"):
        vit, info = load_encoder(str(path))
        assert info.format == "rad-dino" and "auto-detected" in info.source, (path, info)
        assert (info.img_size, info.resize_to, info.mean, info.std) == (518, 518, [0.5307] * 3,
                                                                                    [0.2583] * 3)
        with torch.no_grad():
            torch.testing.assert_close(vit(x), ref, atol=TOL, rtol=0)


def test_formats_that_cannot_be_told_apart_ask_for_encoder_format(tmp_path):
    """Where two formats share a layout but not a preprocessing, auto-detection says so in one line, never guesses."""
    make_hf("dinov2", tmp_path / "hf", processor=False)  # a Dinov2 folder with no processor file: DINOv2 or RAD-DINO?
    with pytest.raises(UserError, match=r"pass --encoder_format dinov2-hf or --encoder_format rad-dino$"):
        load_encoder(str(tmp_path / "hf"))
    assert load_encoder(str(tmp_path / "hf"), fmt="rad-dino")[1].img_size == 518
    assert load_encoder(str(tmp_path / "hf"), fmt="dinov2-hf")[1].img_size == 224
    meta = to_meta_dinov2(load_file(str(tmp_path / "hf" / "model.safetensors")), 2, 0)
    save_file({k: v.contiguous() for k, v in meta.items()}, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(UserError, match=r"--encoder_format dinov2 or --encoder_format rad-dino$"):
        load_encoder(str(tmp_path / "renamed.safetensors"))  # DINOv2 naming, but Meta ships .pth and no RAD-DINO name
    torch.save({"visual.conv1.weight": torch.zeros(768, 3, 32, 32), "visual.class_embedding": torch.zeros(768),
                "visual.transformer.resblocks.0.ln_1.weight": torch.ones(768)}, tmp_path / "b32.pt")
    with pytest.raises(UserError, match=r"ViT-B/32.*--encoder_format clip or --encoder_format chexzero$"):
        load_encoder(str(tmp_path / "b32.pt"))  # OpenAI's CLIP ViT-B/32 and CheXzero share it
    from test_baselines import timm_vit_state
    torch.save({"model": timm_vit_state()}, tmp_path / "vit16.pth")  # a CLS-token ViT/16, no MAE decoder
    with pytest.raises(UserError, match=r"--encoder_format mrm or --encoder_format dinov2$"):
        load_encoder(str(tmp_path / "vit16.pth"))


# ----------------------------------------------------------------------------------------------------------------
# I-JEPA (facebookresearch/ijepa src/models/vision_transformer.py) and the released RadJEPa layout

IJEPA_BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                    "mlp.fc2.weight", "mlp.fc2.bias"]


def ijepa_state(dim=192, depth=2, patch=16, grid=4, in_chans=3, seed=0):
    """Random tensors under I-JEPA's VisionTransformer parameter names and shapes (mlp_ratio 4)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"patch_embed.proj.weight": r(dim, in_chans, patch, patch), "patch_embed.proj.bias": r(dim),
          "pos_embed": r(1, grid * grid, dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    shapes = {"attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim),
              "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,), "mlp.fc2.weight": (dim, 4 * dim)}
    for i in range(depth):
        for k in IJEPA_BLOCK_KEYS:
            t = r(*shapes.get(k, (dim,)))
            sd[f"blocks.{i}.{k}"] = 1 + t if k.startswith("norm") and k.endswith("weight") else t
    return sd


def ijepa_forward64(sd, x, heads, depth, cls=False):
    """Meta's I-JEPA ViT forward in float64, written from its source: patchify, + pos_embed, pre-norm blocks
    (eps 1e-6), final norm. No CLS token; cls=True puts timm's / MAE's in front of the patches before pos_embed
    (its slot first), which is all their ViT does differently."""
    sd = {k: v.double() for k, v in sd.items()}
    ln = lambda t, n: F.layer_norm(t, t.shape[-1:], sd[n + ".weight"], sd[n + ".bias"], 1e-6)  # noqa: E731
    lin = lambda t, n: t @ sd[n + ".weight"].T + sd[n + ".bias"]  # noqa: E731
    t = F.conv2d(x.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    if cls:
        t = torch.cat([sd["cls_token"].expand(len(t), -1, -1), t], 1)
    t = t + sd["pos_embed"]
    B, N, C = t.shape
    for i in range(depth):
        b = f"blocks.{i}."
        q, k, v = lin(ln(t, b + "norm1"), b + "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1) @ v
        t = t + lin(a.transpose(1, 2).reshape(B, N, C), b + "attn.proj")
        t = t + lin(F.gelu(lin(ln(t, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(t, "norm")


def ijepa_checkpoint(target, online):
    """The dict I-JEPA's train.py saves (DDP-wrapped modules, hence 'module.')."""
    mod = lambda sd: {"module." + k: v for k, v in sd.items()}  # noqa: E731
    return {"encoder": mod(online), "predictor": {"module.mask_token": torch.zeros(1, 1, 8)},
            "target_encoder": mod(target), "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "scaler": None, "epoch": 300, "loss": 0.123, "batch_size": 128, "world_size": 16, "lr": 1e-3}


def test_ijepa_checkpoint_loads_and_round_trips(tmp_path):
    target, online = ijepa_state(seed=0), ijepa_state(seed=1)
    torch.save(ijepa_checkpoint(target, online), tmp_path / "IN1K-vit.tiny.16.pth.tar")
    vit, info = load_encoder(str(tmp_path / "IN1K-vit.tiny.16.pth.tar"))
    assert info.format == "ijepa" and (info.img_size, info.mean, info.in_chans) == (64, encoders.IMAGENET_MEAN, 3)
    assert vit.cls_token is None and vit.num_heads == 3 and vit.patch_size == 16 and len(vit.blocks) == 2
    own = vit.state_dict()
    assert own.keys() == target.keys() and all(torch.equal(own[k], target[k]) for k in own)  # target, not online
    x = xray(64, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    with torch.no_grad():
        out = vit(x)
    torch.testing.assert_close(out.double(), ijepa_forward64(target, x, heads=3, depth=2), atol=TOL, rtol=0)
    save_encoder(vit, str(tmp_path / "enc.safetensors"), **{k: getattr(info, k) for k in ("img_size", "mean", "std")})
    vit2, info2 = load_encoder(str(tmp_path / "enc.safetensors"))
    assert info2.format == "radjepa-encoder" and info2.mean == encoders.IMAGENET_MEAN
    assert all(torch.equal(vit2.state_dict()[k], own[k]) for k in own)
    with torch.no_grad():
        assert torch.equal(vit2(x), out)


@pytest.mark.parametrize("layout", ["encoder_module_encoder", "both_backbone", "target_only_compiled"])
def test_radjepa_release_format(tmp_path, layout):
    torch.manual_seed(0)
    ref = perturb(VisionTransformer(img_size=56, patch_size=14, embed_dim=192, depth=2, num_heads=3)).eval()
    sd, other = ref.state_dict(), perturb(VisionTransformer(img_size=56, patch_size=14, embed_dim=192, depth=2,
                                                            num_heads=3), seed=1).state_dict()
    pre = lambda d, p: {p + k: v for k, v in d.items()}  # noqa: E731
    ck = {"encoder_module_encoder": {"encoder": pre(sd, "module.encoder.")},
          "both_backbone": {"encoder": pre(other, "backbone."), "target_encoder": pre(sd, "backbone."), "epoch": 100},
          "target_only_compiled": {"target_encoder": pre(sd, "_orig_mod.")}}[layout]
    torch.save(ck, tmp_path / "jepa_encoder.pth.tar")
    vit, info = load_encoder(str(tmp_path / "jepa_encoder.pth.tar"))
    # the release was trained with Meta's I-JEPA code: ImageNet mean / std on RGB
    assert info.format == "radjepa" and (info.img_size, info.in_chans) == (56, 3)
    assert (info.mean, info.std) == (encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    assert all(torch.equal(vit.state_dict()[k], sd[k]) for k in sd)
    x = xray(56, info.mean, info.std)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), ref(x), atol=TOL, rtol=0)
    g = xray(56, [0.4], [0.2])  # one grayscale channel into the 3-channel stem is the gray image replicated
    with torch.no_grad():
        torch.testing.assert_close(vit(g), ref(g.expand(-1, 3, -1, -1)), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# refusals: wrong keys, code in pickles, bad flags

def test_wrong_or_missing_key_is_named(tmp_path):
    t = ijepa_state()
    bad = dict(t)
    del bad["blocks.1.mlp.fc2.bias"]
    torch.save(ijepa_checkpoint(bad, bad), tmp_path / "missing.pth.tar")
    with pytest.raises(UserError, match=r"missing keys blocks\.1\.mlp\.fc2\.bias"):
        load_encoder(str(tmp_path / "missing.pth.tar"))
    extra = {**t, "blocks.0.attn.q_norm.weight": torch.ones(192)}
    torch.save(ijepa_checkpoint(extra, extra), tmp_path / "extra.pth.tar")
    with pytest.raises(UserError, match=r"unexpected keys blocks\.0\.attn\.q_norm\.weight"):
        load_encoder(str(tmp_path / "extra.pth.tar"))
    shape = {**t, "norm.bias": torch.zeros(100)}
    torch.save(ijepa_checkpoint(shape, shape), tmp_path / "shape.pth.tar")
    with pytest.raises(UserError, match=r"shape mismatch norm\.bias \(100,\)"):
        load_encoder(str(tmp_path / "shape.pth.tar"))
    # Hugging Face: a renamed key is reported in HF's own naming, both the one missing and the one not understood
    make_hf("dinov2", tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sd["encoder.layer.1.layer_scale2.gamma"] = sd.pop("encoder.layer.1.layer_scale2.lambda1")
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing keys encoder\.layer\.1\.layer_scale2\.lambda1; "
                                        r"unexpected keys encoder\.layer\.1\.layer_scale2\.gamma"):
        load_encoder(str(tmp_path / "hf"))


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_pickle_with_code_is_refused_unexecuted(tmp_path, how):
    marker = tmp_path / "pwned"
    obj = {"target_encoder": {"pos_embed": [0.0]}, "x": Exploit(marker)}
    path = tmp_path / "evil.pth.tar"
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)  # protocol 2: the GLOBAL opcode is what gets refused
    for fmt in ("auto", "ijepa", "dinov2"):
        with pytest.raises(UserError, match=r"refused: unpickling it would call posix\.system"):
            load_encoder(str(path), fmt=fmt)
    assert not marker.exists()


def test_preset_overrides_and_bad_flags(tmp_path):
    make_hf("dinov2", tmp_path / "hf")
    p = argparse.ArgumentParser()
    encoders.add_encoder_args(p)
    args = p.parse_args(["--encoder", str(tmp_path / "hf"), "--encoder_format", "rad-dino",
                         "--enc_img_size", "112", "--enc_mean", "0.5", "--enc_std", "0.25"])
    vit, info = encoders.load_encoder_from_args(args)
    assert (info.img_size, info.mean, info.std, info.in_chans) == (112, [0.5], [0.25], 1)
    with torch.no_grad():
        assert vit(xray(112, info.mean, info.std)).shape == (2, 1 + 64, 64)
    with pytest.raises(UserError, match="multiple of the patch size 14"):
        load_encoder(str(tmp_path / "hf"), enc_img_size=100)
    with pytest.raises(UserError, match="same number"):
        load_encoder(str(tmp_path / "hf"), enc_mean=[0.1, 0.2], enc_std=[0.1, 0.2, 0.3])
    with pytest.raises(UserError, match="no such file"):
        load_encoder(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a checkpoint that can be read safely"):
        load_encoder(str(tmp_path / "junk.pth"))
    with pytest.raises(SystemExit):  # argparse rejects an unknown format name
        p.parse_args(["--encoder_format", "clipp"])
    with pytest.raises(UserError, match="closest is clip-hf"):
        load_encoder(str(tmp_path / "hf"), fmt="clip_hf")


# ----------------------------------------------------------------------------------------------------------------
# the evaluations run on a foreign-format encoder (a tiny Hugging Face Dinov2, preprocessed by its preset)

def small_kermany_csv(tmp_path, n=10):
    import csv
    with open(SAMPLE / "kermany" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pick = sum(([r for r in rows if r["label"] == lab][:n] for lab in ("normal", "bacterial", "viral")), [])
    out = tmp_path / "kermany.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "path": str(SAMPLE / "kermany" / r["path"])} for r in pick)
    return out


def test_probe_with_hf_dinov2_registers(tmp_path, monkeypatch):
    probe, data = pytest.importorskip("probe"), pytest.importorskip("data")
    monkeypatch.chdir(tmp_path)
    m = make_hf("registers", tmp_path / "hf")
    res = probe.main(["--csv", str(small_kermany_csv(tmp_path)), "--label_cols", "pneumonia", "--subject_col",
                      "patient", "--folds", "2", "--max_steps", "20", "--num_workers", "0", "--encoder",
                      str(tmp_path / "hf"), "--out_dir", str(tmp_path / "probe")])
    assert res["encoder_format"] == "dinov2-hf" and str(tmp_path / "hf") in res["encoder"]
    # DINOv2's card: shorter side 256, centre crop 224 (downstream.crop_frac)
    assert res["preprocess"] == {"img_size": 224, "mean": encoders.IMAGENET_MEAN, "std": encoders.IMAGENET_STD,
                                 "crop_frac": 224 / 256}
    assert res["feature_dim"] == 64 and np.isfinite(res["agg"]["auroc"]["mean"])
    # the probe's embedding of an image is transformers' pooler output (CLS after the final layernorm)
    cached = torch.load(next((tmp_path / "probe" / "features").glob("*.pt")), weights_only=True)
    pre = data.Preprocess(224, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    x = torch.stack([pre(downstream.center_crop(data.read_image(p), 224 / 256)) for p in cached["paths"][:3]])
    torch.testing.assert_close(cached["feats"][:3], hf_forward(m, x).pooler_output, atol=1e-4, rtol=0)


def test_segment_with_ijepa_checkpoint(tmp_path, monkeypatch):
    segment = pytest.importorskip("segment")
    monkeypatch.chdir(tmp_path)
    torch.save(ijepa_checkpoint(ijepa_state(), ijepa_state(seed=1)), tmp_path / "ijepa.pth.tar")
    res = segment.main(["--encoder", str(tmp_path / "ijepa.pth.tar"), "--decoder", "linear", "--max_steps", "2",
                        "--batch_size", "4", "--num_workers", "0", "--n_overlays", "1", "--n_boot", "20",
                        "--out_dir", str(tmp_path / "seg")])
    assert res["encoder_format"] == "ijepa" and res["img_size"] == 64  # the checkpoint's own resolution
    assert res["layers"] == [2] and 0 <= res["test"]["mean_dice"] <= 1
    assert (tmp_path / "seg" / "results.json").exists()


def test_report_with_radjepa_release(tmp_path, monkeypatch):
    report = pytest.importorskip("report")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    vit = perturb(VisionTransformer(img_size=56, patch_size=14, embed_dim=192, depth=2, num_heads=3))
    torch.save({"target_encoder": {"module." + k: v for k, v in vit.state_dict().items()}}, tmp_path / "jepa_encoder.pth.tar")
    res = report.main(["--encoder", str(tmp_path / "jepa_encoder.pth.tar"), "--max_steps", "2", "--num_workers", "0",
                       "--lm_layers", "1", "--lm_dim", "32", "--lm_heads", "2", "--max_new_tokens", "4",
                       "--n_boot", "20", "--out_dir", str(tmp_path / "rep")])
    assert res["encoder_format"] == "radjepa"
    assert res["preprocess"] == {"img_size": 56, "mean": encoders.IMAGENET_MEAN, "std": encoders.IMAGENET_STD}
    assert res["n_test"] > 0 and (tmp_path / "rep" / "predictions.csv").exists()


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face IJepaModel: the export every pretraining run writes, and Meta's hub layout

def tiny_jepa(in_chans=3, seed=0):
    torch.manual_seed(seed)
    return perturb(VisionTransformer(img_size=56, patch_size=14, in_chans=in_chans, embed_dim=64, depth=2,
                                     num_heads=4), seed).eval()


@pytest.mark.parametrize("in_chans", [3, 1])
def test_export_hf_loads_in_transformers_with_same_features(tmp_path, in_chans):
    transformers = pytest.importorskip("transformers")
    vit = tiny_jepa(in_chans)
    old = os.umask(0o022)
    try:
        encoders.export_hf(vit, str(tmp_path / "hf"))
        save_encoder(vit, str(tmp_path / "encoder.safetensors"))
    finally:
        os.umask(old)
    for f in ("hf/config.json", "hf/model.safetensors", "hf/preprocessor_config.json", "encoder.safetensors"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o644, f  # readable by group and others, as the umask says
    assert not [f for f in os.listdir(tmp_path / "hf") if ".tmp" in f]
    m = transformers.IJepaModel.from_pretrained(str(tmp_path / "hf")).eval()  # no project code involved
    x = xray(56, [encoders.CXR_MEAN], [encoders.CXR_STD])  # the preset: gray, CXR statistics
    with torch.no_grad():
        ref = m(pixel_values=x.expand(-1, 3, -1, -1)).last_hidden_state  # HF processors give RGB
        torch.testing.assert_close(vit(x), ref, atol=TOL, rtol=0)
    pp = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    assert (pp.size["height"], list(pp.image_mean), list(pp.image_std)) == (56, [encoders.CXR_MEAN] * 3, [encoders.CXR_STD] * 3)
    back, info = load_encoder(str(tmp_path / "hf"))  # and it comes back in as an ijepa-hf folder
    assert info.format == "ijepa-hf" and (info.img_size, info.mean) == (56, [encoders.CXR_MEAN] * 3)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, atol=TOL, rtol=0)


def test_export_loads_into_timm_with_the_same_features(tmp_path):
    """The README's lines: the project's encoder.safetensors into timm's VisionTransformer (no class token, average
    pool of the final-normed patch tokens), with no code from this project: the same tokens and embedding."""
    import json
    timm = pytest.importorskip("timm")  # test-only (it needs torchvision)
    import safetensors
    import safetensors.torch
    vit = tiny_jepa()
    save_encoder(vit, str(tmp_path / "encoder.safetensors"))
    p = str(tmp_path / "encoder.safetensors")
    # -- the README's three lines --
    c = json.loads(safetensors.safe_open(p, "pt").metadata()["config"])
    t = timm.models.VisionTransformer(**{k: c[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                         "num_heads", "mlp_ratio", "qkv_bias")}, class_token=False,
                                      global_pool="avg", fc_norm=False, num_classes=0)
    t.load_state_dict(safetensors.torch.load_file(p))
    # --
    x = xray(56, [encoders.CXR_MEAN], [encoders.CXR_STD])
    with torch.no_grad():
        t.eval()
        torch.testing.assert_close(t.forward_features(x.expand(-1, 3, -1, -1)), vit(x), atol=TOL, rtol=0)
        torch.testing.assert_close(t(x.expand(-1, 3, -1, -1)), vit.global_embedding(x), atol=TOL, rtol=0)


def test_hf_ijepa_folder_same_features(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.IJepaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   image_size=56, patch_size=14, layer_norm_eps=1e-6)
    m = perturb(transformers.IJepaModel(cfg).eval())
    m.save_pretrained(tmp_path / "ijepa")  # the layout of facebook/ijepa_vith14_1k
    vit, info = load_encoder(str(tmp_path / "ijepa"))
    assert info.format == "ijepa-hf" and vit.cls_token is None and vit.config["mlp_ratio"] == 2
    assert (info.img_size, info.mean) == (56, encoders.IMAGENET_MEAN)
    x = xray(56, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), m(pixel_values=x).last_hidden_state, atol=TOL, rtol=0)
        x2 = xray(84, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)  # off the native grid: HF's bicubic resize
        torch.testing.assert_close(vit(x2), m(pixel_values=x2, interpolate_pos_encoding=True).last_hidden_state,
                                   atol=TOL, rtol=0)
    # transformers 5's in-memory names (layers.N.attention.q_proj, ...), as a user's own save_file would write them
    (tmp_path / "mem").mkdir()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "mem" / "model.safetensors"))
    (tmp_path / "mem" / "config.json").write_text((tmp_path / "ijepa" / "config.json").read_text())
    vit3, _ = load_encoder(str(tmp_path / "mem"))
    assert any(".attention.q_proj." in k for k in m.state_dict())
    assert all(torch.equal(vit3.state_dict()[k], v) for k, v in vit.state_dict().items())


def test_radjepa_hub_snapshot_folder_never_runs_its_code(tmp_path):
    vit0 = tiny_jepa()
    snap, marker = tmp_path / "RadJEPA", tmp_path / "imported"
    snap.mkdir()
    torch.save({"encoder": {"module." + k: v for k, v in vit0.state_dict().items()}, "epoch": 10},
               snap / "jepa_encoder.pth.tar")
    (snap / "config.json").write_text('{"model_type": "radjepa", "auto_map": {"AutoModel": '
                                      '"modeling_radjepa.RadJEPAEncoder"}, "image_size": 56, "num_attention_heads": 4}')
    (snap / "modeling_radjepa.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    vit, info = load_encoder(str(snap))
    assert not marker.exists()
    assert info.format == "radjepa" and (info.img_size, info.mean, info.std) == \
        (56, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    x = xray(56, info.mean, info.std)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), vit0(x), atol=TOL, rtol=0)


def test_pretrain_writes_hf_folder(tmp_path, monkeypatch):
    pretrain, transformers = pytest.importorskip("pretrain"), pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    pretrain.main(["--model", "vit_tiny", "--img_size", "56", "--batch_size", "4", "--pred_depth", "1", "--pred_dim",
                   "48", "--num_workers", "0", "--min_keep", "1", "--max_steps", "1", "--out_dir", str(tmp_path / "run"),
                   "--data_dir", str(SAMPLE / "nih14")])
    vit, info = load_encoder(str(tmp_path / "run" / "encoder.safetensors"))
    m = transformers.IJepaModel.from_pretrained(str(tmp_path / "run" / "hf")).eval()
    x = xray(56, info.mean, info.std)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), m(pixel_values=x.expand(-1, 3, -1, -1)).last_hidden_state, atol=TOL, rtol=0)
