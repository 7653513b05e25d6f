"""
The language model of report.py: a Llama decoder in plain PyTorch, small and trained from scratch by default, or a
local Hugging Face Llama / Vicuna checkpoint (the paper's Vicuna-7B v1.5) loaded by name into the same code; its
sentencepiece tokenizer, LoRA adapters saved for peft, and fine-tuning over the ranks with DDP or FSDP2.

    from llama import LlamaConfig, Llama, load_hf_llama, generate, apply_lora
    lm = Llama(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4))                     # random init
    lm = load_hf_llama("/models/vicuna-7b-v1.5", dtype=torch.bfloat16)  # config.json + safetensors / .bin shards
    logits = lm(input_ids)                        # or lm(inputs_embeds=e) to splice image tokens into the prompt
    out = generate(lm, inputs_embeds=e, attention_mask=m, max_new_tokens=150, eos_token_id=2)  # list of id lists
    apply_lora(lm, r=8, alpha=16)                 # q/k/v/o get low-rank adapters; everything else frozen
    save_peft_adapter(lm, "out/adapter", base="/models/vicuna-7b-v1.5")  # adapter_config.json + safetensors
    shard_fsdp(model, lm.model.layers, "cuda", param_dtype=torch.bfloat16)  # FSDP2 under torchrun (report.py --fsdp)
    steps, mem, total = fine_tune(model, n, batch_of, args, env, warmup=0.03)  # report.py's training loop

Parameter names are Hugging Face's (model.embed_tokens, model.layers.N.self_attn.q_proj, ..., lm_head), so a
checkpoint loads by name with a strict key check; the numerics follow transformers' LlamaForCausalLM (RMSNorm in
float32, "rotate_half" rotary embeddings, SwiGLU, grouped-query attention), checked to 1e-4 against transformers.
"""
import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from base import JsonlLogger, UserError, cosine


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None     # None: = num_attention_heads (no grouped-query attention)
    head_dim: int = None                # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None           # None, {"rope_type": "linear", "factor"} or Llama 3.1's "llama3" dict
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    hidden_act: str = "silu"
    dtype: str = None                   # the checkpoint's dtype (config.json "torch_dtype" / "dtype")

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise UserError(f"hidden_act {self.hidden_act!r} is not supported (Llama uses silu)")

    @classmethod
    def from_json(cls, path):
        """From a Hugging Face config.json (transformers 4.x and 5.x spellings)."""
        with open(path) as f:
            d = json.load(f)
        if d.get("model_type", "llama") not in ("llama", "mistral"):
            raise UserError(f"config.json model_type {d.get('model_type')!r}: --lm needs a Llama-architecture model")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name != "dtype"}
        kw["dtype"] = d.get("torch_dtype") or d.get("dtype")
        # transformers 5 moved rope_theta / rope_scaling into one "rope_parameters" dict
        rp = d.get("rope_parameters") or {}
        if "rope_theta" in rp:
            kw["rope_theta"] = rp["rope_theta"]
        kw["rope_scaling"] = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        if isinstance(kw.get("eos_token_id"), list):  # Llama 3 lists several stop tokens; the first is </s>-like
            kw["eos_token_id"] = kw["eos_token_id"][0]
        return cls(**kw)

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalised in float32 and cast back before the gain, exactly as transformers does (matters in bf16)
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(cfg):
    """Rotary inverse frequencies (head_dim / 2,) on the CPU in float32, with the config's scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":  # Llama 3.1: long wavelengths divided by `factor`, short kept, smooth blend in between
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(mid, blended, out)
    raise UserError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)")


def rotate_half(x):
    """HF layout: the head dimension is two halves [x1, x2] (not interleaved pairs); rotation gives [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys / values of every layer, (B, n_kv_heads, max_len, head_dim), `length` tokens filled."""

    def __init__(self, cfg, batch, max_len):
        self.shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = self.v = None
        self.length = 0

    def update(self, layer, k, v):
        """Write this step's k, v (B, n_kv, T, hd) after the filled part; return all keys / values so far."""
        if self.k is None:  # allocated at first use, in the dtype autocast gives k and v (bf16 on GPU)
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k.to(self.k.dtype)
        self.v[layer, :, :, self.length:end] = v.to(self.v.dtype)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg, idx):
        super().__init__()
        self.idx, self.h, self.kv, self.hd = idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.h * self.hd, cfg.hidden_size, bias=b)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.idx, k, v)
        if self.kv != self.h:  # grouped-query attention: each key/value head serves h // kv query heads
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        # no mask: plain causal self-attention over exactly these T tokens, SDPA's fastest path
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.h * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, idx):
        super().__init__()
        self.self_attn = Attention(cfg, idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # a bare container so parameter names carry HF's "model." prefix
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # kept off the module state (not a buffer): checkpoints never carry it and meta-device construction
        # (load_hf_llama) cannot lose it
        self._inv_freq = rope_inv_freq(cfg)
        self.gradient_checkpointing = False
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self, std=0.02):
        """Normal(0, 0.02) linears and embeddings (HF's initializer_range), ones for the norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None, last_only=False,
                hidden_only=False):
        """Logits (B, T, vocab) (or (B, 1, vocab) with last_only; the final-normed hidden states (B, T, d) with
        hidden_only, so a caller can apply lm_head to the few positions it needs). attention_mask (B, past + T):
        1 = real token, 0 = padding (left for generation, right for training), also over the tokens in `cache`.
        Positions count real tokens only, so a left-padded prompt gets the same positions as the unpadded one."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        position_ids = ((attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
                        if attention_mask is not None else torch.arange(past, past + T, device=x.device).expand(B, T))
        # rotary angles (B, T, hd / 2) in float32, as transformers computes them
        freqs = position_ids[..., None].float() * self._inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = None
        if attention_mask is not None or past > 0:
            # bool mask (B, 1, T, past + T): causal AND key not padding. Each query also always sees itself, so
            # a padding row is never fully masked (SDPA would return NaN there, and NaN keys/values would leak
            # into real rows as 0 * NaN in the next layer).
            S = past + T
            q_pos = torch.arange(past, S, device=x.device)[:, None]
            k_pos = torch.arange(S, device=x.device)[None, :]
            mask = (k_pos <= q_pos)[None, None].expand(B, 1, T, S)
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, :S].bool()
            mask = mask | (k_pos == q_pos)[None, None]
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # keep only each layer's input and recompute its inside (attention, MLP) during the backward pass
                x = checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x[:, -1:] if last_only else x)
        return x if hidden_only else self.lm_head(x)


def _next_token(logits, do_sample, temperature, top_p, generator):
    """Greedy argmax, or a draw from softmax(logits / temperature) cut to the smallest set of tokens whose
    probability reaches top_p (nucleus sampling; the most likely token always stays)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        p, order = probs.sort(-1, descending=True)
        drop = p.cumsum(-1) - p >= top_p  # tokens after the nucleus is full
        probs = probs.scatter(-1, order, p.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens=150, eos_token_id=2,
             use_cache=True, num_beams=1, do_sample=False, temperature=1.0, top_p=1.0, generator=None):
    """Greedy decoding (default) for a batch of prompts, left-padded (attention_mask marks the real tokens), or
    sampling (do_sample: temperature, top_p; a torch.Generator for repeatable draws), or beam search (num_beams > 1,
    one prompt at a time). Returns one list of new token ids per prompt, cut before its first EOS. Rows that
    finished keep decoding a dummy token (cheaper than reshaping the cache) until every row has finished or
    max_new_tokens is reached. use_cache=False recomputes the whole sequence at every step (the reference the
    cached path is tested against)."""
    x = model.embed(input_ids) if inputs_embeds is None else inputs_embeds
    B, T, _ = x.shape
    mask = attention_mask.long() if attention_mask is not None else torch.ones(B, T, dtype=torch.long, device=x.device)
    if num_beams > 1:
        return [beam_search(model, x[i:i + 1], mask[i:i + 1], max_new_tokens, eos_token_id, num_beams)
                for i in range(B)]
    cache = KVCache(model.config, B, T + max_new_tokens) if use_cache else None
    out = torch.zeros(B, 0, dtype=torch.long, device=x.device)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    step_in = x
    for _ in range(max_new_tokens):
        logits = model(inputs_embeds=step_in, attention_mask=mask, cache=cache, last_only=True)[:, -1].float()
        nxt = _next_token(logits, do_sample, temperature, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == eos_token_id
        if bool(done.all()):
            break
        e = model.embed(nxt[:, None]).to(x.dtype)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
        step_in = e if use_cache else torch.cat([step_in, e], dim=1)
    return [row[:row.index(eos_token_id)] if eos_token_id in row else row for row in out.tolist()]


def beam_search(model, x, mask, max_new_tokens, eos_token_id, num_beams):
    """Beam search for one prompt x (1, T, d), as transformers' generate(num_beams=K) with its defaults
    (length_penalty 1, early_stopping False): each step ranks the 2K best continuations of the K running beams by
    summed log-probability; of these, the top K that end (EOS, or the last step) join the K best finished reports,
    scored by sum / length (EOS counted); the K best that do not end run on. The search stops when every finished
    slot is filled and the best running beam, divided by its length now, cannot beat the worst of them. Returns
    the best finished report."""
    K = num_beams
    cache = KVCache(model.config, K, x.shape[1] + max_new_tokens)
    scores = torch.full((K,), -1e9, device=x.device)
    scores[0] = 0.0  # one live beam at the start: the K copies of the prompt are the same
    seqs, finished = [[] for _ in range(K)], []  # finished: the K best (score, report), best first
    step_in, mask = x.expand(K, -1, -1), mask.expand(K, -1)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(model(inputs_embeds=step_in, attention_mask=mask, cache=cache,
                                       last_only=True)[:, -1].float(), -1)
        V = logp.shape[1]
        top, idx = (scores[:, None] + logp).flatten().topk(2 * K)
        beam, word = (idx // V).tolist(), (idx % V).tolist()
        ends = [w == eos_token_id or t + 1 == max_new_tokens for w in word]
        new = [(float(top[r]) / (t + 1), seqs[beam[r]] + ([] if word[r] == eos_token_id else [word[r]]))
               for r in range(K) if ends[r]]
        finished = sorted(finished + new, key=lambda f: -f[0])[:K]  # sorted() is stable: earlier ties stay first
        if t + 1 == max_new_tokens:
            break
        run = (top - 1e9 * torch.tensor(ends, dtype=top.dtype, device=top.device)).topk(K)
        scores, order = run.values, [beam[r] for r in run.indices.tolist()]
        seqs = [seqs[beam[r]] + [word[r]] for r in run.indices.tolist()]
        if len(finished) == K and float(scores[0]) / (t + 1) <= finished[-1][0]:
            break
        idx_t = torch.tensor(order, device=x.device)
        cache.k, cache.v = cache.k[:, idx_t], cache.v[:, idx_t]
        step_in = model.embed(torch.tensor([q[-1] for q in seqs], device=x.device)[:, None]).to(x.dtype)
        mask = torch.cat([mask, torch.ones(K, 1, dtype=mask.dtype, device=mask.device)], dim=1)
    return finished[0][1]


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer

class Tokenizer:
    """sentencepiece model with Llama's ids: unk 0, bos 1, eos 2 (no pad id: padding positions are masked)."""

    def __init__(self, path):
        import sentencepiece as spm
        self.path, self.sp = path, spm.SentencePieceProcessor(model_file=path)
        self.bos, self.eos, self.encode = self.sp.bos_id(), self.sp.eos_id(), self.sp.encode

    def decode(self, ids):
        return self.sp.decode([i for i in ids if 0 <= i < self.sp.get_piece_size()])


def train_tokenizer(texts, path, vocab_size):
    """A sentencepiece unigram model of `texts`, saved to `path` (*.model); hard_vocab_limit=False lets a small
    corpus end with fewer pieces than asked for. byte_fallback=True, as in Llama's own tokenizer: a character never
    seen in training becomes its UTF-8 bytes instead of <unk>, so text round-trips exactly (for 256 byte pieces).
    No Unicode normalisation either (Llama's has none): NFKC would turn "SpO₂" into "SpO2"."""
    import sentencepiece as spm
    # bytes, specials, every character seen and the word boundary; at least 300, to leave pieces for words
    need = max(300, 256 + 3 + len(set("".join(texts)) - {" "}) + 1)
    if vocab_size < need:
        raise UserError(f"--vocab_size {vocab_size}: these reports need at least {need} pieces (256 byte pieces, "
                        f"3 specials, one per distinct character and some words); give --vocab_size {need} or more")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=path[:-len(".model")],
                                   vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
                                   byte_fallback=True, normalization_rule_name="identity", unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return Tokenizer(path)


# ----------------------------------------------------------------------------------------------------------------
# loading Hugging Face checkpoints

def _read_state(path):
    """All tensors of a HF checkpoint folder: model.safetensors, sharded safetensors (+ index), pytorch_model.bin,
    or sharded .bin (+ index). .bin files are read with weights_only=True (no code is unpickled)."""
    from safetensors.torch import load_file
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, f))][:1]
        if not files:
            raise UserError(f"--lm {path}: no model.safetensors, pytorch_model.bin or shard index in the folder")
    state = {}
    for name in files:
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise UserError(f"--lm {path}: shard {name} named in the index is missing")
        try:
            state.update(load_file(fp) if name.endswith(".safetensors") else
                         torch.load(fp, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise UserError(f"--lm {path}: cannot read {name} ({type(e).__name__}: {e})")
    return state


def load_hf_llama(path, dtype=None, device="cpu", meta=False):
    """A Llama from a HF-format folder (config.json + weights). The model is built on the meta device and the
    checkpoint tensors are assigned in place, so a 7B model needs its weights' memory once, not twice. dtype:
    default the checkpoint's. Every missing or unexpected key is named in the error. meta: config.json only, the
    model left on the meta device (an FSDP rank that receives its shards from rank 0: shard_fsdp)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise UserError(f"--lm {path}: no config.json (expected a Hugging Face model folder)")
    cfg = LlamaConfig.from_json(cfg_path)
    with torch.device("meta"):
        model = Llama(cfg)
    if meta:
        return model
    # pre-2023 transformers saved the rotary inverse frequencies; they are recomputed here from the config
    state = {k: v for k, v in _read_state(path).items() if not k.endswith("rotary_emb.inv_freq")}
    want = set(model.state_dict())
    if cfg.tie_word_embeddings:
        want.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise UserError(f"--lm {path}: checkpoint does not match the Llama architecture: "
                        f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                        f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    own = model.state_dict()
    bad = [k for k in state if own[k].shape != state[k].shape]
    if bad:
        raise UserError(f"--lm {path}: shape mismatch for {bad[:4]}: config.json does not describe these weights")
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is None and isinstance(cfg.dtype, str) and hasattr(torch, cfg.dtype):
        dtype = getattr(torch, cfg.dtype)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# LoRA

class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) * B A x with W, b frozen and A (r, in), B (out, r) trained; B starts at zero so
    training starts from the unchanged model. The base weight keeps its name (q_proj.weight), so checkpoints load
    before or after the adapters are added."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # adapters in float32 even on a bf16 model: AdamW updates of bf16 weights lose the small steps LoRA takes
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init, as in the LoRA paper code
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        delta = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
        return F.linear(x, self.weight, self.bias) + (delta * self.scale).to(x.dtype)


def apply_lora(model, r=8, alpha=16, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """Freeze the whole model, then put trainable LoRA adapters on the attention projections. Returns model."""
    model.requires_grad_(False)
    for layer in model.model.layers:
        for name in targets:
            setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), r, alpha, dropout))
    return model


def save_peft_adapter(lm, out_dir, base=None, dropout=0.0):
    """Write the LoRA adapters of `lm` as peft saves them (adapter_config.json + adapter_model.safetensors), so
    `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out_dir)` loads them: peft names the tensors
    base_model.model.<module>.lora_A.weight (r, in) / lora_B.weight (out, r), and scales by lora_alpha / r as here."""
    from safetensors.torch import save_file
    tensors, targets, rank, alpha = {}, set(), None, None
    for name, m in lm.named_modules():
        if isinstance(m, LoRALinear):
            for ab in ("lora_A", "lora_B"):
                tensors[f"base_model.model.{name}.{ab}.weight"] = getattr(m, ab).detach().float().cpu().contiguous()
            targets.add(name.rsplit(".", 1)[-1])
            rank, alpha = m.lora_A.shape[0], m.scale * m.lora_A.shape[0]
    if not tensors:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (apply_lora was not called)")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
           "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "base_model_name_or_path": base, "modules_to_save": None, "init_lora_weights": True}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# FSDP2: sharded parameters, gradients and optimizer state, saved and resumed with torch.distributed.checkpoint

def shard_fsdp(model, layers, device, param_dtype=None, reduce_dtype=torch.float32, from_rank0=False):
    """Shard `model` in place with FSDP2 over all ranks: each of `layers` is a unit whose parameters are all-gathered
    just before its forward / backward and freed after; the root holds the rest (embedding, norm, lm_head, the
    caller's projector). Each unit is moved to `device` in float32 just before it is sharded, so a rank never holds
    more than one float32 layer unsharded. Shards, gradients and AdamW state stay float32, all-gathered in
    param_dtype (None: float32) and reduce-scattered in reduce_dtype. from_rank0: only rank 0 holds real weights
    (the others built the model on the meta device) and every rank receives its shards of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    full = model.state_dict() if from_rank0 and dist.get_rank() == 0 else {}  # references, no copy
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)

    def place(t):  # float32 on the device; meta tensors get (uninitialised) storage, filled from rank 0 below
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        return torch.empty(t.shape, device=device, dtype=dtype) if t.is_meta else t.detach().to(device, dtype)

    moved = {}  # parameter by parameter: tied weights stay tied

    def move(module):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and not hasattr(p, "to_local"):
                    if id(p) not in moved:
                        moved[id(p)] = nn.Parameter(place(p), requires_grad=p.requires_grad)
                    m._parameters[name] = moved[id(p)]
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = place(b)

    for unit in [*layers, model]:
        move(unit)
        fully_shard(unit, mp_policy=mp)
    if from_rank0:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def memory_per_rank(model, opt):
    """Elements and bytes this rank stores of parameters, gradients and optimizer state (a DTensor counts its local
    shard only): what sharding divides by the world size (activations and the layer in flight come on top)."""
    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    out = {}
    for k, ts in (("param", params), ("grad", [p.grad for p in params]), ("optim", state)):
        local = [t.to_local() if hasattr(t, "to_local") else t for t in ts if t is not None]
        out[k + "_numel"] = sum(t.numel() for t in local)
        out[k + "_bytes"] = sum(t.numel() * t.element_size() for t in local)
    return out


def save_sharded(path, model, opt, extra):
    """Model + optimizer state with torch.distributed.checkpoint: every rank writes its own shards to the folder
    `path` (any world size can read it back). Written to path.tmp and renamed, so a kill mid-save keeps the last
    complete checkpoint. extra: small JSON-able training state (step, ...), written by rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    main, tmp = not dist.is_initialized() or dist.get_rank() == 0, path + ".tmp"
    barrier = dist.barrier if dist.is_initialized() else lambda: None
    if main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    barrier()
    if main:
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(extra, f)
        if os.path.exists(path):  # swapped, never deleted first: a kill in between leaves one complete state
            os.replace(path, path + ".old")
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    barrier()


def load_sharded(path, model, opt):
    """Restore save_sharded's folder into `model` (sharded or not) and `opt`; returns its extra dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if not os.path.exists(os.path.join(path, "train_state.json")):
        raise UserError(f"--resume: {path} is not a complete training checkpoint (no train_state.json)")
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    with open(os.path.join(path, "train_state.json")) as f:
        return json.load(f)


def full_state(model):
    """The whole (unsharded) state dict of a possibly FSDP-sharded model on every rank, as plain tensors on the
    model's device (not the CPU: eight ranks each holding a float32 7B copy in host memory would need 216 GB)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning over the ranks (DDP, or FSDP2 by shard_fsdp), with a sharded training state to stop and resume from

def step_batches(n, G, step, accum, seed, env):
    """This rank's micro-batches (lists of sample indices) for optimiser step `step`, and its epoch. Every epoch is
    one seeded permutation of the n samples cut into global batches of G (the last partial one dropped); rank r
    takes its r-th slice of each and cuts it into `accum` micro-batches. A step's batch depends only on (seed,
    step), not on the world size or on a restart, so 1 process x 4 and 2 processes x 2 see the same samples, and
    a resumed run continues exactly where it stopped."""
    epoch, j = divmod(step, max(1, n // G))
    glob = np.random.default_rng([seed, epoch]).permutation(n)[j * G:(j + 1) * G]
    mine = np.array_split(glob, env.world)[env.rank]
    return [m.tolist() for m in np.array_split(mine, accum)], epoch


def fine_tune(model, n, batch_of, args, env, warmup):
    """AdamW without weight decay, a linear warm-up over `warmup` of the steps then a cosine to 0, gradients clipped
    at 1, over global batches of args.global_batch of the n samples (step_batches). batch_of(indices) -> (inputs,
    labelled tokens): model(*inputs, n_tokens=N) is the summed loss / N, with N the labelled tokens of the whole
    global batch, so a step's loss is their mean however it is split over micro-batches and ranks (DDP / FSDP
    average gradients over ranks: hence x world). Under torchrun the model is wrapped in DDP unless args.fsdp
    (sharded by the caller). Writes OUT_DIR/log.jsonl and OUT_DIR/train_state (--save_every, --stop_at, --resume).
    Returns (steps done, this rank's memory_per_rank after its first step, steps of the schedule)."""
    k = env.world * args.grad_accum
    if n < k:
        raise UserError(f"{n} training reports cannot fill {args.grad_accum} micro-batches on {env.world} ranks")
    G = min(args.global_batch, n // k * k)
    total = args.max_steps or args.epochs * max(1, n // G)
    warm = max(1, int(round(total * warmup)))
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = env.distributed and not args.fsdp
    wrap = nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None) if ddp else model
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    state_dir = os.path.join(args.out_dir, "train_state")
    step = 0
    if args.resume:
        step = load_sharded(state_dir, model, opt)["step"]
        env.print(f"resumed from {state_dir} at step {step}")
    # on resume the log keeps the lines up to the step the training state was saved at
    log = JsonlLogger(os.path.join(args.out_dir, "log.jsonl"), enabled=env.is_main,
                      resume_step=step if args.resume else None)
    env.print(f"training {args.train}: {sum(p.numel() for p in params):,} trainable parameters, {total} steps of "
              f"{G} reports (batch {args.batch_size} x accum {args.grad_accum} x {env.world} ranks"
              f"{', FSDP' if args.fsdp else ''}), lr {args.lr}")
    model.train()
    mem = None
    end = min(total, args.stop_at or total)
    bar = tqdm(total=total, initial=step, desc="train", disable=not env.is_main)
    while step < end:
        micro, epoch = step_batches(n, G, step, args.grad_accum, args.seed, env)
        batches = [batch_of(b) for b in micro]
        # on the device: NCCL reduces GPU tensors only
        n_tok = torch.tensor(float(sum(c for _, c in batches)), device=env.device)
        if env.distributed:
            dist.all_reduce(n_tok)
        step_loss = torch.zeros((), device=env.device)
        for i, (inputs, _) in enumerate(batches):
            sync = contextlib.nullcontext() if not ddp or i == len(batches) - 1 else wrap.no_sync()
            with sync, (contextlib.nullcontext() if args.fsdp else env.autocast()):
                loss = wrap(*inputs, n_tokens=n_tok)
                (loss * env.world).backward()
            step_loss += loss.detach().float()
        if env.distributed:
            dist.all_reduce(step_loss)
        factor = (step + 1) / warm if step < warm else cosine((step - warm) / max(1, total - warm), 1, 0)
        for g in opt.param_groups:
            g["lr"] = args.lr * factor
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        mem = mem or memory_per_rank(model, opt)
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss.item():.3f}")
        if env.is_main and (step % args.log_every == 0 or step == total):
            log.log(step=step, loss=round(step_loss.item(), 6), lr=opt.param_groups[0]["lr"], epoch=epoch)
        if args.save_every and step % args.save_every == 0 or step == end and (args.fsdp or args.save_every or
                                                                            end < total):
            save_sharded(state_dir, model, opt, {"step": step})
    bar.close()
    model.eval()
    return step, mem, total
