"""
Reading published weight files safely and mapping their keys onto this project's modules (encoders.py's plumbing,
apart so its loaders read top to bottom): a checkpoint is opened once, never unpickling code (safetensors, or
torch.load with weights_only=True; TorchScript archives refused), and every parameter of the model names the
checkpoint tensor(s) it comes from, so a missing or unused key is an error that names it, never a partial load.
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

def _torch_load(path):
    """torch.load that only rebuilds tensors and plain containers. A pickle that asks for anything else (a function
    such as os.system, a class) is refused before any of it runs."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist()):
                raise UserError(f"{path}: a TorchScript archive (OpenAI's clip.load files are), which holds code; it is "
                                "not run. If you trust it, save its weights once: torch.save(torch.jit.load(path, "
                                "map_location='cpu').state_dict(), 'ViT-L-14.state_dict.pt') and pass that file")
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
    config.json, RadJEPa's hub snapshot, an open_clip hub folder, or a pretraining run's out_dir holding
    encoder.safetensors). A modeling_*.py beside the weights is never imported: only the weights are read."""

    def __init__(self, path):
        self.path = path
        self.folder = folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        self.hf_config = _read_json(os.path.join(folder, "config.json"))
        self.hf_preprocess = _read_json(os.path.join(folder, "preprocessor_config.json"))
        self.open_clip = _read_json(os.path.join(folder, "open_clip_config.json"))
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
        names = ["encoder.safetensors", "jepa_encoder.pth.tar", "open_clip_model.safetensors",
                 "open_clip_pytorch_model.bin", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
        for n in names:
            if os.path.exists(os.path.join(folder, n)):
                return os.path.join(folder, n)
        raise UserError(f"--encoder {folder}: a folder must hold config.json + model.safetensors (Hugging Face), "
                        "jepa_encoder.pth.tar (RadJEPa's hub snapshot), open_clip_pytorch_model.bin (open_clip) or "
                        "encoder.safetensors (a pretraining run); found none")


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
    state = strip_prefixes(tensor_dict(obj, path), ("module.", "_orig_mod."), path)
    for pre in ("teacher.backbone.", "backbone."):
        if any(k.startswith(pre) for k in state):
            state = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
            break
    return strip_prefixes(state, ("encoder.", "backbone.", "module."), path)


# ----------------------------------------------------------------------------------------------------------------
# key mapping: every parameter of our ViT names the checkpoint tensor(s) it comes from

def load_mapped(vit, state, source_of, path, ignore=()):
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


def same_name(k):
    return [k], None


def _split_cls_pos(key):
    """Checkpoints that keep the CLS position in slot 0 of one position table (DINOv2, timm, MAE, CLIP); ours
    keeps it apart in cls_pos_embed. Handles (1, 1 + N, D) and CLIP's (1 + N, D)."""
    lead = lambda p: p if p.ndim == 3 else p[None]  # noqa: E731
    return {"cls_pos_embed": ([key], lambda p: lead(p)[:, :1]), "pos_embed": ([key], lambda p: lead(p)[:, 1:])}


def dinov2_source(k):
    """Meta's DINOv2 / timm / MAE naming is ours, but for the CLS position (slot 0 of pos_embed)."""
    return _split_cls_pos("pos_embed").get(k) or ([k], None)


def _qkv(names):
    return names, lambda q, kk, v: torch.cat([q, kk, v], 0)


def hf_source(k, new_names=False, ijepa=False):
    """Our key -> Hugging Face Dinov2 / IJepa key(s). Checkpoints on the Hub (attention.attention.query/key/value,
    attention.output.dense, mlp.weights_in) and transformers 5's in-memory names (attention.q_proj, ...,
    attention.o_proj, mlp.gate_proj / up_proj / down_proj, and IJepa's layers.N without encoder.) both work; q, k
    and v are concatenated in that order into our fused qkv (heads-major inside each, as HF splits)."""
    if k in ("cls_pos_embed", "pos_embed") and not ijepa:
        return _split_cls_pos("embeddings.position_embeddings")[k]
    if k == "pos_embed":
        return ["embeddings.position_embeddings"], None
    if k in ("cls_token", "register_tokens"):
        return [f"embeddings.{k}"], None
    if k.startswith("patch_embed.proj."):
        return ["embeddings.patch_embeddings.projection." + k.split(".")[-1]], None
    if k.startswith("norm."):
        return ["layernorm." + k.split(".")[-1]], None
    m = re.match(r"blocks\.(\d+)\.(.+)$", k)
    if not m:
        return [k], None
    i, rest = m.group(1), m.group(2)
    pre, wb = (f"layers.{i}." if ijepa and new_names else f"encoder.layer.{i}."), rest.split(".")[-1]
    if rest.startswith("attn.qkv."):
        qkv = ["q_proj", "k_proj", "v_proj"] if new_names else ["attention.query", "attention.key", "attention.value"]
        return _qkv([f"{pre}attention.{n}.{wb}" for n in qkv])
    if rest.startswith("attn.proj."):
        return [pre + ("attention.o_proj." if new_names else "attention.output.dense.") + wb], None
    if rest in ("ls1.gamma", "ls2.gamma"):
        return [f"{pre}layer_scale{rest[2]}.lambda1"], None
    if rest.startswith("mlp.w12."):  # SwiGLU: [gate, value] fused, as the hub stores it
        return ([f"{pre}mlp.gate_proj.{wb}", f"{pre}mlp.up_proj.{wb}"], lambda a, b: torch.cat([a, b], 0)) \
            if new_names else ([f"{pre}mlp.weights_in.{wb}"], None)
    if rest.startswith("mlp.w3."):
        return [pre + ("mlp.down_proj." if new_names else "mlp.weights_out.") + wb], None
    if ijepa:  # ViT naming: layernorm_before / after, intermediate.dense, output.dense
        if not new_names:
            rest = {"mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}.get(rest.rsplit(".", 1)[0],
                                                                                    rest.rsplit(".", 1)[0]) + "." + wb
        rest = rest.replace("norm1.", "layernorm_before.").replace("norm2.", "layernorm_after.")
    return [pre + rest], None  # Dinov2: norm1, norm2, mlp.fc1, mlp.fc2 have the same names


def clip_hf_source(k):
    """Our key -> transformers CLIPVisionModel key (CLIPModel's vision_model.* once that prefix is stripped)."""
    e = "embeddings."
    fixed = {"cls_token": ([e + "class_embedding"], lambda t: t.reshape(1, 1, -1)),
             "patch_embed.proj.weight": ([e + "patch_embedding.weight"], None),
             **_split_cls_pos(e + "position_embedding.weight")}
    if k in fixed:
        return fixed[k]
    if k.startswith(("norm_pre.", "norm.")):
        return [("pre_layrnorm." if k.startswith("norm_pre.") else "post_layernorm.") + k.split(".")[-1]], None
    i, rest = re.match(r"blocks\.(\d+)\.(.+)$", k).groups()
    pre, wb = f"encoder.layers.{i}.", rest.split(".")[-1]
    if rest.startswith("attn.qkv."):
        return _qkv([f"{pre}self_attn.{n}_proj.{wb}" for n in "qkv"])
    rest = rest.replace("attn.proj.", "self_attn.out_proj.").replace("norm1.", "layer_norm1.")
    return [pre + rest.replace("norm2.", "layer_norm2.")], None


def openai_clip_source(k):
    """Our key -> OpenAI CLIP's state dict key (visual.*: conv1, class_embedding, positional_embedding, ln_pre,
    transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post)."""
    v = "visual."
    fixed = {"cls_token": ([v + "class_embedding"], lambda t: t.reshape(1, 1, -1)),
             "patch_embed.proj.weight": ([v + "conv1.weight"], None), **_split_cls_pos(v + "positional_embedding")}
    if k in fixed:
        return fixed[k]
    if k.startswith(("norm_pre.", "norm.")):
        return [v + ("ln_pre." if k.startswith("norm_pre.") else "ln_post.") + k.split(".")[-1]], None
    i, rest = re.match(r"blocks\.(\d+)\.(.+)$", k).groups()
    pre, wb = f"{v}transformer.resblocks.{i}.", rest.split(".")[-1]
    part = {"attn.qkv": f"attn.in_proj_{wb}", "attn.proj": f"attn.out_proj.{wb}", "norm1": f"ln_1.{wb}",
            "norm2": f"ln_2.{wb}", "mlp.fc1": f"mlp.c_fc.{wb}", "mlp.fc2": f"mlp.c_proj.{wb}"}[rest.rsplit(".", 1)[0]]
    return [pre + part], None
