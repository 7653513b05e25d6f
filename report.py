"""
Radiology report generation, LLaVA-style (the paper's Table 5): frozen encoder patch tokens -> projector -> Llama
decoder, trained on image + report pairs and scored with BLEU-4, ROUGE-L and CheXpert F1.

    python report.py                                   # demo: bundled image + text pairs, small LM from scratch, CPU
    python report.py --csv /data/reports.csv --subject_col patientid --text_col text
    # the paper's setting: Vicuna-7B + projector fully fine-tuned with FSDP on 8 GPUs (per node), MIMIC-CXR
    torchrun --nnodes 1 --nproc_per_node 8 report.py --dataset mimic --data_dir /data/mimic-cxr-jpg/2.0.0 \
        --reports_dir /data/mimic-cxr/2.0.0 --lm /models/vicuna-7b-v1.5 --fsdp --batch_size 8 --out_dir out/mimic
    # ... and the paper's out-of-distribution test: that checkpoint on IU-Xray (R2Gen layout), no training
    python report.py --eval_only --checkpoint out/mimic --dataset iu_xray --data_dir /data/iu_xray --out_dir out/iu
    python report.py --lm /models/vicuna-7b-v1.5 --train lora ...    # LoRA instead: adapters saved for peft
    python report.py --encoder A.safetensors --baseline random   # and a random encoder of A's architecture
    python report.py --compare out/report_a out/report_b    # paired one-tailed bootstrap: is A better than B?
    python report.py --label_only --csv reports.csv --text_col report   # CheXpert-14 labels only -> labels.csv

The model: patch tokens of the frozen encoder (--encoder, preprocessed as its info says) go through LLaVA-1.5's
projector (Linear, GELU, Linear; or --projector residual: v + lambda * W2 gelu(W1 v), where the encoder and LM widths
match) and replace the <image> placeholder of the Vicuna v1 prompt:
    "A chat between a curious user and an artificial intelligence assistant. ... USER: <image>\nProvide a
     description of the findings in the radiology image. ASSISTANT: {report}</s>"
The loss is the mean cross-entropy over the report tokens and the end-of-sequence token of each global batch.
Decoding is greedy with a KV cache, in fp32 (--gen_dtype), up to --max_new_tokens (150).

Language model: by default a small Llama (4 layers, 256 wide) trained from scratch together with the projector,
and a byte-fallback sentencepiece tokenizer trained on the training reports (saved in out_dir), so everything runs
offline on a CPU. --lm DIR loads a local Hugging Face Llama / Vicuna folder (config.json, safetensors or .bin
shards, and tokenizer.model) into llama.py. --train full (default) | lora | projector says what learns besides the
projector (the encoder never does). The paper's recipe is the default with --lm: projector + LM trained jointly,
lr 2e-5, cosine schedule, 3% warm-up, 3 epochs, global batch 128 = --batch_size x --grad_accum x GPUs (--grad_accum
is computed from --global_batch). A 7B LM fully fine-tuned needs --fsdp: FSDP2 shards float32 parameters, gradients
and AdamW state over the GPUs (16 bytes per parameter / world size: 13.5 GB per GPU on 8 for Vicuna-7B, instead of
108 GB), computes in bf16 with float32 gradient reduction and recomputes each decoder layer in the backward pass;
its training state is saved with torch.distributed.checkpoint to OUT_DIR/train_state (--save_every, at the end,
--stop_at) and continued with --resume. The demo defaults (lr 1e-3, 30 epochs, batch 8) suit the small model.

Data: --dataset mimic keeps, as the paper states it, every frontal (PA / AP) image whose report has a Findings
section (--mimic_rule study: one image per study, Impression when Findings is missing); --dataset iu_xray is test
data only by default (--iu_split r2gen to train on R2Gen's split), lower-cased as in R2Gen, and generated reports
are lower-cased before scoring against it. --eval_only --checkpoint DIR evaluates a trained run (projector + LM or
adapters, its encoder and settings) on the test split of any source given (a --csv: all of its rows).

Metrics on the test split, as LLaVA-Rad's evaluation computes them: BLEU-4 (sacrebleu corpus BLEU), ROUGE-L
(rouge-score F-measure without a stemmer, mean over reports), and CheXpert F1 from labeler.py's CheXpert-14 labels:
Macro-F1-14 with uncertain as negative (the headline), Macro-F1-14+ with uncertain as positive, Micro-F1-5 over
Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion; each as the median and 95% CI of 500 bootstrap
resamples of the test reports. CheXbert F1 and RadGraph F1 come from the f1chexbert / radgraph packages when they
and their weights are already on the machine (nothing is downloaded), else they are reported as "not available"
and never estimated some other way. All scores are on a 0-100 scale. Decoding runs in fp32 (--gen_dtype).

Writes to --out_dir (default out/report): results.json (metrics, settings, memory per rank), predictions.csv (path,
subject, reference, generated: what --compare reads), log.jsonl, checkpoint.pt (trained weights + settings: what
--eval_only reads), tokenizer.model (small LM), adapter/ (LoRA, peft format), train_state/ (sharded training state),
compare.json, labels.csv.
"""
import argparse
import contextlib
import csv
import math
import os
import json
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import base
import downstream
import data
import archives
from base import UserError
from model import VIT_CONFIGS
from labeler import METRICS, OBSERVATIONS, Scorer, label_report, score
from llama import (Llama, LlamaConfig, apply_lora, count_params, full_state, generate, load_hf_llama, load_sharded,
                   memory_per_rank, save_peft_adapter, save_sharded, shard_fsdp)

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CSV = os.path.join(HERE, "sample_data", "reports", "reports.csv")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
INSTRUCTION = "Provide a description of the findings in the radiology image."
PROMPT = f"{SYSTEM} USER: <image>\n{INSTRUCTION} ASSISTANT:"
IMAGE_TOKEN = -200  # placeholder id of an image slot in input_ids (LLaVA's IMAGE_TOKEN_INDEX); never embedded
# the paper's setting (Vicuna-7B v1.5, with --lm) and the small from-scratch LM's (the demo)
PRESETS = {"paper": dict(lr=2e-5, epochs=3, train="full", image_pool=1, batch_size=8, model="vit_base", img_size=224),
           "demo": dict(lr=1e-3, epochs=30, train="full", image_pool=2, batch_size=8, model="vit_base", img_size=224)}
WARMUP = 0.03  # share of the steps with a linear warm-up, and no weight decay: LLaVA-1.5's fine-tuning recipe
RES_LAMBDA = 1.0  # --projector residual: v + RES_LAMBDA * W2 gelu(W1 v)
GEN_BATCH = 16  # reports decoded at once (batched greedy decoding gives the same text as one by one)
PRECOMPUTE_MAX = 20000  # up to this many images the patch tokens are encoded once and kept in memory
N_EXAMPLES = 3  # generated reports printed beside their references


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = downstream.add_data_args(p, "data (default: the bundled image + report pairs)", ["mimic", "iu_xray"],
                             "image path, subject, report text", subject_default="subject; patientid for the bundled CSV")
    g.add_argument("--text_col", default="text", help="report text column")
    g.add_argument("--reports_dir", default=None,
                   help="MIMIC-CXR reports root holding files/pXX/pY/sZ.txt (default: --data_dir)")
    g.add_argument("--mimic_rule", default="paper", choices=["paper", "study"],
                   help="paper: every frontal (PA/AP) image whose report has a Findings section (the paper's "
                        "146,909 / 7,250 / 2,461); study: one frontal image per study, PA preferred, Findings "
                        "else Impression")
    g.add_argument("--iu_split", default="test", choices=["test", "r2gen"],
                   help="test: every IU-Xray study is test data (the paper's out-of-distribution test, with "
                        "--eval_only); r2gen: R2Gen's train / val / test split")
    g.add_argument("--label_only", action="store_true", help="only label --csv's --text_col with the CheXpert labeler")
    g = p.add_argument_group("model")
    g.add_argument("--lm", default=None, help="local Hugging Face Llama/Vicuna folder (default: small LM from scratch)")
    g.add_argument("--lm_layers", type=int, default=4)
    g.add_argument("--lm_dim", type=int, default=256)
    g.add_argument("--lm_heads", type=int, default=4)
    g.add_argument("--vocab_size", type=int, default=1000,
                   help="sentencepiece vocabulary of the small LM (an upper bound)")
    g.add_argument("--projector", default="mlp", choices=["mlp", "residual"])
    g.add_argument("--train", default=None, choices=["projector", "lora", "full"],
                   help="what learns besides the projector (default: full, the paper's; lora: adapters only, saved "
                        "for peft in OUT_DIR/adapter)")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--grad_ckpt", action="store_true",
                   help="activation checkpointing per decoder layer (memory for compute; default on with --fsdp)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and AdamW state over the ranks with FSDP2 (torchrun); "
                        "needed to fully fine-tune a 7B LM on 80 GB GPUs")
    g.add_argument("--global_batch", type=int, default=None,
                   help="reports per optimiser step = --batch_size x --grad_accum x world size; --grad_accum is "
                        "computed from it (default 128 with --lm, the paper's; else --batch_size x world)")
    g.add_argument("--grad_accum", type=int, default=None, help="micro-batches per optimiser step (see --global_batch)")
    g.add_argument("--max_report_tokens", type=int, default=150,
                   help="reports are cut to this many tokens for training")
    g.add_argument("--max_new_tokens", type=int, default=150)
    g.add_argument("--image_pool", type=int, default=None,
                   help="average-pool the patch grid k x k before the projector (default: 1, all tokens as in LLaVA, "
                        "with --lm; 2 for the small CPU model: a 4x shorter sequence)")
    g.add_argument("--gen_dtype", default="fp32", choices=["fp32", "bf16"],
                   help="decoding precision (the paper decodes in fp32; bf16 is faster on GPU)")
    g.add_argument("--save_every", type=int, default=None,
                   help="save the sharded training state (torch.distributed.checkpoint) every N steps to "
                        "OUT_DIR/train_state (always at the end with --fsdp)")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/train_state")
    g.add_argument("--stop_at", type=int, default=None,
                   help="stop after this many steps of the schedule, save the training state and exit (continue "
                        "with --resume: for jobs shorter than the run)")
    g.add_argument("--log_every", type=int, default=10, help="optimiser steps between log.jsonl lines")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_only", action="store_true",
                   help="no training: evaluate the report model saved in --checkpoint on the test set given")
    g.add_argument("--checkpoint", default=None, help="a report.py out_dir (checkpoint.pt, tokenizer) for --eval_only")
    g.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                   help="two predictions.csv files (or run folders): paired bootstrap, one-tailed 'A better than B'")
    downstream.add_eval_args(p, n_boot=500)
    base.add_common_args(p, "report")
    base.add_preset_arg(p, PRESETS, "paper (the default with --lm): projector + LM jointly, lr 2e-5, 3 epochs; demo "
                                    "(without): the small LM from scratch, lr 1e-3, 30 epochs")
    args = p.parse_args(argv)
    if args.eval_only:
        restore_settings(args)
    paper = args.lm is not None
    base.apply_preset(args, PRESETS, "paper" if paper else "demo")
    base.check(args, *base.COMMON_RULES, "image_pool >= 1", "grad_accum >= 1", "global_batch >= 1",
               "max_new_tokens >= 1", "max_report_tokens >= 1", "lm_layers >= 1", "lm_dim >= 1", "lm_heads >= 1",
               "lora_r >= 1", "save_every >= 1", "stop_at >= 1", "log_every >= 1", "n_boot >= 1", models=VIT_CONFIGS)
    args.grad_ckpt = args.grad_ckpt or args.fsdp
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_step = args.batch_size * world
    if args.global_batch is None:
        args.global_batch = 128 if paper and not args.grad_accum else per_step * (args.grad_accum or 1)
    if args.grad_accum is None:
        if args.global_batch % per_step:
            raise UserError(f"--global_batch {args.global_batch} is not a multiple of --batch_size {args.batch_size} "
                            f"x {world} ranks: choose --batch_size so that it divides")
        args.grad_accum = args.global_batch // per_step
    if args.grad_accum * per_step != args.global_batch:
        raise UserError(f"--global_batch {args.global_batch} != --batch_size {args.batch_size} x --grad_accum "
                        f"{args.grad_accum} x {world} ranks: give one of --global_batch / --grad_accum")
    if args.dataset and (args.csv or args.test_csv):
        raise UserError("give either --dataset (with --data_dir) or --csv, not both")
    if args.dataset == "iu_xray" and args.iu_split == "test" and not args.eval_only and not args.label_only:
        raise UserError("IU-Xray is the paper's out-of-distribution test set: evaluate a trained model on it with "
                        "--eval_only --checkpoint DIR, or train on R2Gen's split with --iu_split r2gen")
    if args.subject_col is None:
        args.subject_col = "patientid" if not args.csv or os.path.abspath(args.csv) == DEMO_CSV else "subject"
    args.csv = args.csv or (None if args.dataset else DEMO_CSV)
    return args


# what a trained report model is made of: --eval_only takes these from the checkpoint, not from the command line
MODEL_SETTINGS = ("lm", "lm_layers", "lm_dim", "lm_heads", "vocab_size", "projector", "train", "lora_r", "image_pool", "encoder", "encoder_format", "model", "img_size", "patch_size",
                  "enc_img_size", "enc_mean", "enc_std", "seed")


def restore_settings(args):
    """--eval_only: the model's settings (LM, projector, encoder, pooling, seed of a random-init encoder) from
    --checkpoint's checkpoint.pt, so the evaluated model is exactly the one trained."""
    if not args.checkpoint:
        raise UserError("--eval_only needs --checkpoint DIR (the out_dir of a report.py training run)")
    path = os.path.join(args.checkpoint, "checkpoint.pt")
    if not os.path.exists(path):
        raise UserError(f"--checkpoint {args.checkpoint}: no checkpoint.pt (is it a report.py out_dir?)")
    ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for k in MODEL_SETTINGS:
        if k in ck["settings"]:
            setattr(args, k, ck["settings"][k])
    args.fsdp = False  # evaluation runs on one unsharded copy per rank


# ----------------------------------------------------------------------------------------------------------------
# data: every source becomes {"train"|"val"|"test": [{"path", "subject", "text"}, ...]}

def load_samples(args):
    """A published layout (archives.py) or the generic CSV (blank reports dropped and counted); then the split:
    official parts kept, the rest 70/15/15 by subject (85/15 train / val beside a --test_csv), no subject in two."""
    if args.dataset:
        samples, source = archives.load(args.dataset, args)
    else:
        cols = {"path": args.path_col, "subject": args.subject_col, "text": args.text_col}
        samples, blank = [], 0
        for part, f in ((None, args.csv), ("val", args.val_csv), ("test", args.test_csv)):
            rows, n = archives.read_csv_samples(f, args.image_root, cols, part=part, drop_blank="text") if f else ([], 0)
            samples, blank = samples + rows, blank + n
        source = f"{args.csv} ({blank} row(s) with a blank report dropped)" if blank else args.csv
        if blank:
            print(f"warning: {blank} row(s) with a blank {args.text_col!r} dropped")
    for s in samples:
        s["text"] = " ".join(s["text"].split())
    if args.eval_only:  # a trained model on any test set: a published test part, else every row of the table
        test = [s for s in samples if s.get("part") == "test"] or ([] if args.dataset else samples)
        if not test:
            raise UserError(f"{source}: empty test split")
        return {"train": [], "val": [], "test": test}, source + ("" if args.dataset else " (all rows as test)")
    fr = {"train": 0.85, "val": 0.15} if any(s["part"] == "test" for s in samples) else None
    out = downstream.split_samples(samples, fr, seed=args.seed, need=("train", "test"))  # val: unused (fixed schedule)
    return out, source


# ----------------------------------------------------------------------------------------------------------------
# tokenizer and sequences

class Tokenizer:
    """sentencepiece model with Llama's ids: unk 0, bos 1, eos 2 (no pad id: padding positions are masked)."""

    def __init__(self, path):
        import sentencepiece as spm
        self.path, self.sp = path, spm.SentencePieceProcessor(model_file=path)
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([i for i in ids if 0 <= i < self.sp.get_piece_size()])


def train_tokenizer(texts, path, vocab_size):
    """Train a sentencepiece unigram model on the training reports (plus the prompt, so it has pieces for it) from
    an in-memory iterator; hard_vocab_limit=False lets a small corpus end with fewer pieces than asked for.
    byte_fallback=True (as Llama's own tokenizer): a character never seen in training becomes its UTF-8 bytes
    instead of <unk>, so test reports with unseen characters round-trip exactly; it costs 256 byte pieces. No
    Unicode normalisation either (Llama's tokenizer has none): NFKC would turn "SpO₂" into "SpO2"."""
    import sentencepiece as spm
    if vocab_size < 300:
        raise UserError(f"--vocab_size {vocab_size}: the byte-fallback tokenizer needs at least 300 "
                        "(256 byte pieces + specials + words)")
    corpus = list(texts) + [PROMPT.replace("<image>", "")] * 20
    need = 256 + 3 + len(set("".join(corpus)) - {" "}) + 1  # bytes, specials, every character seen, word boundary
    if vocab_size < need:
        raise UserError(f"--vocab_size {vocab_size}: these reports need at least {need} pieces (256 byte pieces, "
                        f"3 specials and one per distinct character); give --vocab_size {need} or more")
    prefix = path[:-len(".model")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus),
                                   model_prefix=prefix, vocab_size=vocab_size, hard_vocab_limit=False,
                                   character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   num_threads=1, minloglevel=2)
    return Tokenizer(path)


def prompt_ids(tok, n_img):
    """[bos] + tokens before <image> + n_img placeholders + tokens after it."""
    before, after = PROMPT.split("<image>")
    return [tok.bos] + tok.encode(before) + [IMAGE_TOKEN] * n_img + tok.encode(after)


def build_batch(tok, reports, n_img, max_report_tokens):
    """Right-padded training sequences: input_ids (B, T) with IMAGE_TOKEN slots, labels (B, T) equal to the input
    on report tokens and the final EOS and -100 everywhere else (prompt, image, padding), attention_mask (B, T)."""
    prompt = prompt_ids(tok, n_img)
    seqs = [prompt + tok.encode(r)[:max_report_tokens] + [tok.eos] for r in reports]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tok.eos, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, len(prompt):len(s)] = torch.tensor(s[len(prompt):])
        mask[i, :len(s)] = 1
    return ids, labels, mask


# ----------------------------------------------------------------------------------------------------------------
# the model

class Projector(nn.Module):
    """LLaVA-1.5's two-layer MLP, or the residual form v + lambda * W2 gelu(W1 v) (needs encoder width == LM width)."""

    def __init__(self, d_in, d_out, kind="mlp", lam=1.0):
        super().__init__()
        if kind == "residual" and d_in != d_out:
            raise UserError(f"--projector residual needs the encoder width ({d_in}) to equal the LM width ({d_out}): "
                            f"use --projector mlp or an LM of width {d_in} (--lm_dim {d_in})")
        self.kind, self.lam = kind, lam
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out)

    def forward(self, v):
        y = self.fc2(self.act(self.fc1(v)))
        return v + self.lam * y if self.kind == "residual" else y


class ReportModel(nn.Module):
    """Projector + LM. Image slots (IMAGE_TOKEN) of input_ids take the projected patch tokens, in order."""

    def __init__(self, projector, lm):
        super().__init__()
        self.projector, self.lm = projector, lm

    def embed(self, ids, feats):
        slots = ids == IMAGE_TOKEN
        e = self.lm.embed(ids.clamp(min=0))
        v = self.projector(feats.to(self.projector.fc1.weight.dtype)).to(e.dtype)
        return e.masked_scatter(slots[..., None], v)  # row-major fill: row b's slots get feats[b] in patch order

    def forward(self, ids, feats, labels, mask, n_tokens=None):
        """Mean cross-entropy over the labelled tokens; with n_tokens, their summed CE / n_tokens (the training
        loop passes the token count of the whole global batch, so micro-batches and ranks add up to its mean)."""
        h = self.lm(inputs_embeds=self.embed(ids, feats), attention_mask=mask, hidden_only=True)
        # token t is predicted at position t - 1; only report tokens and EOS carry a label, so the vocabulary
        # projection runs on those positions alone (with a 32000-word vocabulary it is most of the activations)
        sel = labels[:, 1:] != -100
        ce = F.cross_entropy(self.lm.lm_head(h[:, :-1][sel]).float(), labels[:, 1:][sel], reduction="sum")
        return ce / (sel.sum() if n_tokens is None else n_tokens)

    @torch.no_grad()
    def generate(self, feats, tok, max_new_tokens):
        ids = torch.tensor([prompt_ids(tok, feats.shape[1])] * len(feats), device=feats.device)
        out = generate(self.lm, inputs_embeds=self.embed(ids, feats), max_new_tokens=max_new_tokens,
                       eos_token_id=tok.eos)  # one prompt length for all: no padding needed
        return [tok.decode(o) for o in out]


def build_lm(args, train_texts, env):
    """(lm, tokenizer): a local HF checkpoint, or a small Llama + a sentencepiece model trained on the reports
    (--eval_only: the small LM's config and tokenizer from --checkpoint, on the meta device: its weights follow)."""
    if args.lm:
        tp = os.path.join(args.lm, "tokenizer.model")
        if not os.path.exists(tp):
            raise UserError(f"--lm {args.lm}: no tokenizer.model (the sentencepiece file of Llama / Vicuna)")
        if args.fsdp:  # rank 0 reads the checkpoint (its dtype, CPU); the others build it on the meta device and
            # receive their shards from rank 0 after sharding (shard_fsdp): one copy in host memory per node
            if env.is_main:
                return load_hf_llama(args.lm), Tokenizer(tp)
            with torch.device("meta"):
                return Llama(LlamaConfig.from_json(os.path.join(args.lm, "config.json"))), Tokenizer(tp)
        # trained weights in float32 (full), frozen ones in the run's dtype: bf16 halves a 7B model's memory
        dt = torch.float32 if args.train == "full" or env.device.type == "cpu" else env.dtype
        return load_hf_llama(args.lm, dtype=dt, device=env.device), Tokenizer(tp)
    if args.eval_only:
        ck = torch.load(os.path.join(args.checkpoint, "checkpoint.pt"), map_location="cpu", weights_only=True,
                        mmap=True)
        with torch.device("meta"):
            lm = Llama(LlamaConfig(**ck["lm_config"]))
        return lm, Tokenizer(os.path.join(args.checkpoint, "tokenizer.model"))
    path = os.path.join(args.out_dir, "tokenizer.model")
    if env.is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        train_tokenizer(train_texts, path, args.vocab_size)
    env.barrier()
    tok = Tokenizer(path)
    d, h = args.lm_dim, args.lm_heads
    ffn = int(8 * d / 3 + 63) // 64 * 64  # Llama's SwiGLU width: 8/3 of the model width, rounded up to 64
    cfg = LlamaConfig(vocab_size=tok.sp.get_piece_size(), hidden_size=d, intermediate_size=ffn,
                      num_hidden_layers=args.lm_layers, num_attention_heads=h, max_position_embeddings=2048,
                      bos_token_id=tok.bos, eos_token_id=tok.eos)
    torch.manual_seed(args.seed)
    lm = Llama(cfg)
    return (lm if args.fsdp else lm.to(env.device)), tok


def set_trainable(model, args):
    model.lm.requires_grad_(args.train == "full")
    if args.train == "lora":
        apply_lora(model.lm, r=args.lora_r, alpha=2 * args.lora_r)
    model.projector.requires_grad_(True)
    model.lm.gradient_checkpointing = args.grad_ckpt
    return [p for p in model.parameters() if p.requires_grad]


def is_trained(key, args):
    """Whether a state-dict key is learnt by the run: the projector, plus the LM (--train full) or its adapters."""
    return key.startswith("projector.") or args.train == "full" or "lora_" in key


def trained_state(model, args, state=None):
    """The tensors a run learnt, on the CPU (state: an already gathered full state dict)."""
    state = state if state is not None else model.state_dict()
    return {k: v.detach().cpu() for k, v in state.items() if is_trained(k, args)}


def load_trained(model, ck, args):
    """--eval_only: put checkpoint.pt's trained tensors into the freshly built model (meta-device parts included),
    checking that every tensor the run trained is there."""
    state = ck["model"]
    own = model.state_dict()
    want = {k for k in own if is_trained(k, args)}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"--checkpoint: checkpoint.pt does not match the model its settings describe: missing "
                        f"{missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(state, strict=False, assign=True)
    if any(p.is_meta for p in model.parameters()):
        raise UserError("--checkpoint: checkpoint.pt lacks weights the model needs (a --train full LM?)")


# ----------------------------------------------------------------------------------------------------------------
# encoder features

def patch_tokens(vit, x, env, pool=1):
    """Final LayerNorm-ed patch tokens (B, N, D), CLS / registers dropped, optionally average-pooled pool x pool."""
    with env.autocast():
        t = vit(x.to(env.device, non_blocking=True))[:, vit.num_prefix_tokens:]
    if pool > 1:
        h, w = x.shape[-2] // vit.patch_size, x.shape[-1] // vit.patch_size
        g = t.float().transpose(1, 2).reshape(len(t), -1, h, w)
        t = F.avg_pool2d(g, pool, ceil_mode=True).flatten(2).transpose(1, 2)
    return t


@torch.no_grad()
def encode_all(vit, paths, info, env, args):
    """Patch tokens of every image (N, T, D) in float16 on the CPU: the encoder is frozen, so once is enough."""
    out = None
    for x, idx in tqdm(downstream.image_batches(paths, info, 32, args.num_workers, crop=False), desc="encoding images",
                       disable=not env.is_main):
        t = patch_tokens(vit, x, env, args.image_pool).to("cpu", torch.float16)
        out = torch.empty(len(paths), *t.shape[1:], dtype=torch.float16) if out is None else out
        out[idx] = t
    return out


# ----------------------------------------------------------------------------------------------------------------
# training and generation

def cosine_lr(step, total, warmup_frac):
    warm = max(1, int(round(total * warmup_frac)))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def step_batches(n, step, per_epoch, args, env):
    """This rank's micro-batches (lists of sample indices) for optimiser step `step`. Every epoch is one seeded
    permutation of all n samples cut into global batches of --global_batch (the last partial one dropped); rank r
    takes its r-th slice of each and cuts it into --grad_accum micro-batches. The batch of a step depends only on
    (seed, step), not on the world size or on a restart, so 1 process x 4 and 2 processes x 2 see the same
    reports, and a resumed run continues exactly where it stopped."""
    G = min(args.global_batch, n // (env.world * args.grad_accum) * env.world * args.grad_accum)
    epoch, j = divmod(step, per_epoch)
    perm = np.random.default_rng([args.seed, epoch]).permutation(n)
    glob = perm[j * G:(j + 1) * G]
    mine = np.array_split(glob, env.world)[env.rank]
    return [m.tolist() for m in np.array_split(mine, args.grad_accum)], epoch


def train(model, params, samples, feats_of, tok, args, env, log):
    """AdamW + warm-up + cosine over global batches of --global_batch reports (step_batches). The loss of a step is
    the mean cross-entropy over all report tokens of its global batch, however it is split over micro-batches and
    ranks (each micro-batch's summed CE is divided by the global token count; DDP / FSDP average gradients over
    ranks, hence the x world). Under torchrun the model is wrapped in DDP, or sharded with FSDP2 (--fsdp, done by
    the caller). Returns (steps done, the memory this rank holds after its first step as llama.memory_per_rank
    counts it, steps of the schedule)."""
    n = len(samples)
    if n < env.world * args.grad_accum:
        raise UserError(f"{n} training reports cannot fill {args.grad_accum} micro-batches on {env.world} ranks")
    G = min(args.global_batch, n // (env.world * args.grad_accum) * env.world * args.grad_accum)
    per_epoch = max(1, n // G)
    total = args.max_steps or args.epochs * per_epoch
    wrap = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.distributed and not args.fsdp else model
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    state_dir = os.path.join(args.out_dir, "train_state")
    step = 0
    if args.resume:
        step = load_sharded(state_dir, model, opt)["step"]
        env.print(f"resumed from {state_dir} at step {step}")
    env.print(f"training {args.train}: {sum(p.numel() for p in params):,} trainable parameters, {total} steps of "
              f"{G} reports (batch {args.batch_size} x accum {args.grad_accum} x {env.world} ranks"
              f"{', FSDP' if args.fsdp else ''}), lr {args.lr}")
    model.train()
    mem = None
    end = min(total, args.stop_at or total)
    bar = tqdm(total=total, initial=step, desc="train", disable=not env.is_main)
    while step < end:
        micro, epoch = step_batches(n, step, per_epoch, args, env)
        feats = [feats_of(b).to(env.device) for b in micro]
        batches = [build_batch(tok, [samples[i]["text"] for i in b], f.shape[1], args.max_report_tokens)
                   for b, f in zip(micro, feats)]
        # on the device: NCCL reduces GPU tensors only
        n_tok = torch.tensor(float(sum(int((l[:, 1:] != -100).sum()) for _, l, _ in batches)), device=env.device)
        if env.distributed:
            dist.all_reduce(n_tok)
        step_loss = torch.zeros((), device=env.device)
        for k, ((ids, labels, mask), f) in enumerate(zip(batches, feats)):
            sync = k == len(micro) - 1
            ctx = wrap.no_sync() if env.distributed and not args.fsdp and not sync else contextlib.nullcontext()
            with ctx, (contextlib.nullcontext() if args.fsdp else env.autocast()):
                loss = wrap(ids.to(env.device), f, labels.to(env.device), mask.to(env.device), n_tokens=n_tok)
                (loss * env.world).backward()
            step_loss += loss.detach().float()
        if env.distributed:
            dist.all_reduce(step_loss)
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_lr(step, total, WARMUP)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if mem is None:
            mem = memory_per_rank(model, opt)
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


@torch.no_grad()
def generate_all(model, samples, feats_of, tok, args, env):
    """Generated report per sample; under torchrun each rank decodes a strided shard (with its own unsharded copy
    of the model) and rank 0 gathers them."""
    mine = list(range(env.rank, len(samples), env.world))
    out = {}
    for i in tqdm(range(0, len(mine), GEN_BATCH), desc="generating", disable=not env.is_main):
        b = mine[i:i + GEN_BATCH]
        # fp32 decoding by default (the paper's); --gen_dtype bf16 autocasts like training
        with env.autocast() if args.gen_dtype == "bf16" else contextlib.nullcontext():
            texts = model.generate(feats_of(b).to(env.device), tok, args.max_new_tokens)
        out.update(zip(b, texts))
    if env.distributed:
        parts = [None] * env.world
        dist.all_gather_object(parts, out)
        out = {k: v for p in parts for k, v in p.items()}
    return [out[i] for i in range(len(samples))]


# ----------------------------------------------------------------------------------------------------------------
# the results table

def print_table(rows, n_boot):
    """The paper's Table 5 layout: one row per encoder, median [95% CI] per metric, then the model-based metrics."""
    cols = [m for m, _ in METRICS] + ["CheXbert F1", "RadGraph F1"]
    print("\n" + f"{'encoder':28s}" + "".join(f"{c:>22s}" for c in cols))
    notes = {}
    for name, res in rows:
        cells = [f"{res[c]['median']:.2f} [{res[c]['ci95'][0]:.2f}, {res[c]['ci95'][1]:.2f}]" for c, _ in METRICS]
        for c in ("CheXbert F1", "RadGraph F1"):
            v = res[c]["value"]
            cells.append("n/a*" if v is None else f"{v['macro_f1_14'] if isinstance(v, dict) else v:.2f}")
            if v is None:
                notes[c] = res[c]["note"]
        print(f"{name[:28]:28s}" + "".join(f"{c:>22s}" for c in cells))
    print(f"(0-100; median and 95% CI of {n_boot} bootstrap resamples of the test reports. Macro-F1-14: CheXpert-14 "
          f"labels of labeler.py, uncertain as negative (the headline); Macro-F1-14+: uncertain as positive; "
          f"Micro-F1-5: the five competition observations)")
    for c, why in notes.items():
        print(f"* {c} {why}")


# ----------------------------------------------------------------------------------------------------------------
# --compare and --label_only

def load_predictions(path):
    path = os.path.join(path, "predictions.csv") if os.path.isdir(path) else path
    rows = data.read_csv(path, required=("path", "reference", "generated"))
    return path, {r["path"]: r for r in rows}


def compare(args):
    pa, A = load_predictions(args.compare[0])
    pb, B = load_predictions(args.compare[1])
    downstream.same_items(pa, sorted(A), pb, sorted(B))
    keys = sorted(A)
    if any(A[k]["reference"] != B[k]["reference"] for k in keys):
        raise UserError(f"{pa} and {pb} have different reference reports for the same images")
    refs = [A[k]["reference"] for k in keys]
    sa, sb = Scorer([A[k]["generated"] for k in keys], refs), Scorer([B[k]["generated"] for k in keys], refs)
    stats = {name: (lambda idx, fa=getattr(sa, fn), fb=getattr(sb, fn): (fa(idx), fb(idx))) for name, fn in METRICS}
    return downstream.paired_compare(args, pa, pb, stats, len(keys), unit="test reports", digits=2)


def label_only(args):
    """CheXpert-14 labels of every row of --csv's --text_col, written after the input's own columns."""
    rows = data.read_csv(args.csv, required=(args.text_col,))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "labels.csv")
    counts = {o: [0, 0, 0] for o in OBSERVATIONS}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + OBSERVATIONS)
        w.writeheader()
        for r in tqdm(rows, desc="labelling"):
            lab = label_report(r[args.text_col])
            for o, v in lab.items():
                if v is not None:
                    counts[o][{1: 0, 0: 1, -1: 2}[v]] += 1
            w.writerow({**r, **{o: "" if v is None else v for o, v in lab.items()}})
    print(f"{'observation':28s} {'pos':>5s} {'neg':>5s} {'unc':>5s}")
    for o, (p, n, u) in counts.items():
        print(f"{o:28s} {p:5d} {n:5d} {u:5d}")
    print(f"wrote {path} ({len(rows)} reports)")
    return path


# ----------------------------------------------------------------------------------------------------------------

def unsharded_copy(model, args):
    """After FSDP training: the whole model rebuilt unsharded on this rank (generation calls the LM a different
    number of times per rank, which sharded layers, each forward a collective, cannot do)."""
    full = full_state(model)
    with torch.device("meta"):
        plain = ReportModel(Projector(model.projector.fc1.in_features, model.lm.config.hidden_size, args.projector,
                                      RES_LAMBDA), Llama(model.lm.config))
    if args.train == "lora":
        apply_lora(plain.lm, r=args.lora_r, alpha=2 * args.lora_r)
    plain.load_state_dict(full, assign=True)
    return plain


def main(argv=None):
    args = get_args(argv)
    if args.compare:
        return compare(args)
    if args.label_only:
        return label_only(args)
    env = base.setup(args)
    t0 = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    splits, source = load_samples(args)
    env.print(f"data: {source}: train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])} "
              f"reports")
    torch.manual_seed(args.seed)  # one random-init encoder on every rank, and again in --eval_only
    vit, info, name = downstream.load_frozen_encoder(args, env)
    vit.to(env.device)
    env.print(f"encoder: {info['source']}")
    lm, tok = build_lm(args, [s["text"] for s in splits["train"]], env)  # before encoding: fail early on a bad --lm
    d_in = vit.embed_dim
    torch.manual_seed(args.seed)  # the same projector on every rank: FSDP shards it and nothing broadcasts it
    model = ReportModel(Projector(d_in, lm.config.hidden_size, args.projector, RES_LAMBDA), lm)
    params = set_trainable(model, args)
    if args.eval_only:
        ck = torch.load(os.path.join(args.checkpoint, "checkpoint.pt"), map_location="cpu", weights_only=True)
        load_trained(model, ck, args)
        env.print(f"evaluating {args.checkpoint} (trained {ck['step']} steps, --train {args.train})")
    if args.fsdp:
        shard_fsdp(model, model.lm.model.layers, env.device,
                   param_dtype=None if env.dtype == torch.float32 else env.dtype, from_rank0=args.lm is not None)
        params = [p for p in model.parameters() if p.requires_grad]  # fully_shard made them sharded DTensors
    else:
        model.to(env.device)
    if args.train == "full" and not args.fsdp and not args.eval_only and env.device.type == "cuda":
        need = 16 * count_params(model) / 2**30  # float32 weights + gradients + AdamW's two moments
        if need > 0.8 * torch.cuda.get_device_properties(env.device).total_memory / 2**30:
            env.print(f"warning: full fine-tuning without --fsdp keeps ~{need:.0f} GiB of weights, gradients and AdamW "
                      f"state on every GPU: add --fsdp (it divides that by the number of GPUs) or use --train lora")
    if args.train == "projector" and not args.lm and not args.eval_only:
        env.print("warning: --train projector leaves the from-scratch LM untrained: expect noise, not reports")
    env.print(f"LM: {'from scratch' if not args.lm else args.lm}, {count_params(lm):,} parameters, vocab "
              f"{lm.config.vocab_size}; projector {args.projector} {d_in} -> {lm.config.hidden_size}")
    samples = splits["train"] + splits["test"]  # val is not used for selection: a fixed schedule, as in LLaVA
    n_tr = len(splits["train"])
    if len(samples) <= PRECOMPUTE_MAX:
        cache = encode_all(vit, [s["path"] for s in samples], info, env, args)
        feats_of = lambda idx, off=0: cache[[off + i for i in idx]].float()
    else:  # large data sets: encode each batch on the fly
        images = downstream.EvalImages([s["path"] for s in samples], info, crop=False)

        def feats_of(idx, off=0):
            got = [images[off + i] for i in idx]
            if any(e for *_, e in got):
                raise UserError(next(e for *_, e in got if e))
            x = torch.stack([g[0] for g in got])
            with torch.no_grad():
                return patch_tokens(vit, x, env, args.image_pool).float()
    steps, mem = 0, None
    if not args.eval_only:
        state_json = os.path.join(args.out_dir, "train_state", "train_state.json")
        if args.resume and not os.path.exists(state_json):
            raise UserError(f"--resume: no complete training state in {os.path.dirname(state_json)}")
        # on resume the log keeps the lines up to the step the training state was saved at
        log = base.JsonlLogger(os.path.join(args.out_dir, "log.jsonl"), enabled=env.is_main,
                                 resume_step=json.load(open(state_json))["step"] if args.resume else None)
        steps, mem, total = train(model, params, splits["train"], feats_of, tok, args, env, log)
        if steps < total:
            env.print(f"--stop_at {args.stop_at}: training state saved to {args.out_dir}/train_state; continue "
                      f"with the same command and --resume instead of --stop_at")
            return {"stopped_at": steps, "total_steps": total}
        if args.fsdp:
            model = unsharded_copy(model, args).to(env.device)
            lm, params = model.lm, None  # drop the last references to the shards
        if env.distributed:
            gathered = [None] * env.world
            dist.all_gather_object(gathered, mem)
            mem = gathered
        else:
            mem = [mem]
    if args.gen_dtype == "fp32":
        model.float()
    model.eval()
    test = splits["test"]
    hyps = generate_all(model, test, lambda idx: feats_of(idx, n_tr), tok, args, env)
    if not env.is_main:
        return None
    refs = [s["text"] for s in test]
    if args.dataset == "iu_xray":  # lower-case references (R2Gen's IU cleaning): score lower-cased reports
        hyps = [h.lower() for h in hyps]
    metrics, _ = score(hyps, refs, args.n_boot, args.seed)
    for i in range(min(N_EXAMPLES, len(test))):
        print(f"\n--- example {i + 1}: {test[i]['path']}\nreference: {refs[i]}\ngenerated: {hyps[i]}")
    print_table([(name, metrics)], args.n_boot)
    print(f"encoder: {info['source']}")
    with open(os.path.join(args.out_dir, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "subject", "reference", "generated"])
        w.writerows([s["path"], s["subject"], r, h] for s, r, h in zip(test, refs, hyps))
    wrote = ["results.json", "predictions.csv"]
    if not args.eval_only:
        plain = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool)) or
                 (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))}
        base.save_torch({"model": trained_state(model, args), "lm_config": lm.config.to_dict(),
                            "step": steps, "settings": plain}, os.path.join(args.out_dir, "checkpoint.pt"))
        wrote += ["checkpoint.pt", "log.jsonl"]
        if args.train == "lora":
            save_peft_adapter(model.lm, os.path.join(args.out_dir, "adapter"), base=args.lm)
            wrote.append("adapter/ (peft)")
    deviations = ([] if args.lm else ["a small Llama trained from scratch instead of Vicuna-7B v1.5 (--lm)"]) + (
        [f"--max_steps {args.max_steps} instead of {args.epochs} epochs"] if args.max_steps else [])
    res = {"name": name, "encoder": info["source"], "encoder_format": info["format"], "metrics": metrics,
           "deviations": deviations,
           "n_test": len(test), "n_train": n_tr, "data": source, "lm": args.lm or "small Llama from scratch",
           "lm_params": count_params(lm), "train_mode": args.train, "steps": steps, "fsdp": args.fsdp,
           "eval_only": args.eval_only, "checkpoint": args.checkpoint, "world_size": env.world,
           "memory_per_rank": mem, "preprocess": {k: info[k] for k in ("img_size", "mean", "std")},
           "settings": vars(args), "time_s": round(time.time() - t0, 1)}
    base.write_json(res, os.path.join(args.out_dir, "results.json"))
    print(f"wrote {', '.join(wrote)} to {args.out_dir}")
    res["baseline"] = downstream.run_baseline(main, args, argv)
    return res


if __name__ == "__main__":
    base.run(main)
