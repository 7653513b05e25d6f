"""
Saving and loading frozen encoders for the downstream scripts (probe.py, segment.py, report.py).

    from encoders import save_encoder, load_encoder
    save_encoder(vit, "out/pretrain/encoder.safetensors", step=1000)
    vit, info = load_encoder("out/pretrain/encoder.safetensors")   # info: source, format, img_size, mean, std, ...
    vit, info = load_encoder(None, model="vit_small")              # default export if present, else random init

The project's own format is a safetensors file whose metadata holds the ViT's constructor arguments as JSON, so
an encoder is rebuilt without knowing how it was trained. Loading never unpickles code: safetensors, or torch.load
with weights_only=True.
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common import UserError
from data import CXR_MEAN, CXR_STD
from model import build_vit, VisionTransformer, set_attn

DEFAULT_EXPORT = os.path.join("out", "pretrain", "encoder.safetensors")


def save_encoder(vit, path, **meta):
    """Write vit's weights + config (safetensors metadata) atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in vit.state_dict().items()}
    md = {"format": "radjepa-encoder", "config": json.dumps(vit.config)}
    md.update({k: json.dumps(v) for k, v in meta.items()})
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(state, tmp, metadata=md)
    os.replace(tmp, path)


def cxr_preset(img_size):
    """Preprocessing for the project's own encoders: grayscale, CXR intensity statistics."""
    return {"img_size": img_size, "mean": [CXR_MEAN], "std": [CXR_STD]}


def _load_own(path, attn):
    with safe_open(path, framework="pt") as f:
        md = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(md["config"])
    vit = VisionTransformer(attn=attn, **cfg)
    _strict_load(vit, state, path)
    return vit, {"format": "radjepa-encoder", **cxr_preset(cfg["img_size"]),
                 "meta": {k: v for k, v in md.items() if k not in ("config", "format")}}


def _strict_load(module, state, path):
    """load_state_dict that names every missing or unexpected key instead of loading half a model."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shape:
            parts.append("shape mismatch " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shape[:8]))
        raise UserError(f"{path}: cannot load encoder: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


def detect_format(path):
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                md = f.metadata() or {}
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})")
        if md.get("format") == "radjepa-encoder":
            return "radjepa-encoder"
    raise UserError(f"{path}: cannot tell the checkpoint format; pass --encoder_format")


LOADERS = {"radjepa-encoder": _load_own}


def load_encoder(path=None, fmt="auto", model="vit_base", img_size=224, patch_size=14, attn="sdpa"):
    """Return (vit, info) with the encoder in eval mode and frozen. path None: the default pretraining export if a
    run left one, else a randomly initialised `model` (the floor every encoder should beat); info['source'] says
    which, for the run's output."""
    if path is None and os.path.exists(DEFAULT_EXPORT):
        path = DEFAULT_EXPORT
    if path is None:
        torch.manual_seed(0)
        vit = build_vit(model, img_size=img_size, patch_size=patch_size, attn=attn)
        info = {"format": "random-init", "source": f"random-init {model} (no --encoder and no {DEFAULT_EXPORT})",
                **cxr_preset(img_size)}
    else:
        if not os.path.exists(path):
            raise UserError(f"--encoder {path}: no such file")
        fmt = detect_format(path) if fmt in (None, "auto") else fmt
        if fmt not in LOADERS:
            raise UserError(f"--encoder_format {fmt!r} unknown: choose from {', '.join(LOADERS)}")
        vit, info = LOADERS[fmt](path, attn)
        info["source"] = f"{path} ({fmt})"
        info["format"] = fmt
    set_attn(vit, attn)
    vit.eval().requires_grad_(False)
    info.setdefault("in_chans", len(info["mean"]))
    return vit, info


def add_encoder_args(p):
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default=None,
                   help=f"frozen encoder checkpoint (default: {DEFAULT_EXPORT} if present, else random init)")
    g.add_argument("--encoder_format", default="auto", help="force the checkpoint format: " + ", ".join(LOADERS))
    return g
