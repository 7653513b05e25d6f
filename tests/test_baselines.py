"""Loading the other baselines of the paper's tables (encoders.py + backbones.py): DINOv2's SwiGLU ViT-g, CLIP
(Hugging Face and OpenAI), CheXzero, BiomedCLIP, MRM and BioViL-T, each against transformers' own model or a float64
re-implementation; code in their pickles refused unexecuted; every one run through probe, segment and report.
The shared helpers and references live in test_encoders.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import downstream
import data
import encoders
from base import UserError
from encoders import load_encoder
from test_encoders import (TOL, Exploit, hf_forward, ijepa_forward64, ijepa_state, make_hf, perturb,
                           small_kermany_csv, tiny_jepa, to_meta_dinov2, xray)


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 ViT-g's SwiGLU feed-forward (Hugging Face and Meta's naming)

def test_dinov2_swiglu_hf_and_meta(tmp_path):
    m = make_hf("dinov2", tmp_path / "hf", hidden_size=128, num_attention_heads=2, use_swiglu_ffn=True)
    vit, info = load_encoder(str(tmp_path / "hf"))
    assert info.format == "dinov2-hf" and vit.config["ffn"] == "swiglu"
    x = xray(56, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    ref = hf_forward(m, x)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), ref.last_hidden_state, atol=TOL, rtol=0)
        torch.testing.assert_close(vit.global_embedding(x), ref.pooler_output, atol=TOL, rtol=0)
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    swi = {k: v for k, v in sd.items() if ".mlp." in k}
    meta = to_meta_dinov2({**sd, **{k.replace("weights_in", "fc1").replace("weights_out", "fc2"): v
                                    for k, v in swi.items()}}, 2, 0)
    meta = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in meta.items()}
    torch.save(meta, tmp_path / "dinov2_vitg14_pretrain.pth")  # Meta's names: blocks.N.mlp.w12 / w3
    vit2, info2 = load_encoder(str(tmp_path / "dinov2_vitg14_pretrain.pth"))
    assert info2.format == "dinov2" and info2.resize == "shortest_edge+center_crop"
    with torch.no_grad():
        torch.testing.assert_close(vit2(x), ref.last_hidden_state, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# CLIP: transformers' CLIPVisionModel / CLIPModel, and OpenAI's state dict (CLIP ViT-L/14, CheXzero's ViT-B/32)

def make_clip(tmp, full=False, width=64, heads=4):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    v = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2, num_attention_heads=heads,
             image_size=56, patch_size=14)
    if full:
        m = transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=v, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, vocab_size=99), projection_dim=16))
        perturb(m.eval()).save_pretrained(tmp)
        return m.vision_model
    m = perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**v)).eval())
    m.save_pretrained(tmp)
    return getattr(m, "vision_model", m)  # transformers 4 wraps it, 5 does not


def clip_ref(vm, x):
    """transformers' CLIP: tokens = post_layernorm(last hidden state); pooled = post_layernorm(CLS)."""
    with torch.no_grad():
        out = vm(pixel_values=x)
        return vm.post_layernorm(out.last_hidden_state), out.pooler_output


@pytest.mark.parametrize("full", [False, True])
def test_clip_hf_same_features(tmp_path, full):
    vm = make_clip(tmp_path / "clip", full)
    vit, info = load_encoder(str(tmp_path / "clip"))
    assert info.format == "clip-hf" and (info.img_size, info.mean) == (56, encoders.CLIP_MEAN)
    assert (info.resize, info.resize_to) == ("shortest_edge+center_crop", 56)
    if full:  # openai/clip-vit-large-patch14-336's processor file (the older integer sizes)
        (tmp_path / "clip" / "preprocessor_config.json").write_text(
            '{"crop_size": 336, "do_center_crop": true, "do_normalize": true, "do_resize": true, "image_mean": '
            '[0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, '
            '"size": 336}')
        info = load_encoder(str(tmp_path / "clip"))[1]
        assert (info.img_size, info.resize_to, info.preset) == (336, 336, "preprocessor_config.json")
    x = xray(56, encoders.CLIP_MEAN, encoders.CLIP_STD)
    tokens, pooled = clip_ref(vm, x)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), tokens, atol=TOL, rtol=0)
        torch.testing.assert_close(vit.global_embedding(x), pooled, atol=TOL, rtol=0)


def to_openai_clip(sd, depth, pre="vision_model."):
    """transformers' CLIP vision weights rewritten in OpenAI's names (openai/CLIP model.py VisionTransformer),
    plus the text tower and projections a full OpenAI file holds."""
    e = pre + "embeddings."
    out = {"visual.class_embedding": sd[e + "class_embedding"], "visual.conv1.weight": sd[e + "patch_embedding.weight"],
           "visual.positional_embedding": sd[e + "position_embedding.weight"], "visual.proj": torch.randn(128, 16),
           "token_embedding.weight": torch.randn(99, 32), "ln_final.weight": torch.ones(32),
           "text_projection": torch.randn(32, 16), "logit_scale": torch.tensor(4.6), "input_resolution": torch.tensor(56)}
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for wb in ("weight", "bias"):
            out[f"visual.{a}.{wb}"] = sd[f"{pre}{b}.{wb}"]
    for i in range(depth):
        h, o = f"{pre}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for wb in ("weight", "bias"):
            out[f"{o}attn.in_proj_{wb}"] = torch.cat([sd[f"{h}self_attn.{n}_proj.{wb}"] for n in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{o}{a}.{wb}"] = sd[f"{h}{b}.{wb}"]
    return out


def test_openai_clip_state_dict_and_chexzero(tmp_path):
    vm = make_clip(tmp_path / "clip", width=128, heads=2)  # OpenAI's files do not store heads: CLIP's are 64-d
    sd = {k: v.clone() for k, v in load_file(str(tmp_path / "clip" / "model.safetensors")).items()}
    torch.save(to_openai_clip(sd, 2, pre=""), tmp_path / "ViT-L-14.state_dict.pt")
    x = xray(56, encoders.CLIP_MEAN, encoders.CLIP_STD)
    tokens, pooled = clip_ref(vm, x)
    for fmt in ("auto", "chexzero"):
        vit, info = load_encoder(str(tmp_path / "ViT-L-14.state_dict.pt"), fmt=fmt)
        with torch.no_grad():
            torch.testing.assert_close(vit(x), tokens, atol=TOL, rtol=0)
            torch.testing.assert_close(vit.global_embedding(x), pooled, atol=TOL, rtol=0)
    assert load_encoder(str(tmp_path / "ViT-L-14.state_dict.pt"))[1].format == "clip"
    assert info.mean == pytest.approx([101.48761 / 255] * 3) and info.resize == "square"
    scripted = torch.jit.script(torch.nn.Linear(2, 2))  # OpenAI's ViT-L-14.pt is a TorchScript archive
    scripted.save(str(tmp_path / "ViT-L-14.pt"))
    with pytest.raises(UserError, match="TorchScript archive"):
        load_encoder(str(tmp_path / "ViT-L-14.pt"), fmt="clip")


# ----------------------------------------------------------------------------------------------------------------
# timm naming: BiomedCLIP (open_clip, visual.trunk.*) and MRM (MAE ViT-B/16 with its decoder), against float64

def timm_vit_state(dim=64, depth=2, patch=16, grid=4, seed=0):
    sd = ijepa_state(dim=dim, depth=depth, patch=patch, grid=grid, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    sd["cls_token"] = 0.1 * torch.randn(1, 1, dim, generator=g)
    sd["pos_embed"] = 0.1 * torch.randn(1, 1 + grid * grid, dim, generator=g)
    return sd


def timm_forward64(sd, x, heads, depth):
    """timm's / MAE's VisionTransformer in float64 (written out from timm's source): I-JEPA's with a CLS token."""
    return ijepa_forward64(sd, x, heads, depth, cls=True)


def write_biomedclip(folder, sd, evil=None):
    folder.mkdir()
    ck = {**{"visual.trunk." + k: v for k, v in sd.items()}, "visual.head.proj.weight": torch.randn(16, 64),
          "text.transformer.embeddings.word_embeddings.weight": torch.randn(10, 8), "logit_scale": torch.tensor(4.6)}
    if evil is not None:
        ck["x"] = evil
    torch.save(ck, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(
        '{"model_cfg": {"embed_dim": 16, "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_pool": "", '
        '"timm_proj": "linear", "image_size": 64}}, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], '
        '"std": [0.26862954, 0.26130258, 0.27577711]}}')


def test_biomedclip_and_mrm_against_float64(tmp_path):
    sd = timm_vit_state()
    write_biomedclip(tmp_path / "BiomedCLIP", sd)
    x = xray(64, encoders.CLIP_MEAN, encoders.CLIP_STD)
    ref = timm_forward64(sd, x, heads=1, depth=2)  # width 64: one 64-d head
    vit, info = load_encoder(str(tmp_path / "BiomedCLIP"))
    assert info.format == "biomedclip" and (info.img_size, info.mean) == (64, encoders.CLIP_MEAN)
    with torch.no_grad():
        torch.testing.assert_close(vit(x).double(), ref, atol=TOL, rtol=0)
        torch.testing.assert_close(vit.global_embedding(x).double(), ref[:, 0], atol=TOL, rtol=0)
    mrm = {"model": {**sd, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
                     "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_pred.weight": torch.randn(768, 32),
                     "bert_encoder.model.embeddings.word_embeddings.weight": torch.randn(9, 8),
                     "bert_mlp.weight": torch.randn(384, 64)}}  # model_mrm.py's MRM: MAE + the report branch
    torch.save(mrm, tmp_path / "MRM.pth")
    vit, info = load_encoder(str(tmp_path / "MRM.pth"))
    assert info.format == "mrm" and (info.img_size, info.mean, info.resize_to) == (64, [0.4978] * 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(vit(x).double(), ref, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# BioViL-T: hi-ml-multimodal's ImageModel, a torchvision ResNet-50 trunk under encoder.encoder.*

def resnet_state(layers=(1, 1, 1, 1), width=8, seed=0):
    """Random tensors under torchvision ResNet (Bottleneck) names, BN running statistics included."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(n, cout, cin, k):
        sd[n + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5

    def bn(n, c):
        sd[n + ".weight"], sd[n + ".bias"] = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
        sd[n + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[n + ".running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[n + ".num_batches_tracked"] = torch.tensor(100)
    conv("conv1", width, 3, 7)
    bn("bn1", width)
    cin = width
    for s, n in enumerate(layers, start=1):
        w = width * 2 ** (s - 1)
        for b in range(n):
            p = f"layer{s}.{b}."
            conv(p + "conv1", w, cin, 1), bn(p + "bn1", w), conv(p + "conv2", w, w, 3), bn(p + "bn2", w)
            conv(p + "conv3", 4 * w, w, 1), bn(p + "bn3", 4 * w)
            if b == 0:
                conv(p + "downsample.0", 4 * w, cin, 1), bn(p + "downsample.1", 4 * w)
            cin = 4 * w
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, cin, generator=g), torch.zeros(1000)
    return sd


def resnet_forward64(sd, x, layers):
    """torchvision's ResNet-50 forward (v1.5, eval-mode BN) in float64, from its source; returns the last map."""
    sd = {k: v.double() for k, v in sd.items()}
    bn = lambda t, n: F.batch_norm(t, sd[n + ".running_mean"], sd[n + ".running_var"], sd[n + ".weight"],  # noqa
                                   sd[n + ".bias"], False, 0.0, 1e-5)
    t = F.max_pool2d(F.relu(bn(F.conv2d(x.double(), sd["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for s, n in enumerate(layers, start=1):
        for b in range(n):
            p, stride = f"layer{s}.{b}.", (2 if s > 1 and b == 0 else 1)
            y = F.relu(bn(F.conv2d(t, sd[p + "conv1.weight"]), p + "bn1"))
            y = F.relu(bn(F.conv2d(y, sd[p + "conv2.weight"], stride=stride, padding=1), p + "bn2"))
            y = bn(F.conv2d(y, sd[p + "conv3.weight"]), p + "bn3")
            idt = bn(F.conv2d(t, sd[p + "downsample.0.weight"], stride=stride), p + "downsample.1") \
                if p + "downsample.0.weight" in sd else t
            t = F.relu(y + idt)
    return t


def biovil_checkpoint(sd):
    """What hi-ml-multimodal's ImageModel.state_dict() holds for BioViL-T: the trunk, the temporal pooler, the
    projector."""
    return {**{"encoder.encoder." + k: v for k, v in sd.items()},
            "encoder.backbone_to_vit.weight": torch.randn(256, 256, 1, 1), "encoder.missing_previous_emb": torch.zeros(1, 256, 1, 1),
            "encoder.vit_pooler.blocks.0.attn.proj.weight": torch.randn(256, 256),
            "projector.model.0.weight": torch.randn(128, 512, 1, 1)}


def test_biovil_t_resnet_against_float64(tmp_path):
    sd = resnet_state()
    torch.save(biovil_checkpoint(sd), tmp_path / "biovil_t_image_model_proj_size_128.pt")
    vit, info = load_encoder(str(tmp_path / "biovil_t_image_model_proj_size_128.pt"))
    assert info.format == "biovil-t" and (info.img_size, info.resize_to, info.mean) == (448, 512, [0.0] * 3)
    x = xray(64, [0.0] * 3, [1.0] * 3)
    ref = resnet_forward64(sd, x, (1, 1, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(vit(x).double(), ref.flatten(2).transpose(1, 2), atol=TOL, rtol=0)
        torch.testing.assert_close(vit.global_embedding(x).double(), ref.mean((2, 3)), atol=TOL, rtol=0)
        torch.testing.assert_close(vit(x[:, :1]), vit(x), atol=TOL, rtol=0)  # gray into the RGB stem
        feats = vit.forward_features(x, layers=[1, 2, 3, 4])
    assert [tuple(f.shape) for f in feats] == [(2, 4, 256)] * 4 and torch.equal(feats[-1], vit(x))


def test_crop_preprocess_is_shortest_edge_then_centre_crop():
    """A preset with resize_to (CLIP, RAD-DINO, ...) keeps img_size / resize_to of the shorter side, centred
    (downstream.crop_frac, what probe.py and segment.py apply); report.py's whole-image resize squashes it all in."""
    img = np.zeros((100, 200), np.float32)
    img[:, 50:150] = 1.0  # the centre square is white, the sides black
    info = encoders.feed(50, [0.0], [1.0], resize_to=50)
    pre = data.Preprocess(50, [0.0], [1.0])
    out = pre(downstream.center_crop(img, downstream.crop_frac(info)))
    assert out.shape == (1, 50, 50) and out[:, :, 1:-1].min() > 0.99  # the centre only: no black sides
    sq = pre(img)
    assert sq.shape == (1, 50, 50) and sq.min() < 0.01  # the square resize squashes the whole image in


# ----------------------------------------------------------------------------------------------------------------
# code in a pickle is refused in every new format, and never runs

def evil_files(tmp_path, marker):
    ex = Exploit(marker)
    out = {}
    torch.save({**to_openai_clip_min(), "x": ex}, tmp_path / "clip.pt")
    out["clip"] = out["chexzero"] = tmp_path / "clip.pt"
    write_biomedclip(tmp_path / "bmc", timm_vit_state(), evil=ex)
    out["biomedclip"] = tmp_path / "bmc"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "x": ex}, tmp_path / "MRM.pth")
    out["mrm"] = tmp_path / "MRM.pth"
    torch.save({"encoder.encoder.conv1.weight": torch.zeros(1), "x": ex}, tmp_path / "biovil.pt")
    out["biovil-t"] = tmp_path / "biovil.pt"
    snap = tmp_path / "RadJEPA"
    snap.mkdir()
    (snap / "config.json").write_text('{"model_type": "radjepa"}')
    torch.save({"encoder": {}, "x": ex}, snap / "jepa_encoder.pth.tar")
    out["radjepa"] = snap
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "clip_vision_model"}')
    torch.save({"x": ex}, hf / "pytorch_model.bin")
    out["clip-hf"] = out["ijepa-hf"] = hf
    return out


def to_openai_clip_min():
    return {"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}


@pytest.mark.parametrize("fmt", ["clip", "chexzero", "biomedclip", "mrm", "biovil-t", "radjepa", "clip-hf",
                                 "ijepa-hf", "auto"])
def test_pickle_with_code_refused_in_new_formats(tmp_path, fmt):
    marker = tmp_path / "pwned"
    files = evil_files(tmp_path, marker)
    for f in ([files[fmt]] if fmt != "auto" else sorted(set(files.values()))):
        with pytest.raises(UserError, match=r"refused: unpickling it would call posix\.system"):
            load_encoder(str(f), fmt=fmt)
    assert not marker.exists()


def test_unknown_layout_names_closest_format(tmp_path):
    # CLIP's words under a prefix no loader knows: one line that names the nearest format
    torch.save({"weird.prefix.visual.ln_post.weight": torch.zeros(2), "visual_tower.conv1.weight": torch.zeros(2),
                "visual_tower.positional_embedding": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(UserError, match=r"unknown checkpoint layout .*closest format: clip;"):
        load_encoder(str(tmp_path / "x.pt"))


# ----------------------------------------------------------------------------------------------------------------
# every baseline runs the three evaluations end to end on the bundled data (tiny checkpoints, a few steps)

def baseline_checkpoint(kind, tmp):
    """A tiny randomly initialised checkpoint in the published layout of `kind`; returns its path."""
    if kind == "clip-hf":
        make_clip(tmp / "clip-vit-large-patch14")
        return tmp / "clip-vit-large-patch14"
    if kind in ("clip", "chexzero"):
        make_clip(tmp / "c", width=128, heads=2)
        torch.save(to_openai_clip(load_file(str(tmp / "c" / "model.safetensors")), 2, pre=""), tmp / f"{kind}.pt")
        return tmp / f"{kind}.pt"
    if kind == "biomedclip":
        write_biomedclip(tmp / "BiomedCLIP", timm_vit_state())
        return tmp / "BiomedCLIP"
    if kind == "mrm":
        torch.save({"model": {**timm_vit_state(), "decoder_embed.weight": torch.randn(8, 64)}}, tmp / "MRM.pth")
        return tmp / "MRM.pth"
    if kind == "biovil-t":
        torch.save(biovil_checkpoint(resnet_state()), tmp / "biovil_t.pt")
        return tmp / "biovil_t.pt"
    if kind == "dinov2-swiglu":
        make_hf("dinov2", tmp / "dinov2-giant", hidden_size=128, num_attention_heads=2, use_swiglu_ffn=True)
        return tmp / "dinov2-giant"
    if kind == "ijepa-hf":
        encoders.export_hf(tiny_jepa(), str(tmp / "hf"), mean=encoders.IMAGENET_MEAN, std=encoders.IMAGENET_STD)
        return tmp / "hf"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["clip-hf", "clip", "chexzero", "biomedclip", "mrm", "biovil-t", "dinov2-swiglu",
                                  "ijepa-hf"])
def test_baseline_runs_probe_segment_report(tmp_path, monkeypatch, kind):
    probe, segment, report = (pytest.importorskip(m) for m in ("probe", "segment", "report"))
    monkeypatch.chdir(tmp_path)
    ck = str(baseline_checkpoint(kind, tmp_path))
    fmt = ["--encoder_format", kind] if kind == "chexzero" else []
    res = probe.main(["--csv", str(small_kermany_csv(tmp_path, n=4)), "--label_cols", "pneumonia", "--subject_col",
                      "patient", "--folds", "2", "--num_workers", "0",
                      "--encoder", ck, "--out_dir", str(tmp_path / "probe"), *fmt])
    assert np.isfinite(res["agg"]["auroc"]["mean"]) and res["encoder_format"] == (kind if kind != "dinov2-swiglu"
                                                                                 else "dinov2-hf")
    # UPerNet on four feature maps of the encoder (blocks 1, 1, 2, 2 of these two-block ViTs; ResNet blocks 1-4)
    seg = segment.main(["--encoder", ck, "--layers", "1,2,3,4" if kind == "biovil-t" else "1,1,2,2", "--max_steps",
                        "1", "--batch_size", "2", "--num_workers", "0", "--n_overlays", "1", "--n_boot", "10",
                        *(["--img_size", "64", "--patch_size", "32" if kind == "biovil-t" else "16"]
                          if kind in ("biovil-t", "biomedclip", "mrm") else ["--img_size", "56"]),  # stride 32 / 16 / 14
                        "--out_dir", str(tmp_path / "seg"), *fmt])
    assert 0 <= seg["test"]["mean_dice"] <= 1
    rep = report.main(["--encoder", ck, "--max_steps", "1", "--num_workers", "0", "--lm_layers", "1", "--lm_dim", "32",
                       "--lm_heads", "2", "--max_new_tokens", "2", "--n_boot", "10", "--out_dir", str(tmp_path / "rep"),
                       *fmt])
    assert rep["n_test"] > 0 and (tmp_path / "rep" / "predictions.csv").exists()
