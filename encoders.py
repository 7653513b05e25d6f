"""
Frozen encoders for probe.py, segment.py and report.py: the project's own export and the published encoders the
paper compares against, each rebuilt as model.py's VisionTransformer or one of backbones.py's.

    from encoders import save_encoder, load_encoder
    save_encoder(vit, "out/pretrain/encoder.safetensors", step=1000)
    vit, info = load_encoder("out/pretrain/encoder.safetensors")  # info: a Feed (source, format, img_size, ...)
    vit, info = load_encoder("rad-dino/", fmt="rad-dino")         # a Hugging Face snapshot folder
    export_hf(vit, "out/pretrain/hf")                             # an IJepaModel folder transformers loads
    vit, info = load_encoder(None, model="vit_small")             # default export if present, else random init
    vit, info = load_encoder_from_args(args)                      # the flags add_encoder_args() defines

--encoder_format: LOADERS lists each format with what it reads; `auto` (detect_format) tells them apart by their
contents. Each is fed as its own release feeds it (feed(); the README's "Encoders" table). Loading never runs code
from the checkpoint (weights.py), and every tensor of it is used (mask tokens, training heads, a CLIP text tower,
MAE's decoder, BioViL-T's temporal pooler aside): a missing or unknown key is an error that names it.
"""
import dataclasses
import difflib
import functools
import json
import math
import os
import re

import torch
from safetensors.torch import save_file

from base import UserError, atomic_write, write_json
from data import CXR_MEAN, CXR_STD
from backbones import ResNet50Encoder, ViTVariant, build_encoder, swiglu_hidden
from model import VIT_CONFIGS, VisionTransformer, build_vit, set_attn
from weights import (Checkpoint, backbone_state, clip_source, dinov2_source, hf_source, load_mapped, model_state,
                     plain_state, same_name, tensor_dict)

DEFAULT_EXPORT = os.path.join("out", "pretrain", "encoder.safetensors")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # OpenAI CLIP's
RAD_DINO_FEED = dict(img_size=518, mean=[0.5307] * 3, std=[0.2583] * 3, resize_to=518, source="RAD-DINO's processor")
DINOV2_FEED = dict(img_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_to=256,
                   source="DINOv2 linear evaluation")
HF_FEED_WINS = ("ijepa-hf", "dinov2-hf", "rad-dino", "clip-hf")  # a preprocessor_config.json beside them is obeyed
SWIGLU = {"variant": "vit", "ffn": "swiglu"}  # DINOv2 ViT-g's feed-forward (backbones.ViTVariant)
# I-JEPA / DINOv2 checkpoints store no head count: published ViTs have 64-d heads but at these widths (their tables)
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}
# only microsoft/rad-dino's hub folder holds these: the DINOv2-code checkpoint, DINO head and fine-tuning config
RAD_DINO_FILES = ("backbone_compatible.safetensors", "dino_head.safetensors", "vitb14_cxr.yaml")


def save_encoder(vit, path, if_failed="nothing was changed", **meta):
    """Write vit's weights + config (safetensors metadata) atomically. Metadata img_size / mean / std, if given,
    are how the file is fed when loaded again (so a re-exported RAD-DINO keeps its own)."""
    state = {k: v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    md = {"format": "radjepa-encoder", "config": json.dumps(vit.config), **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=md), if_failed)


def export_hf(vit, folder, img_size=None, mean=None, std=None):
    """Write `folder` as a Hugging Face IJepaModel (config.json, model.safetensors, a ViTImageProcessor's
    preprocessor_config.json) that transformers loads to the same patch tokens; only plain JEPA ViTs have this layout.
    A gray stem is widened to RGB with the kernel split over the three copies of the image: exact."""
    c, dim = vit.config, vit.config["embed_dim"]
    if type(vit) is not VisionTransformer or c["cls_token"] or c["num_register_tokens"] or c["layer_scale"]:
        raise UserError("export_hf: only plain JEPA ViTs (no CLS token, registers or layer scale) are IJepaModels")
    mean, std = ([CXR_MEAN], [CXR_STD]) if mean is None else (mean, std)
    mean, std = ([float(v) for v in m] * (3 if len(m) == 1 else 1) for m in (mean, std))
    out = {}
    for k, t in vit.state_dict().items():
        t = t.detach().float().cpu()
        if k == "patch_embed.proj.weight" and t.shape[1] == 1:
            t = t.repeat(1, 3, 1, 1) / 3
        names = hf_source(k, ijepa=True)[0]
        out.update(zip(names, t.split(dim) if len(names) == 3 else [t]))  # our fused qkv: q, k, v
    config = {"architectures": ["IJepaModel"], "model_type": "ijepa", "hidden_size": dim,
              "num_hidden_layers": c["depth"], "num_attention_heads": c["num_heads"],
              "intermediate_size": int(dim * c["mlp_ratio"]), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": c["eps"],
              "image_size": c["img_size"], "patch_size": c["patch_size"], "num_channels": 3,
              "qkv_bias": c["qkv_bias"], "torch_dtype": "float32"}
    side = img_size or c["img_size"]
    pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": side, "width": side},
           "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
           "image_std": std, "do_convert_rgb": True}
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "model.safetensors"),
                 lambda tmp: save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata={"format": "pt"}))
    write_json(pre, os.path.join(folder, "preprocessor_config.json"))
    write_json(config, os.path.join(folder, "config.json"))  # last: a folder with config.json is complete


# ----------------------------------------------------------------------------------------------------------------
# the loaders: build the right encoder, fill it, and say how it is fed

@dataclasses.dataclass
class Feed:
    """What an encoder is and how it is fed: the image side, normalisation and resize rule its release uses (preset:
    where that rule comes from), its format and a line saying which file it came from (source), the channels it
    takes once --enc_mean / --enc_std are applied (in_chans), the share of the shorter side the evaluations keep
    (crop_frac, downstream.crop_frac), and what a project export's metadata held (meta)."""
    img_size: int
    mean: list
    std: list
    resize: str = "square"
    resize_to: int = None
    preset: str = None
    format: str = None
    source: str = None
    in_chans: int = None
    crop_frac: float = 1.0
    meta: dict = None


def feed(img_size, mean, std, resize_to=None, source=None):
    """The Feed of an encoder's release. With resize_to N, as with the encoder's own processor, the evaluations keep
    img_size / N of the shorter side (downstream.crop_frac)."""
    return Feed(int(img_size), list(mean), list(std), "shortest_edge+center_crop" if resize_to else "square",
                int(resize_to) if resize_to else None, source)


def _side(v):  # one side of a Hugging Face size: an int, a pair, or {height, width} / {shortest_edge}
    if isinstance(v, dict):
        return v.get("height", v.get("shortest_edge"))
    return v[0] if isinstance(v, (list, tuple)) else v


def _hf_feed(pp):
    """How a Hugging Face preprocessor_config.json feeds (shortest edge + centre crop, or square), if there is one."""
    if not isinstance(pp, dict) or "image_mean" not in pp or "image_std" not in pp:
        return None
    size, crop = pp.get("size"), _side(pp.get("crop_size")) if pp.get("do_center_crop", True) else None
    short = size.get("shortest_edge") if isinstance(size, dict) else (size if isinstance(size, int) else None)
    side = crop or _side(size)
    return feed(side, pp["image_mean"], pp["image_std"], resize_to=short or crop,
                source="preprocessor_config.json") if isinstance(side, int) else None


def _heads(width, path):
    if width not in HEADS_BY_WIDTH and width % 64:
        raise UserError(f"{path}: width {width} is no published ViT's and not a multiple of 64: unknown head count")
    return HEADS_BY_WIDTH.get(width, width // 64)


def _count(state, pattern):  # how many numbered blocks: 1 + the largest index `pattern`'s group matches, 0 if none
    return 1 + max([int(m.group(1)) for k in state if (m := re.match(pattern, k))], default=-1)


def _infer_vit(state, path, cls_slot, heads=None):
    """build_encoder's config from the shapes of an I-JEPA / DINOv2 / timm / MAE-named state dict."""
    swiglu = "blocks.0.mlp.w12.weight" in state
    fc = "blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"
    for k in ("patch_embed.proj.weight", "pos_embed", fc):
        if k not in state:
            raise UserError(f"{path}: missing key {k} (keys look like {sorted(state)[:4]})")
    dim, in_chans, p, _ = state["patch_embed.proj.weight"].shape
    n = state["pos_embed"].shape[1] - int(cls_slot)
    grid = math.isqrt(n)
    if grid * grid != n:
        raise UserError(f"{path}: pos_embed holds {n} patch positions, not a square grid")
    hidden = state[fc].shape[0] // (2 if swiglu else 1)
    if swiglu:  # the mlp_ratio DINOv2 derives this width from (4 for ViT-g's 4096)
        ratio = next((r for r in (4.0, hidden * 1.5 / dim, hidden / dim) if swiglu_hidden(dim, r) == hidden), None)
    else:  # model.py's MLP takes int(dim * mlp_ratio) hidden units
        ratio = hidden / dim if int(dim * (hidden / dim)) == hidden else None
    if ratio is None:
        raise UserError(f"{path}: {'SwiGLU' if swiglu else 'MLP'} width {hidden} for width {dim} matches no mlp_ratio")
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    cfg = dict(img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=dim, mlp_ratio=ratio,
               depth=_count(state, r"blocks\.(\d+)\."), num_heads=heads or _heads(dim, path),
               qkv_bias="blocks.0.attn.qkv.bias" in state, cls_token="cls_token" in state, num_register_tokens=regs,
               learned_pos=cls_slot, layer_scale=1.0 if "blocks.0.ls1.gamma" in state else None)
    return {**cfg, **SWIGLU} if swiglu else cfg


def _load_own(ck, attn, fmt):
    if ck.meta.get("format") != "radjepa-encoder" or "config" not in ck.meta:
        raise UserError(f"{ck.path}: not a radjepa-encoder export (no config in its safetensors metadata)")
    cfg = json.loads(ck.meta["config"])
    vit = load_mapped(build_encoder(cfg, attn), tensor_dict(ck.obj, ck.path), same_name, ck.path)
    meta = {k: v for k, v in ck.meta.items() if k not in ("config", "format")}
    for k, v in meta.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:  # metadata another tool wrote stays text
            pass
    own = {k: meta[k] for k in ("img_size", "mean", "std", "resize", "resize_to") if k in meta}
    return vit, dataclasses.replace(feed(cfg["img_size"], [CXR_MEAN], [CXR_STD]), **own, meta=meta)


def _load_jepa(ck, attn, fmt):
    """RadJEPa / I-JEPA / pretrain.py's checkpoint.pt (fed as it was trained; the others as Meta's I-JEPA code, which
    RadJEPa was trained with, feeds them): a JEPA target encoder, no CLS, fixed sin-cos positions."""
    state = backbone_state(ck.obj, ck.path)
    args = ck.obj.get("args") if isinstance(ck.obj, dict) else None
    heads = VIT_CONFIGS[args["model"]][2] if isinstance(args, dict) and args.get("model") in VIT_CONFIGS else None
    cfg = _infer_vit(state, ck.path, cls_slot=False, heads=heads)
    if cfg["cls_token"] or cfg["num_register_tokens"]:
        raise UserError(f"{ck.path}: has a CLS token / registers, so it is not a JEPA encoder: "
                        "try --encoder_format dinov2")
    hub = ck.hf_config or {}
    if isinstance(hub.get("num_attention_heads"), int) and not heads:
        cfg["num_heads"] = hub["num_attention_heads"]
    vit = load_mapped(build_encoder(cfg, attn), state, same_name, ck.path)
    if isinstance(args, dict):
        return vit, feed(cfg["img_size"], [CXR_MEAN], [CXR_STD])
    size = hub.get("image_size") if isinstance(hub.get("image_size"), int) else cfg["img_size"]
    return vit, feed(size, IMAGENET_MEAN, IMAGENET_STD, source="Meta's I-JEPA transforms (ImageNet mean / std)")


def _load_timm_vit(ck, attn, fmt):
    """Meta's DINOv2 naming (blocks chunked for FSDP too), which timm's and MAE's are: MRM (MAE ViT-B/16), BiomedCLIP
    (open_clip's visual.trunk.* is timm's ViT-B/16). Positions resized as each one's code does: DINOv2 with registers
    antialias, no offset, without the historical (new + 0.1) / old; timm antialiases; MAE resizes by size."""
    if fmt == "rad-dino" and (ck.hf_config or {}).get("model_type") == "dinov2" \
            and os.path.basename(ck.file) != RAD_DINO_FILES[0]:
        return _load_hf(ck, attn, fmt)  # microsoft/rad-dino's hub folder: a Dinov2Model
    if fmt == "biomedclip":  # the text tower, head.proj and logit_scale are set aside
        state = plain_state(ck.obj, ck.path)
        if not any(k.startswith("visual.trunk.") for k in state):
            raise UserError(f"{ck.path}: no visual.trunk.* keys: not an open_clip timm-ViT checkpoint (BiomedCLIP)")
        state = {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    else:
        state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v
                 for k, v in backbone_state(ck.obj, ck.path).items()}
    if fmt == "mrm":  # MRM's pretraining file also holds the MAE decoder and the report branch
        state = {k: v for k, v in state.items()
                 if not k.startswith(("decoder", "bert", "text", "head", "fc_norm", "mlm", "cls."))}
    if "cls_token" not in state:
        raise UserError(f"{ck.path}: no cls_token, so not DINOv2 / timm / MAE: try --encoder_format radjepa or ijepa")
    cfg = _infer_vit(state, ck.path, cls_slot=True)
    reg = cfg["num_register_tokens"] > 0
    dino = dict(interp_antialias=reg, interp_offset=0.0 if reg else 0.1)
    interp = {"dinov2": dino, "rad-dino": dino, "biomedclip": dict(interp_antialias=True), "mrm": {}}[fmt]
    vit = load_mapped(build_encoder({**cfg, **interp}, attn), state, dinov2_source, ck.path, ignore={"mask_token"})
    if fmt == "biomedclip":
        pc = (ck.open_clip or {}).get("preprocess_cfg", {})
        size = (ck.open_clip or {}).get("model_cfg", {}).get("vision_cfg", {}).get("image_size", cfg["img_size"])
        return vit, feed(size, pc.get("mean", CLIP_MEAN), pc.get("std", CLIP_STD), resize_to=size,
                         source="open_clip_config.json" if ck.open_clip else "open_clip defaults")
    if fmt == "mrm":  # MRM's fine-tuning test transform: Resize + CenterCrop, gray to 3 channels, 0.4978 / 0.2449
        return vit, feed(cfg["img_size"], [0.4978] * 3, [0.2449] * 3, resize_to=cfg["img_size"],
                         source="MRM's evaluation transform")
    return vit, feed(**(RAD_DINO_FEED if fmt == "rad-dino" else DINOV2_FEED))


def _load_hf(ck, attn, fmt):
    """Hugging Face Dinov2Model / Dinov2WithRegistersModel / IJepaModel, as config.json says. HF inserts the registers,
    without a position, after CLS: our embed()'s [CLS + cls_pos, registers, patches + pos]."""
    c = ck.hf_config
    if c is None:
        raise UserError(f"{ck.path}: Hugging Face weights need a readable config.json in the same folder")
    mt = c.get("model_type")
    want = ("ijepa",) if fmt == "ijepa-hf" else ("dinov2", "dinov2_with_registers")
    if mt not in want:
        hint = f": try --encoder_format {FORMAT_OF_MODEL_TYPE[mt]}" if mt in FORMAT_OF_MODEL_TYPE else ""
        raise UserError(f"{ck.path}: config.json has model_type {mt!r}; --encoder_format {fmt} loads "
                        f"{' / '.join(want)}{hint}")
    if c.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{ck.path}: hidden_act {c['hidden_act']!r} is not supported (only gelu)")
    state = model_state(ck.obj, ck.path, ("dinov2.", "ijepa."))
    dim, ijepa, regs = c.get("hidden_size", 768), mt == "ijepa", mt == "dinov2_with_registers"
    ratio = c["intermediate_size"] / dim if ijepa and "intermediate_size" in c else c.get("mlp_ratio", 4)
    cfg = dict(img_size=_side(c.get("image_size", 224)), patch_size=_side(c.get("patch_size", 14)),
               in_chans=c.get("num_channels", 3), embed_dim=dim, depth=c.get("num_hidden_layers", 12),
               num_heads=c.get("num_attention_heads", 12), mlp_ratio=ratio, qkv_bias=c.get("qkv_bias", True),
               cls_token=not ijepa, learned_pos=True, layer_scale=None if ijepa else 1.0,
               num_register_tokens=c.get("num_register_tokens", 4) if regs else 0,
               eps=c.get("layer_norm_eps", 1e-12 if ijepa else 1e-6), interp_antialias=regs,
               **(SWIGLU if c.get("use_swiglu_ffn") else {}))
    new = any(".attention.q_proj." in k for k in state)
    vit = load_mapped(build_encoder(cfg, attn), state, functools.partial(hf_source, new_names=new, ijepa=ijepa),
                      ck.path, ignore={"embeddings.mask_token"})
    if ijepa:
        return vit, feed(cfg["img_size"], IMAGENET_MEAN, IMAGENET_STD, source="I-JEPA (ImageNet mean / std)")
    return vit, feed(**(RAD_DINO_FEED if fmt == "rad-dino" else DINOV2_FEED))


def _load_clip(ck, attn, fmt):
    """CLIP's ViT (ln_pre, QuickGELU, no patch bias): a Hugging Face CLIPVisionModel / CLIPModel folder (clip-hf), or
    OpenAI's state dict (clip: ViT-L/14, ViT-L/14@336px; chexzero: CheXzero's fine-tuned ViT-B/32)."""
    if fmt == "clip-hf":
        c = ck.hf_config or {}
        c = c.get("vision_config", c) if c.get("model_type") == "clip" else c
        if c.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise UserError(f"{ck.path}: config.json is not CLIP's: --encoder_format clip-hf loads CLIPVisionModel / "
                            "CLIPModel folders")
        state = model_state(ck.obj, ck.path, ("vision_model.",))  # the text tower is set aside
        if "embeddings.patch_embedding.weight" not in state:
            raise UserError(f"{ck.path}: no (vision_model.)embeddings.patch_embedding.weight: not a CLIP vision model")
        ignore, blocks = {"embeddings.position_ids"}, r"encoder\.layers\.(\d+)\."  # a buffer older transformers saved
    else:
        state, c = plain_state(ck.obj, ck.path), {}
        if "visual.conv1.weight" not in state:
            resnet = " (a ResNet CLIP? only the ViT ones load)" if "visual.layer1.0.conv1.weight" in state else ""
            raise UserError(f"{ck.path}: no visual.conv1.weight: not an OpenAI CLIP ViT state dict{resnet}")
        ignore = {k for k in state if not k.startswith("visual.")} | {"visual.proj"}
        blocks = r"visual\.transformer\.resblocks\.(\d+)\."
    act = c.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise UserError(f"{ck.path}: hidden_act {act!r} is not supported (quick_gelu or gelu)")
    source_of = functools.partial(clip_source, openai=fmt != "clip-hf")
    cls, pos, patch, fc1 = (state[source_of(k)[0][0]] for k in ("cls_token", "pos_embed", "patch_embed.proj.weight",
                                                                  "blocks.0.mlp.fc1.weight"))
    dim, npos, p = cls.shape[0], pos.shape[-2], patch.shape[-1]
    grid = math.isqrt(npos - 1)
    if grid * grid != npos - 1:
        raise UserError(f"{ck.path}: {source_of('pos_embed')[0][0]} holds {npos - 1} patch positions, not a "
                        "square grid")
    vit = ViTVariant(attn=attn, pre_norm=True, act=act, patch_bias=False, img_size=grid * p, patch_size=p,
                     in_chans=patch.shape[1], embed_dim=dim, depth=_count(state, blocks), qkv_bias=True,
                     num_heads=c.get("num_attention_heads", _heads(dim, ck.path)), mlp_ratio=fc1.shape[0] / dim,
                     cls_token=True, learned_pos=True, eps=c.get("layer_norm_eps", 1e-5))
    load_mapped(vit, state, source_of, ck.path, ignore=ignore)
    if fmt == "chexzero":  # CheXzero's zero_shot.py: Normalize(101.48761, 83.43944) on 0-255 pixels, 224 px
        return vit, feed(grid * p, [101.48761 / 255] * 3, [83.43944 / 255] * 3, source="CheXzero's transforms")
    return vit, feed(grid * p, CLIP_MEAN, CLIP_STD, resize_to=grid * p, source="CLIP's preprocessing")


def _load_biovil(ck, attn, fmt):
    """BioViL(-T)'s image encoder: the ResNet-50 trunk (torchvision names) under encoder.encoder.*; BioViL-T's
    temporal pooler (for a prior image) and the projector / classifier heads are set aside."""
    state = plain_state(ck.obj, ck.path)
    pre = next((p for p in ("encoder.encoder.", "image_model.encoder.encoder.", "encoder.", "") if
                p + "layer4.0.conv1.weight" in state), None)
    if pre is None:
        raise UserError(f"{ck.path}: no layer4.0.conv1.weight under encoder.encoder.: not a ResNet-50 image encoder")
    trunk = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre) and not k[len(pre):].startswith("fc.")}
    n = [_count(trunk, rf"layer{s}\.(\d+)\.") for s in (1, 2, 3, 4)]
    if "conv1.weight" not in trunk or "layer1.0.conv3.weight" not in trunk or min(n) < 1:
        raise UserError(f"{ck.path}: not a ResNet with bottleneck blocks (stages of {n} blocks)")
    w = trunk["conv1.weight"]
    vit = ResNet50Encoder(layers=n, width=w.shape[0], in_chans=w.shape[1], img_size=448)
    load_mapped(vit, trunk, same_name, ck.path)
    return vit, feed(448, [0.0] * 3, [1.0] * 3, resize_to=512, source="BioViL-T's inference transform")


LOADERS = {  # name: (loader, what it reads); --help lists them in this order
    "radjepa-encoder": (_load_own, "this project's export: encoder.safetensors (pretrain.py writes it)"),
    "radjepa": (_load_jepa, "RadJEPa's jepa_encoder.pth.tar or hub snapshot folder; also pretrain.py's checkpoint.pt"),
    "ijepa": (_load_jepa, "Meta's I-JEPA .pth.tar (IN1K-vit.h.14-300e.pth.tar, ...)"),
    "ijepa-hf": (_load_hf, "Hugging Face IJepaModel folder (facebook/ijepa_*, and this project's out_dir/hf)"),
    "dinov2-hf": (_load_hf, "Hugging Face Dinov2Model / Dinov2WithRegistersModel folder (ViT-g's SwiGLU too)"),
    "rad-dino": (_load_timm_vit, "microsoft/rad-dino's hub folder, or its backbone_compatible.safetensors"),
    "dinov2": (_load_timm_vit, "Meta's original DINOv2 .pth (dinov2_vitg14_pretrain.pth, ..._reg4_...)"),
    "clip-hf": (_load_clip, "Hugging Face CLIPVisionModel / CLIPModel folder (openai/clip-vit-large-patch14[-336])"),
    "clip": (_load_clip, "OpenAI CLIP ViT state dict (visual.*; re-save a TorchScript ViT-L-14.pt as one)"),
    "chexzero": (_load_clip, "CheXzero: OpenAI CLIP ViT-B/32 state dict"),
    "biomedclip": (_load_timm_vit, "BiomedCLIP's open_clip folder (open_clip_pytorch_model.bin, ..._config.json)"),
    "mrm": (_load_timm_vit, "MRM: ViT-B/16 in MAE / timm naming (MRM.pth)"),
    "biovil-t": (_load_biovil, "BioViL(-T) image model (hi-ml-multimodal's ResNet-50, biovil_t_image_model_*.pt)"),
}
FORMAT_OF_MODEL_TYPE = {"ijepa": "ijepa-hf", "dinov2": "dinov2-hf", "dinov2_with_registers": "dinov2-hf",
                        "clip": "clip-hf", "clip_vision_model": "clip-hf"}


def _ambiguous(path, a, b, why):
    return UserError(f"{path}: cannot tell for certain whether this is {a} or {b} ({why}), and each is fed "
                     f"differently: pass --encoder_format {a} or --encoder_format {b}")


def detect_format(path):
    """(format, why) of a checkpoint path or Checkpoint, only when certain: where two formats share a layout but are
    fed differently (RAD-DINO / DINOv2, CheXzero / CLIP ViT-B/32, MRM / timm ViT-B/16s) and the files do not tell,
    or the layout is unknown, a UserError asks for --encoder_format."""
    ck = path if isinstance(path, Checkpoint) else Checkpoint(path)
    obj, name = ck.obj, os.path.basename(ck.file)
    rad_dino = name == RAD_DINO_FILES[0] or any(os.path.exists(os.path.join(ck.folder, f)) for f in RAD_DINO_FILES)
    if ck.meta.get("format") == "radjepa-encoder":
        return "radjepa-encoder", "project export"
    keys = list(obj) if isinstance(obj, dict) else []
    mt = (ck.hf_config or {}).get("model_type", "")
    if mt in FORMAT_OF_MODEL_TYPE and ck.file.endswith((".safetensors", ".bin", ".index.json")) \
            and name != RAD_DINO_FILES[0]:
        if mt == "dinov2":  # microsoft/rad-dino's config.json is a plain Dinov2Model's
            if rad_dino:
                return "rad-dino", f"Hugging Face Dinov2 folder with RAD-DINO's {', '.join(RAD_DINO_FILES)}"
            if ck.hf_preprocess is None:
                raise _ambiguous(ck.path, "dinov2-hf", "rad-dino", "a Dinov2 config.json and no "
                                 "preprocessor_config.json: DINOv2 is fed 224 px crops, RAD-DINO 518 px")
        return FORMAT_OF_MODEL_TYPE[mt], f"Hugging Face config.json model_type {mt}"
    if ck.open_clip is not None or any(k.startswith("visual.trunk.") for k in keys):
        return "biomedclip", "open_clip timm ViT (visual.trunk.*)"
    if any(k.startswith("visual.transformer.resblocks.") for k in keys):
        w = obj.get("visual.conv1.weight")
        if torch.is_tensor(w) and tuple(w.shape[::2]) == (768, 32):
            raise _ambiguous(ck.path, "clip", "chexzero", "an OpenAI CLIP ViT-B/32: OpenAI's and CheXzero's share it")
        return "clip", "OpenAI CLIP state dict (not ViT-B/32, so not CheXzero)"
    if any(k.endswith("layer4.0.conv1.weight") for k in keys):
        return "biovil-t", "ResNet trunk (torchvision naming)"
    if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("target_encoder", "encoder")):
        # Meta's files (IN1K-vit.h.14-300e.pth.tar, ...) are whole training states; the RadJEPa release is named
        if "predictor" in obj and "opt" in obj and "jepa_encoder" not in name:
            return "ijepa", "I-JEPA training checkpoint (predictor + opt)"
        return "radjepa", "JEPA encoder state dict"
    if any(k.endswith("patch_embeddings.projection.weight") for k in keys):
        return "dinov2-hf", "Hugging Face Dinov2 key names"
    state = backbone_state(obj, ck.path)
    if "cls_token" in state and any(k.startswith("blocks.") for k in state):
        if any(k.startswith("decoder") for k in state):
            return "mrm", "MAE naming with a decoder (MRM)"
        if rad_dino:
            return "rad-dino", f"DINOv2 naming, RAD-DINO's {name}"
        patch = state["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in state else None
        if patch != 14:
            raise _ambiguous(ck.path, "mrm", "dinov2", f"timm / MAE naming, a CLS token, patch {patch}, no decoder")
        if ck.file.endswith(".safetensors"):  # Meta ships DINOv2 as .pth; RAD-DINO's DINOv2-code file is safetensors
            raise _ambiguous(ck.path, "dinov2", "rad-dino", "DINOv2 naming in a safetensors file")
        return "dinov2", "Meta's DINOv2 key names in a .pth"
    if "patch_embed.proj.weight" in state:
        return "radjepa", "ViT state dict without CLS token (RadJEPa and I-JEPA are fed alike)"
    raise UserError(f"{ck.path}: unknown checkpoint layout (keys like {sorted(state)[:4]}); closest format: "
                    f"{_closest(state)}; choose with --encoder_format ({', '.join(LOADERS)})")


def _closest(state):
    """The format whose key names share the most words with the checkpoint's (for the one-line error)."""
    words = {w for k in state for w in re.split(r"[._]", k) if w and not w.isdigit()}
    vocab = {"radjepa": "patch embed proj pos blocks attn qkv norm1 norm2 mlp fc1 fc2 norm",
             "dinov2": "cls token patch embed proj pos blocks attn qkv ls1 ls2 gamma norm mlp fc1 fc2 w12 w3",
             "dinov2-hf": "embeddings patch projection position encoder layer attention query key value output dense",
             "ijepa-hf": "embeddings patch projection position encoder layer layernorm before after intermediate",
             "clip-hf": "vision model embeddings class embedding patch position encoder layers self attn proj pre "
                        "layrnorm post",
             "clip": "visual conv1 class embedding positional transformer resblocks ln pre post in proj out c fc",
             "biomedclip": "visual trunk cls token blocks head proj text",
             "mrm": "cls token pos embed decoder blocks mask",
             "biovil-t": "encoder conv1 bn1 layer1 layer2 layer3 layer4 downsample running mean var"}
    return max(vocab, key=lambda f: len(words & set(vocab[f].split())))


def load_encoder(path=None, fmt="auto", model="vit_base", img_size=224, patch_size=14, attn="sdpa",
                 enc_img_size=None, enc_mean=None, enc_std=None):
    """(vit, info), the encoder frozen in eval mode. path None: the default pretraining export if a run left one, else
    a randomly initialised `model` (the floor every encoder should beat); "random": that random init whatever lies
    in out/; info.source says which."""
    if path is None and os.path.exists(DEFAULT_EXPORT):
        path = DEFAULT_EXPORT
    if path in (None, "random"):  # "random": a random init on purpose, whatever export lies in out/
        torch.manual_seed(0)
        vit = build_vit(model, img_size=img_size, patch_size=patch_size, attn=attn)
        why = f"no --encoder and no {DEFAULT_EXPORT}" if path is None else "--encoder random"
        info = dataclasses.replace(feed(img_size, [CXR_MEAN], [CXR_STD]), format="random-init",
                                   source=f"random-init {model} ({why})")
    else:
        if not os.path.exists(path):
            raise UserError(f"--encoder {path}: no such file or folder")
        if fmt not in (None, "auto") and fmt not in LOADERS:
            near = difflib.get_close_matches(str(fmt), LOADERS, n=1, cutoff=0)
            raise UserError(f"--encoder_format {fmt!r} unknown: closest is {near[0]} (formats: auto, "
                            f"{', '.join(LOADERS)})")
        ck = Checkpoint(path)
        fmt, why = detect_format(ck) if fmt in (None, "auto") else (fmt, None)
        vit, info = LOADERS[fmt][0](ck, attn, fmt)
        if fmt in HF_FEED_WINS:
            info = _hf_feed(ck.hf_preprocess) or info
        info.format, info.source = fmt, f"{path} ({fmt}{', auto-detected: ' + why if why else ''})"
    set_attn(vit, attn)
    vit.eval().requires_grad_(False)
    return vit, _override(info, vit, enc_img_size, enc_mean, enc_std)


def _override(info, vit, img_size, mean, std):
    """Apply --enc_img_size / --enc_mean / --enc_std; one value of mean or std is repeated to the other's length."""
    if img_size:
        if info.resize_to:  # keep the processor's resize / crop proportion (RAD-DINO 1, DINOv2 256 / 224)
            info.resize_to = int(round(info.resize_to * int(img_size) / info.img_size))
        info.img_size = int(img_size)
    mean = [float(v) for v in mean] if mean else info.mean
    std = [float(v) for v in std] if std else info.std
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise UserError(f"--enc_mean has {len(mean)} values and --enc_std {len(std)}: give the same number (1 or 3)")
    n = max(len(mean), len(std))
    mean, std, stem = mean * (n // len(mean)), std * (n // len(std)), vit.config["in_chans"]
    if len(mean) not in (1, stem):
        raise UserError(f"--enc_mean / --enc_std: {len(mean)} channels, but the encoder takes 1 or {stem}")
    if min(std) <= 0:
        raise UserError(f"--enc_std must be positive, got {std}")
    if info.img_size % vit.patch_size:
        raise UserError(f"--enc_img_size {info.img_size} is not a multiple of the patch size {vit.patch_size}")
    info.mean, info.std, info.in_chans = mean, std, len(mean)
    return info


def add_encoder_args(p):
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default=None, help="frozen encoder: a checkpoint file or Hugging Face folder "
                   f"(default: {DEFAULT_EXPORT} if present, else random init; `random`: a random init of --model)")
    g.add_argument("--encoder_format", default="auto", choices=["auto", *LOADERS], metavar="FORMAT",
                   help="checkpoint format, each fed as its release feeds it: auto (default: detected from the "
                        "contents); " + "; ".join(f"{k}: {v[1]}" for k, v in LOADERS.items()))
    g.add_argument("--enc_img_size", type=int, default=None,
                   help="input resolution for the encoder (default: its format's, e.g. 518 for RAD-DINO)")
    g.add_argument("--enc_mean", type=float, nargs="+", default=None,
                   help="normalisation mean, 1 value (grayscale) or 3 (RGB) (default: the format's)")
    g.add_argument("--enc_std", type=float, nargs="+", default=None, help="normalisation std (see --enc_mean)")


def load_encoder_from_args(args):
    """load_encoder with the flags of add_encoder_args and add_common_args."""
    opt = vars(args).get
    return load_encoder(args.encoder, args.encoder_format, opt("model", "vit_base"), opt("img_size", 224),
                        opt("patch_size", 14), opt("attn") or "sdpa", opt("enc_img_size"), opt("enc_mean"),
                        opt("enc_std"))
