"""
encoders.py's plumbing: reading published weight files safely, once (safetensors, or torch.load with
weights_only=True; TorchScript archives refused), and mapping their keys onto this project's modules: every
parameter names the checkpoint tensor(s) it comes from, so a missing or unused key is an error that names it.
"""
import json
import os
import pickle
import re
import warnings
import zipfile

import torch
from safetensors import safe_open

from base import UserError


# ----------------------------------------------------------------------------------------------------------------
# reading a checkpoint safely, once

def load_torch(path, need=()):
    """torch.load that only rebuilds tensors and containers: a pickle asking for anything else is refused unrun; an
    empty, truncated or foreign file, or one without the keys in `need`, is one line naming it. The one guard of
    every torch file a user names (encoders, pretraining and report checkpoints)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist()):
                raise UserError(f"{path}: a TorchScript archive (OpenAI's clip.load files are), which holds code; it "
                                "is not run. If you trust it, save its weights once: torch.save(torch.jit.load(path, "
                                "map_location='cpu').state_dict(), 'ViT-L-14.state_dict.pt') and pass that file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pickle protocol 4 detected" noise on hand-made pickles
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        glob = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not glob:
            why = next((l.strip() for l in str(e).splitlines() if "Unsupported" in l), str(e)[:200])
            raise UserError(f"{path}: not a checkpoint that can be read safely ({why})")
        raise UserError(f"{path}: refused: unpickling it would call {glob.group(1)}, i.e. run code, not just rebuild "
                        "tensors; only safetensors and plain tensor checkpoints are loaded. If you trust the file, "
                        "re-save its state dict with torch.save(model.state_dict(), ...)")
    except Exception as e:  # an empty file says nothing: EOFError with no message
        why = (str(e).splitlines() or ["the file is empty or cut short"])[0][:160]
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {why})")
    missing = [k for k in need if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UserError(f"{path}: not the checkpoint expected here (no {', '.join(missing)}): a file of another "
                        "program or version, or a damaged one")
    return obj


def _read_safetensors(path):
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})")


def _read_json(path):
    """A JSON file's contents, or None when it is absent or unreadable (a stray config.json is no error)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


FOLDER_FILES = ("encoder.safetensors", "jepa_encoder.pth.tar", "open_clip_model.safetensors",
                "open_clip_pytorch_model.bin", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin")


class Checkpoint:
    """One --encoder path, read once: a torch or safetensors file, or a folder holding one of FOLDER_FILES (and
    config.json files; a modeling_*.py beside them is never imported)."""

    def __init__(self, path):
        self.path = path
        self.folder = folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        self.hf_config = _read_json(os.path.join(folder, "config.json"))
        self.hf_preprocess = _read_json(os.path.join(folder, "preprocessor_config.json"))
        self.open_clip = _read_json(os.path.join(folder, "open_clip_config.json"))
        self.file = path
        if os.path.isdir(path):
            self.file = next((os.path.join(path, n) for n in FOLDER_FILES if os.path.exists(os.path.join(path, n))),
                             None)
            if self.file is None:
                raise UserError(f"--encoder {path}: a folder must hold config.json + model.safetensors (Hugging "
                                "Face), jepa_encoder.pth.tar (RadJEPa's hub snapshot), open_clip_pytorch_model.bin "
                                "(open_clip) or encoder.safetensors (a pretraining run); found none")
        self.meta = {}
        if self.file.endswith(".index.json"):  # a sharded Hugging Face checkpoint
            shards = set((_read_json(self.file) or {}).get("weight_map", {}).values())
            self.obj = {k: v for s in sorted(shards) for k, v in _read_safetensors(os.path.join(folder, s))[0].items()}
        elif self.file.endswith(".safetensors"):
            self.obj, self.meta = _read_safetensors(self.file)
        else:
            self.obj = load_torch(self.file)


def tensor_dict(obj, path):
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise UserError(f"{path}: entries {bad[:5]} are not tensors: not an encoder state dict")
    return obj


def strip_prefixes(state, prefixes, path):
    out = {}
    for k, v in state.items():
        k0 = k
        while k.startswith(prefixes):
            k = k[len(next(p for p in prefixes if k.startswith(p))):]
        if k in out:
            raise UserError(f"{path}: keys {k0!r} and another both become {k!r} once prefixes are stripped")
        out[k] = v
    return out


def model_state(obj, path, parts=()):
    """obj's tensors without DDP's 'module.' and torch.compile's '_orig_mod.'; of a whole model (a task model's head
    beside its backbone, DINOv2's training heads), only those under the first of `parts` that a key starts with."""
    state = strip_prefixes(tensor_dict(obj, path), ("module.", "_orig_mod."), path)
    pre = next((p for p in parts if any(k.startswith(p) for k in state)), "")
    return {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}


def plain_state(obj, path):
    """A state dict saved as it is or under 'state_dict' (CLIP, open_clip, BioViL-T), as model_state gives it."""
    return model_state(obj.get("state_dict", obj) if isinstance(obj, dict) else obj, path)


def backbone_state(obj, path):
    """The encoder's state dict from an I-JEPA / RadJEPa / DINOv2 torch file: under 'target_encoder' (the EMA
    encoder the papers evaluate, preferred), 'encoder', 'teacher', 'model' or 'state_dict', or the file itself; of
    DINOv2's training files only 'backbone.*' (the teacher's if both); 'encoder.' and 'backbone.' prefixes stripped."""
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("target_encoder", "encoder", "teacher", "model", "state_dict")
                    if isinstance(obj.get(k), dict)), obj)
    state = model_state(obj, path, ("teacher.backbone.", "backbone."))
    return strip_prefixes(state, ("encoder.", "backbone.", "module."), path)


# ----------------------------------------------------------------------------------------------------------------
# key mapping: every parameter of our ViT names the checkpoint tensor(s) it comes from

def load_mapped(vit, state, source_of, path, ignore=()):
    """`vit` with every tensor filled from `state`: source_of(our key) -> (checkpoint keys, combine or None). Missing,
    unknown (not in `ignore`) and mis-shaped keys are a UserError naming them in the checkpoint's own naming."""
    out, used, missing, shape = {}, set(), [], []
    for k, ref in vit.state_dict().items():
        srcs, combine = source_of(k)
        missing += [s for s in srcs if s not in state]
        if any(s not in state for s in srcs):
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
    problems = (("missing keys", list(dict.fromkeys(missing))),
                ("unexpected keys", sorted(set(state) - used - set(ignore))), ("shape mismatch", shape))
    parts = [f"{what} {', '.join(keys[:6])}{f' (+{len(keys) - 6} more)' if len(keys) > 6 else ''}"
             for what, keys in problems if keys]
    if parts:
        raise UserError(f"{path}: cannot load encoder: {'; '.join(parts)}")
    vit.load_state_dict(out, strict=True)
    return vit


def same_name(k):
    return [k], None


def _split_cls_pos(key):
    """Checkpoints that keep the CLS position in slot 0 of one position table, (1, 1 + N, D) or CLIP's (1 + N, D)
    (DINOv2, timm, MAE, CLIP); ours keeps it apart in cls_pos_embed."""
    return {"cls_pos_embed": ([key], lambda p: p.reshape(1, -1, p.shape[-1])[:, :1]),
            "pos_embed": ([key], lambda p: p.reshape(1, -1, p.shape[-1])[:, 1:])}


def dinov2_source(k):
    """Meta's DINOv2 / timm / MAE naming is ours, but for the CLS position (slot 0 of pos_embed)."""
    return _split_cls_pos("pos_embed").get(k) or ([k], None)


def _concat(names):  # q, k, v into our fused qkv (heads-major inside each, as HF splits); SwiGLU's [gate, value]
    return names, lambda *ts: torch.cat(ts, 0)


def hf_source(k, new_names=False, ijepa=False):
    """Our key -> Hugging Face Dinov2 / IJepa key(s): as the Hub's files name them, or (new_names) as transformers 5
    does in memory (attention.q_proj, mlp.gate_proj / up_proj / down_proj, IJepa's layers.N)."""
    if k in ("cls_pos_embed", "pos_embed") and not ijepa:
        return _split_cls_pos("embeddings.position_embeddings")[k]
    hub = {"pos_embed": "embeddings.position_embeddings", "cls_token": "embeddings.cls_token", "norm": "layernorm",
           "register_tokens": "embeddings.register_tokens",
           "patch_embed.proj": "embeddings.patch_embeddings.projection"}
    head, _, wb = k.rpartition(".")
    if k in hub or head in hub:
        return [hub[k] if k in hub else f"{hub[head]}.{wb}"], None
    i, part, wb = re.match(r"blocks\.(\d+)\.(.+)\.(\w+)$", k).groups()
    pre = f"layers.{i}." if ijepa and new_names else f"encoder.layer.{i}."
    if part == "attn.qkv":
        qkv = ["q_proj", "k_proj", "v_proj"] if new_names else ["attention.query", "attention.key", "attention.value"]
        return _concat([f"{pre}attention.{n}.{wb}" for n in qkv])
    if part in ("ls1", "ls2"):
        return [f"{pre}layer_scale{part[2]}.lambda1"], None
    if part == "mlp.w12" and new_names:
        return _concat([f"{pre}mlp.gate_proj.{wb}", f"{pre}mlp.up_proj.{wb}"])
    names = {"attn.proj": "attention.o_proj" if new_names else "attention.output.dense",
             "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.down_proj" if new_names else "mlp.weights_out"}
    if ijepa:  # ViT naming (Dinov2 keeps norm1, norm2, mlp.fc1, mlp.fc2)
        names.update(norm1="layernorm_before", norm2="layernorm_after")
        if not new_names:
            names.update({"mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
    return [f"{pre}{names.get(part, part)}.{wb}"], None


# our name: (transformers' CLIPVisionModel, i.e. CLIPModel's vision_model.* once stripped; OpenAI's state dict)
CLIP_NAMES = {"cls_token": ("embeddings.class_embedding", "visual.class_embedding"),
              "patch_embed.proj": ("embeddings.patch_embedding", "visual.conv1"),
              "pos": ("embeddings.position_embedding.weight", "visual.positional_embedding"),
              "norm_pre": ("pre_layrnorm", "visual.ln_pre"), "norm": ("post_layernorm", "visual.ln_post"),
              "blocks": ("encoder.layers.{}.", "visual.transformer.resblocks.{}."), "norm1": ("layer_norm1", "ln_1"),
              "attn.proj": ("self_attn.out_proj", "attn.out_proj"), "norm2": ("layer_norm2", "ln_2"),
              "mlp.fc1": ("mlp.fc1", "mlp.c_fc"), "mlp.fc2": ("mlp.fc2", "mlp.c_proj")}


def clip_source(k, openai=False):
    """Our key -> CLIP's: transformers' CLIPVisionModel, or OpenAI's state dict (visual.*: conv1, ln_pre,
    transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post)."""
    name = {ours: theirs[openai] for ours, theirs in CLIP_NAMES.items()}
    if k == "cls_token":
        return [name[k]], lambda t: t.reshape(1, 1, -1)
    if k in ("cls_pos_embed", "pos_embed"):
        return _split_cls_pos(name["pos"])[k]
    if m := re.match(r"(patch_embed\.proj|norm_pre|norm)\.(\w+)$", k):
        return [f"{name[m[1]]}.{m[2]}"], None
    i, part, wb = re.match(r"blocks\.(\d+)\.(.+)\.(\w+)$", k).groups()
    pre = name["blocks"].format(i)
    if part == "attn.qkv" and not openai:
        return _concat([f"{pre}self_attn.{n}_proj.{wb}" for n in "qkv"])
    return [f"{pre}attn.in_proj_{wb}" if part == "attn.qkv" else f"{pre}{name[part]}.{wb}"], None
