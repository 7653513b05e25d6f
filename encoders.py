"""
Frozen encoders for the downstream scripts (probe.py, segment.py, report.py): the project's own export and the
published encoders the paper compares against, each rebuilt as model.py's VisionTransformer.

    from encoders import save_encoder, load_encoder
    save_encoder(vit, "out/pretrain/encoder.safetensors", step=1000)
    vit, info = load_encoder("out/pretrain/encoder.safetensors")  # info: source, format, img_size, mean, std, in_chans
    vit, info = load_encoder("rad-dino/", fmt="rad-dino")         # a Hugging Face snapshot folder
    vit, info = load_encoder(None, model="vit_small")             # default export if present, else random init
    vit, info = load_encoder_from_args(args)                      # the flags add_encoder_args() defines

Formats (--encoder_format; `auto` tells them apart by their contents and says what it picked in info['source']):
  radjepa-encoder  the project's export: safetensors with the ViT config in its metadata (pretrain.py writes it)
  radjepa          the released RadJEPa weights (jepa_encoder.pth.tar) and pretrain.py's checkpoint.pt: a torch
                   file with the state dict under 'target_encoder' (preferred) or 'encoder'
  ijepa            Meta's I-JEPA checkpoints (IN1K-vit.h.14-300e.pth.tar, ...): that layout plus 'predictor',
                   'opt', 'scaler', ...; module.patch_embed.proj.weight, module.pos_embed, module.blocks.N.attn.qkv...
  dinov2-hf        DINOv2 in Hugging Face format (Dinov2Model / Dinov2WithRegistersModel): a folder, or a weights
                   file, with config.json beside it
  rad-dino         microsoft/rad-dino: the same Hugging Face format, with RAD-DINO's preprocessing
  dinov2           Meta's original DINOv2 naming (dinov2_vitb14_pretrain.pth, dinov2_vitb14_reg4_pretrain.pth, ...)

Preprocessing preset per format (info img_size / mean / std; --enc_img_size, --enc_mean, --enc_std override):
  radjepa-encoder, radjepa  grayscale, CXR intensity statistics (data.CXR_MEAN / CXR_STD), the resolution the
                            checkpoint's position embeddings were made for (the paper's 224)
  ijepa     ImageNet mean / std on 3 channels (the gray image replicated), the checkpoint's resolution
  dinov2, dinov2-hf  ImageNet mean / std, 3 channels, 224 px: DINOv2's own linear evaluation and facebook/dinov2-*'s
            preprocessor_config.json (crop 224) use 224, although the position embeddings cover 518 px (37 x 37,
            from DINOv2's last high-resolution training phase); they are resized to 16 x 16 exactly as Hugging Face
            (dinov2-hf) or Meta's code (dinov2) does. A preprocessor_config.json beside config.json wins.
  rad-dino  518 px, mean 0.5307 and std 0.2583 on 3 channels (microsoft/rad-dino's preprocessor_config.json)

Loading never unpickles code: safetensors, or torch.load(weights_only=True). Every parameter must be filled and
every tensor of the checkpoint used (mask tokens and training heads aside): a missing or unknown key is an error
that names it, never a partial load.
"""
import functools
import json
import math
import os
import pickle
import re
import warnings
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common import UserError
from data import CXR_MEAN, CXR_STD
from model import VIT_CONFIGS, VisionTransformer, build_vit, set_attn

DEFAULT_EXPORT = os.path.join("out", "pretrain", "encoder.safetensors")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RAD_DINO_MEAN, RAD_DINO_STD = [0.5307] * 3, [0.2583] * 3
# Checkpoints in I-JEPA / DINOv2 naming do not store the head count; every published ViT uses 64-d heads except
# these widths (I-JEPA's and DINOv2's own tables), so the width decides it.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}


def save_encoder(vit, path, **meta):
    """Write vit's weights + config (safetensors metadata) atomically. Metadata img_size / mean / std, if given,
    become the preprocessing preset when the file is loaded again (so a re-exported RAD-DINO keeps its own)."""
    state = {k: v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    md = {"format": "radjepa-encoder", "config": json.dumps(vit.config)}
    md.update({k: json.dumps(v) for k, v in meta.items()})
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(state, tmp, metadata=md)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# reading a checkpoint safely, once

def _torch_load(path):
    """torch.load that only rebuilds tensors and plain containers. A pickle that asks for anything else (a function
    such as os.system, a class) is refused before any of it runs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pickle protocol 4 detected" noise on hand-made pickles
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        glob = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not glob:
            why = next((l.strip() for l in str(e).splitlines() if "Unsupported" in l), str(e)[:200])
            raise UserError(f"{path}: not a checkpoint that can be read safely ({why})")
        raise UserError(f"{path}: refused: unpickling it would call {glob.group(1)}, i.e. run code, not just rebuild "
                        "tensors; only safetensors and plain tensor checkpoints are loaded. If you trust the file, "
                        "re-save its state dict with torch.save(model.state_dict(), ...)")
    except Exception as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")


def _read_safetensors(path):
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})")


def _read_json(path):
    """A JSON file's contents, or None when it is absent or unreadable (a stray config.json beside a .pth is not
    an error; a Hugging Face folder without a readable one is, in _load_hf)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Checkpoint:
    """One --encoder path, read once: a torch file, a safetensors file, or a folder (a Hugging Face snapshot with
    config.json, or a pretraining run's out_dir holding encoder.safetensors)."""

    def __init__(self, path):
        self.path, folder = path, path if os.path.isdir(path) else os.path.dirname(path) or "."
        self.hf_config = _read_json(os.path.join(folder, "config.json"))
        self.hf_preprocess = _read_json(os.path.join(folder, "preprocessor_config.json"))
        self.file = path if not os.path.isdir(path) else self._pick_file(path)
        self.meta = {}
        if self.file.endswith(".index.json"):  # a sharded Hugging Face checkpoint
            index = _read_json(self.file) or {}
            self.obj = {}
            for shard in sorted(set(index.get("weight_map", {}).values())):
                self.obj.update(_read_safetensors(os.path.join(folder, shard))[0])
        elif self.file.endswith(".safetensors"):
            self.obj, self.meta = _read_safetensors(self.file)
        else:
            self.obj = _torch_load(self.file)

    def _pick_file(self, folder):
        names = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"] if self.hf_config else \
                ["encoder.safetensors"]
        for n in names:
            if os.path.exists(os.path.join(folder, n)):
                return os.path.join(folder, n)
        raise UserError(f"--encoder {folder}: a folder must hold config.json + model.safetensors (Hugging Face) or "
                        f"encoder.safetensors (a pretraining run); found neither")


def _tensor_dict(obj, path):
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise UserError(f"{path}: entries {bad[:5]} are not tensors: not an encoder state dict")
    return obj


def _strip(state, prefixes, path):
    out = {}
    for k, v in state.items():
        k0 = k
        while k.startswith(prefixes):
            k = k[len(next(p for p in prefixes if k.startswith(p))):]
        if k in out:
            raise UserError(f"{path}: keys {k0!r} and another both become {k!r} once prefixes are stripped")
        out[k] = v
    return out


def backbone_state(obj, path):
    """The encoder's state dict from an I-JEPA / RadJEPa / DINOv2 torch file: under 'target_encoder' (the EMA
    encoder the papers evaluate, preferred), 'encoder', 'teacher', 'model' or 'state_dict', or the file itself;
    'module.' (DDP), '_orig_mod.' (torch.compile), 'encoder.' and 'backbone.' prefixes stripped. DINOv2 training
    files keep heads beside the backbone: then only 'backbone.*' (the teacher's if both) is the encoder."""
    if isinstance(obj, dict):
        for key in ("target_encoder", "encoder", "teacher", "model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    state = _strip(_tensor_dict(obj, path), ("module.", "_orig_mod."), path)
    for pre in ("teacher.backbone.", "backbone."):
        if any(k.startswith(pre) for k in state):
            state = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
            break
    return _strip(state, ("encoder.", "backbone.", "module."), path)


# ----------------------------------------------------------------------------------------------------------------
# key mapping: every parameter of our ViT names the checkpoint tensor(s) it comes from

def _load_mapped(vit, state, source_of, path, ignore=()):
    """Fill every tensor of `vit` from `state`: source_of(our key) -> (checkpoint keys, combine or None). Missing,
    unknown (not in `ignore`) and mis-shaped keys are a UserError naming them in the checkpoint's own naming."""
    own = vit.state_dict()
    out, used, missing, shape = {}, set(), [], []
    for k, ref in own.items():
        srcs, combine = source_of(k)
        lack = [s for s in srcs if s not in state]
        if lack:
            missing += lack
            continue
        used.update(srcs)
        try:
            t = combine(*[state[s] for s in srcs]) if combine else state[srcs[0]]
        except RuntimeError:  # e.g. q, k, v of different widths
            shape.append(f"{'+'.join(srcs)} {[tuple(state[s].shape) for s in srcs]}")
            continue
        if t.shape != ref.shape:
            shape.append(f"{'+'.join(srcs)} {tuple(t.shape)} (expected {tuple(ref.shape)})")
        out[k] = t
    missing = list(dict.fromkeys(missing))
    unexpected = sorted(set(state) - used - set(ignore))
    if missing or unexpected or shape:
        parts = []
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{what} {', '.join(keys[:6])}{f' (+{len(keys) - 6} more)' if len(keys) > 6 else ''}")
        raise UserError(f"{path}: cannot load encoder: {'; '.join(parts)}")
    vit.load_state_dict(out, strict=True)


def _same(k):
    return [k], None


def _dinov2_source(k):
    """Meta's DINOv2 keeps the CLS position in slot 0 of pos_embed; ours keeps it apart in cls_pos_embed."""
    if k == "cls_pos_embed":
        return ["pos_embed"], lambda p: p[:, :1]
    if k == "pos_embed":
        return ["pos_embed"], lambda p: p[:, 1:]
    return [k], None


def _hf_source(k, new_names=False):
    """Our key -> Hugging Face Dinov2 key(s). Legacy checkpoints on the Hub (attention.attention.query/key/value,
    attention.output.dense) and transformers 5's in-memory names (attention.q_proj, ..., attention.o_proj) both
    work; q, k and v are concatenated in that order into our fused qkv (heads-major inside each, as HF splits)."""
    if k == "cls_pos_embed":
        return ["embeddings.position_embeddings"], lambda p: p[:, :1]
    if k == "pos_embed":
        return ["embeddings.position_embeddings"], lambda p: p[:, 1:]
    if k in ("cls_token", "register_tokens"):
        return [f"embeddings.{k}"], None
    if k.startswith("patch_embed.proj."):
        return ["embeddings.patch_embeddings.projection." + k.split(".")[-1]], None
    if k.startswith("norm."):
        return ["layernorm." + k.split(".")[-1]], None
    m = re.match(r"blocks\.(\d+)\.(.+)$", k)
    if not m:
        return [k], None
    pre, rest = f"encoder.layer.{m.group(1)}.", m.group(2)
    if rest.startswith("attn.qkv."):
        wb = rest.split(".")[-1]
        qkv = ["q_proj", "k_proj", "v_proj"] if new_names else ["attention.query", "attention.key", "attention.value"]
        return [f"{pre}attention.{n}.{wb}" for n in qkv], lambda q, kk, v: torch.cat([q, kk, v], 0)
    if rest.startswith("attn.proj."):
        return [pre + ("attention.o_proj." if new_names else "attention.output.dense.") + rest.split(".")[-1]], None
    if rest in ("ls1.gamma", "ls2.gamma"):
        return [f"{pre}layer_scale{rest[2]}.lambda1"], None
    return [pre + rest], None  # norm1, norm2, mlp.fc1, mlp.fc2 have the same names


# ----------------------------------------------------------------------------------------------------------------
# the loaders: build the right ViT, fill it, and give the preprocessing preset

def _heads(width, path):
    if width in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[width]
    if width % 64:
        raise UserError(f"{path}: width {width} is no published ViT's and not a multiple of 64: cannot tell the "
                        "number of attention heads")
    return width // 64


def _infer_vit(state, path, cls_slot, heads=None):
    """ViT constructor arguments from the tensor shapes of an I-JEPA / DINOv2-named state dict."""
    for k in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if k not in state:
            if k == "blocks.0.mlp.fc1.weight" and "blocks.0.mlp.w12.weight" in state:
                raise UserError(f"{path}: a SwiGLU feed-forward (DINOv2 ViT-g) is not supported by model.py's ViT")
            raise UserError(f"{path}: missing key {k} (keys look like {sorted(state)[:4]})")
    dim, in_chans, p, _ = state["patch_embed.proj.weight"].shape
    n = state["pos_embed"].shape[1] - int(cls_slot)
    grid = math.isqrt(n)
    if grid * grid != n:
        raise UserError(f"{path}: pos_embed holds {n} patch positions, not a square grid")
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    if int(dim * (hidden / dim)) != hidden:  # model.py's MLP takes int(dim * mlp_ratio) hidden units
        raise UserError(f"{path}: MLP width {hidden} for width {dim} cannot be expressed as an mlp_ratio")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    return dict(img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=dim, depth=depth,
                num_heads=heads or _heads(dim, path), mlp_ratio=hidden / dim,
                qkv_bias="blocks.0.attn.qkv.bias" in state,
                cls_token="cls_token" in state, num_register_tokens=regs, learned_pos=cls_slot,
                layer_scale=1.0 if "blocks.0.ls1.gamma" in state else None)


def cxr_preset(img_size):
    """Preprocessing for the project's own encoders: grayscale, CXR intensity statistics."""
    return {"img_size": img_size, "mean": [CXR_MEAN], "std": [CXR_STD]}


def _load_own(ck, attn):
    if ck.meta.get("format") != "radjepa-encoder" or "config" not in ck.meta:
        raise UserError(f"{ck.path}: not a radjepa-encoder export (no config in its safetensors metadata)")
    cfg = json.loads(ck.meta["config"])
    vit = VisionTransformer(attn=attn, **cfg)
    _load_mapped(vit, _tensor_dict(ck.obj, ck.path), _same, ck.path)
    meta = {}
    for k, v in ck.meta.items():
        if k not in ("config", "format"):
            try:
                meta[k] = json.loads(v)
            except ValueError:
                meta[k] = v
    preset = cxr_preset(cfg["img_size"])
    preset.update({k: meta[k] for k in ("img_size", "mean", "std") if k in meta})
    return vit, {**preset, "meta": meta}


def _load_jepa(ck, attn, fmt):
    """RadJEPa / I-JEPA / pretrain.py checkpoint.pt: a JEPA target encoder (no CLS, fixed sin-cos positions)."""
    state = backbone_state(ck.obj, ck.path)
    args = ck.obj.get("args") if isinstance(ck.obj, dict) else None  # pretrain.py's checkpoint records its flags
    heads = VIT_CONFIGS[args["model"]][2] if isinstance(args, dict) and args.get("model") in VIT_CONFIGS else None
    cfg = _infer_vit(state, ck.path, cls_slot=False, heads=heads)
    if cfg["cls_token"] or cfg["num_register_tokens"]:
        raise UserError(f"{ck.path}: has a CLS token / registers, so it is not a JEPA encoder: try --encoder_format dinov2")
    vit = VisionTransformer(attn=attn, **cfg)
    _load_mapped(vit, state, _same, ck.path)
    if fmt == "ijepa":  # Meta trained I-JEPA on ImageNet with its RGB statistics
        return vit, {"img_size": cfg["img_size"], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return vit, cxr_preset(cfg["img_size"])


def _load_dinov2(ck, attn):
    """Meta's original naming. Blocks may be chunked for FSDP (blocks.<chunk>.<index>.*: same index, one level
    deeper). Position resizing as Meta's hub models: register models antialias with no offset, the others use the
    historical scale factor (new + 0.1) / old."""
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in backbone_state(ck.obj, ck.path).items()}
    if "cls_token" not in state:
        raise UserError(f"{ck.path}: no cls_token, so not DINOv2: try --encoder_format radjepa or ijepa")
    cfg = _infer_vit(state, ck.path, cls_slot=True)
    reg = cfg["num_register_tokens"] > 0
    vit = VisionTransformer(attn=attn, interp_antialias=reg, interp_offset=0.0 if reg else 0.1, **cfg)
    _load_mapped(vit, state, _dinov2_source, ck.path, ignore={"mask_token"})
    return vit, {"img_size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _hf_preset(pp):
    """img_size / mean / std from a Hugging Face preprocessor_config.json (crop size if it center-crops)."""
    size = pp.get("crop_size") if pp.get("do_center_crop", True) and pp.get("crop_size") else pp.get("size")
    size = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if not isinstance(size, int) or "image_mean" not in pp or "image_std" not in pp:
        return None
    return {"img_size": size, "mean": list(pp["image_mean"]), "std": list(pp["image_std"])}


def _load_hf(ck, attn, fmt):
    """Hugging Face Dinov2Model / Dinov2WithRegistersModel: architecture from config.json. HF adds the position
    embedding to [CLS, patches], then inserts the registers after CLS without one: our embed() builds exactly
    [CLS + cls_pos, registers, patches + pos]. Positions are resized as HF does (antialias for the registers class)."""
    c = ck.hf_config
    if c is None:
        raise UserError(f"{ck.path}: Hugging Face weights need a readable config.json in the same folder")
    mt = c.get("model_type")
    if mt not in ("dinov2", "dinov2_with_registers"):
        raise UserError(f"{ck.path}: config.json has model_type {mt!r}; only dinov2 / dinov2_with_registers load")
    if c.get("use_swiglu_ffn"):
        raise UserError(f"{ck.path}: a SwiGLU feed-forward (DINOv2 ViT-g) is not supported by model.py's ViT")
    if c.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{ck.path}: hidden_act {c['hidden_act']!r} is not supported (only gelu)")
    state = _tensor_dict(ck.obj, ck.path)
    if any(k.startswith("dinov2.") for k in state):  # Dinov2ForImageClassification: drop the classifier head
        state = {k[len("dinov2."):]: v for k, v in state.items() if k.startswith("dinov2.")}
    state = _strip(state, ("module.", "_orig_mod."), ck.path)
    one = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731 (image_size / patch_size may be pairs)
    dim = c.get("hidden_size", 768)
    vit = VisionTransformer(img_size=one(c.get("image_size", 224)), patch_size=one(c.get("patch_size", 14)),
                            in_chans=c.get("num_channels", 3), embed_dim=dim, depth=c.get("num_hidden_layers", 12),
                            num_heads=c.get("num_attention_heads", 12), mlp_ratio=c.get("mlp_ratio", 4),
                            qkv_bias=c.get("qkv_bias", True), cls_token=True,
                            num_register_tokens=c.get("num_register_tokens", 4) if mt == "dinov2_with_registers" else 0,
                            learned_pos=True, layer_scale=1.0, eps=c.get("layer_norm_eps", 1e-6),
                            interp_antialias=mt == "dinov2_with_registers", attn=attn)
    new = any(".attention.q_proj." in k for k in state)
    _load_mapped(vit, state, functools.partial(_hf_source, new_names=new), ck.path, ignore={"embeddings.mask_token"})
    if fmt == "rad-dino":
        return vit, {"img_size": 518, "mean": list(RAD_DINO_MEAN), "std": list(RAD_DINO_STD)}
    preset = _hf_preset(ck.hf_preprocess) if ck.hf_preprocess else None
    if preset:
        return vit, {**preset, "preset": "preprocessor_config.json"}
    return vit, {"img_size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


LOADERS = {
    "radjepa-encoder": _load_own,
    "radjepa": functools.partial(_load_jepa, fmt="radjepa"),
    "ijepa": functools.partial(_load_jepa, fmt="ijepa"),
    "dinov2-hf": functools.partial(_load_hf, fmt="dinov2-hf"),
    "rad-dino": functools.partial(_load_hf, fmt="rad-dino"),
    "dinov2": _load_dinov2,
}


def detect_format(path):
    """The format name (a LOADERS key) of a checkpoint path or Checkpoint, and why: (fmt, reason)."""
    ck = path if isinstance(path, Checkpoint) else Checkpoint(path)
    obj = ck.obj
    if ck.meta.get("format") == "radjepa-encoder":
        return "radjepa-encoder", "project export"
    if ck.hf_config is not None and ck.hf_config.get("model_type", "").startswith("dinov2") and \
            any(k.endswith("patch_embeddings.projection.weight") for k in obj):
        return "dinov2-hf", ("Hugging Face Dinov2 config.json; pass --encoder_format rad-dino for RAD-DINO's "
                             "preprocessing" + (" (used here: preprocessor_config.json)" if ck.hf_preprocess else ""))
    if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in ("target_encoder", "encoder")):
        # Meta's files (IN1K-vit.h.14-300e.pth.tar, ...) are whole training states; the RadJEPa release is named
        if "predictor" in obj and "opt" in obj and "jepa_encoder" not in os.path.basename(ck.path):
            return "ijepa", ("I-JEPA training checkpoint (predictor + opt); pass --encoder_format radjepa for CXR "
                             "preprocessing")
        return "radjepa", "JEPA encoder state dict; pass --encoder_format ijepa for ImageNet preprocessing"
    if isinstance(obj, dict) and any(k.endswith("patch_embeddings.projection.weight") for k in obj):
        return "dinov2-hf", "Hugging Face Dinov2 key names"
    state = backbone_state(obj, ck.path)
    if "cls_token" in state and any(k.startswith("blocks.") for k in state):
        return "dinov2", "original DINOv2 key names"
    if "patch_embed.proj.weight" in state:
        return "radjepa", "ViT state dict without CLS token; pass --encoder_format ijepa for ImageNet preprocessing"
    raise UserError(f"{ck.path}: cannot tell the checkpoint format (keys like {sorted(state)[:4]}); "
                    f"pass --encoder_format ({', '.join(LOADERS)})")


# ----------------------------------------------------------------------------------------------------------------
# the entry point

def _override(info, vit, img_size, mean, std):
    """Apply --enc_img_size / --enc_mean / --enc_std; one value of mean or std is repeated to the other's length."""
    if img_size:
        info["img_size"] = int(img_size)
    mean = [float(v) for v in mean] if mean else info["mean"]
    std = [float(v) for v in std] if std else info["std"]
    if len(mean) != len(std):
        if 1 not in (len(mean), len(std)):
            raise UserError(f"--enc_mean has {len(mean)} values and --enc_std {len(std)}: give the same number (1 or 3)")
        n = max(len(mean), len(std))
        mean, std = mean * (n // len(mean)), std * (n // len(std))
    stem = vit.patch_embed.proj.in_channels
    if len(mean) not in (1, stem):
        raise UserError(f"--enc_mean / --enc_std: {len(mean)} channels, but the encoder takes 1 or {stem}")
    if min(std) <= 0:
        raise UserError(f"--enc_std must be positive, got {std}")
    if info["img_size"] % vit.patch_size:
        raise UserError(f"--enc_img_size {info['img_size']} is not a multiple of the patch size {vit.patch_size}")
    info["mean"], info["std"], info["in_chans"] = mean, std, len(mean)
    return info


def load_encoder(path=None, fmt="auto", model="vit_base", img_size=224, patch_size=14, attn="sdpa",
                 enc_img_size=None, enc_mean=None, enc_std=None):
    """Return (vit, info) with the encoder in eval mode and frozen. path None: the default pretraining export if a
    run left one, else a randomly initialised `model` (the floor every encoder should beat); info['source'] says
    which, for the run's output. enc_img_size / enc_mean / enc_std override the format's preprocessing preset."""
    if path is None and os.path.exists(DEFAULT_EXPORT):
        path = DEFAULT_EXPORT
    if path is None:
        torch.manual_seed(0)
        vit = build_vit(model, img_size=img_size, patch_size=patch_size, attn=attn)
        info = {"format": "random-init", "source": f"random-init {model} (no --encoder and no {DEFAULT_EXPORT})",
                **cxr_preset(img_size)}
    else:
        if not os.path.exists(path):
            raise UserError(f"--encoder {path}: no such file or folder")
        if fmt not in (None, "auto") and fmt not in LOADERS:
            raise UserError(f"--encoder_format {fmt!r} unknown: choose from auto, {', '.join(LOADERS)}")
        ck = Checkpoint(path)
        why = None
        if fmt in (None, "auto"):
            fmt, why = detect_format(ck)
        vit, info = LOADERS[fmt](ck, attn)
        info["format"] = fmt
        info["source"] = f"{path} ({fmt}{', auto-detected: ' + why if why else ''})"
        c = vit.config
        info["arch"] = (f"ViT {c['embed_dim']}-d x {c['depth']} blocks, {c['num_heads']} heads, patch {c['patch_size']}, "
                        f"{vit.grid[0]}x{vit.grid[1]} positions" + (", CLS" if c["cls_token"] else "")
                        + (f", {c['num_register_tokens']} registers" if c["num_register_tokens"] else "")
                        + (", layer scale" if c["layer_scale"] else ""))
        del ck
    set_attn(vit, attn)
    vit.eval().requires_grad_(False)
    return vit, _override(info, vit, enc_img_size, enc_mean, enc_std)


def add_encoder_args(p):
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default=None,
                   help=f"frozen encoder: a checkpoint file or Hugging Face folder (default: {DEFAULT_EXPORT} if "
                        "present, else random init)")
    g.add_argument("--encoder_format", default="auto", choices=["auto", *LOADERS],
                   help="checkpoint format (default: detected from its contents)")
    g.add_argument("--enc_img_size", type=int, default=None,
                   help="input resolution for the encoder (default: its format's preset, e.g. 518 for RAD-DINO)")
    g.add_argument("--enc_mean", type=float, nargs="+", default=None,
                   help="normalisation mean, 1 value (grayscale) or 3 (RGB) (default: the format's preset)")
    g.add_argument("--enc_std", type=float, nargs="+", default=None, help="normalisation std (see --enc_mean)")
    return g


def load_encoder_from_args(args):
    """load_encoder with the flags of add_encoder_args and add_common_args."""
    return load_encoder(args.encoder, args.encoder_format, getattr(args, "model", "vit_base"),
                        getattr(args, "img_size", 224), getattr(args, "patch_size", 14),
                        getattr(args, "attn", None) or "sdpa",
                        enc_img_size=getattr(args, "enc_img_size", None), enc_mean=getattr(args, "enc_mean", None),
                        enc_std=getattr(args, "enc_std", None))
