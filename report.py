"""
Radiology report generation, LLaVA-style (the paper's Table 5): frozen encoder patch tokens -> projector -> Llama
decoder, trained on image + report pairs and scored with BLEU-4, ROUGE-L and CheXpert F1 (labeler.py).

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
    # Table 5's metrics as LLaVA-Rad computes them: CheXbert's and RadGraph's weights, LLaVA-Rad's MIMIC test set
    python report.py --eval_only --checkpoint out/mimic --dataset llava_rad --data_dir /data/mimic-cxr-jpg/2.0.0 \
        --annotations chat_test_MIMIC_CXR_all_gpt4extract_rulebased_v1.json --chexbert /models/chexbert.pth \
        --radgraph /models/radgraph

The projected patch tokens replace the <image> placeholder of the Vicuna v1 prompt (PROMPT); the loss is the mean
cross-entropy over the report tokens and EOS of each global batch; decoding is greedy in fp32 (--num_beams, --do_sample
--temperature --top_p, --gen_dtype bf16 otherwise). Metrics (labeler.py): ROUGE-L, BLEU-4, RadGraph F1 (--radgraph),
CheXpert F1 from CheXbert's labels (--chexbert; without it, from labeler.py's rules, labelled as such), each the
median and 95% CI of --n_boot resamples of the test reports. Without --lm a small Llama and its tokenizer are
trained from scratch, so everything runs offline on a CPU. With --lm the paper's recipe is
the default: projector + LM trained jointly, lr 2e-5, cosine schedule, 3% warm-up, 3 epochs, global batch 128.
Fully fine-tuning a 7B LM needs --fsdp: float32 weights, gradients and AdamW state sharded over the GPUs (16 bytes
per parameter / world size: 13.5 GB per GPU on 8 for Vicuna-7B, instead of 108 GB), bf16 compute.

Writes to --out_dir: results.json, predictions.csv (what --compare reads), log.jsonl, checkpoint.pt (trained weights
and settings: what --eval_only reads), tokenizer.model (small LM), adapter/ (LoRA, peft format), train_state/
(sharded training state: --save_every, --stop_at, --resume), compare.json, labels.csv.
"""
import contextlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import archives
import base
import data
import downstream
import llama
from base import UserError
from labeler import Scorer, model_labelers, print_table, score, write_labels
from llama import (Llama, LlamaConfig, Tokenizer, apply_lora, fine_tune, full_state, generate, load_hf_llama,
                   save_peft_adapter, shard_fsdp)
from model import VIT_CONFIGS, count_params
from weights import load_torch

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
    p = base.ArgumentParser(__doc__)
    g = downstream.add_data_args(p, "data (default: the bundled image + report pairs)",
                                 ["mimic", "iu_xray", "llava_rad"], "image path, subject, report text",
                                 subject_default="subject; patientid for the bundled CSV")
    g.add_argument("--text_col", default="text", help="report text column")
    g.add_argument("--reports_dir", help="MIMIC-CXR reports root holding files/pXX/pY/sZ.txt (default: --data_dir)")
    g.add_argument("--mimic_rule", default="paper", choices=["paper", "study"],
                   help="paper: every frontal (PA/AP) image whose report has a Findings section (the paper's 146,909 / "
                        "7,250 / 2,461); study: one frontal image per study, PA preferred, Findings else Impression")
    g.add_argument("--iu_split", default="test", choices=["test", "r2gen"],
                   help="test: all of IU-Xray is test data (the paper's out-of-distribution test, with --eval_only; "
                        "lower-cased as in R2Gen, and so are the reports generated for it); r2gen: R2Gen's split")
    g.add_argument("--annotations", help="--dataset llava_rad: LLaVA-Rad's chat_test_MIMIC_CXR_all_gpt4extract_"
                   "rulebased_v1.json (PhysioNet llava-rad-mimic-cxr-annotation); images under --data_dir")
    g.add_argument("--label_only", action="store_true", help="only label --csv's --text_col with the CheXpert labeler")
    g = p.add_argument_group("model")
    g.add_argument("--lm", help="local Hugging Face Llama/Vicuna folder (default: small LM from scratch)")
    g.add_argument("--lm_layers", type=int, default=4)
    g.add_argument("--lm_dim", type=int, default=256)
    g.add_argument("--lm_heads", type=int, default=4)
    g.add_argument("--vocab_size", type=int, default=1000, help="sentencepiece vocabulary of the small LM (at most)")
    g.add_argument("--projector", default="mlp", choices=["mlp", "residual"])
    g.add_argument("--train", choices=["projector", "lora", "full"], help="what learns besides the projector")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--grad_ckpt", action="store_true", help="recompute each decoder layer in the backward pass")
    g.add_argument("--fsdp", action="store_true", help="shard weights, gradients and AdamW state over the ranks with "
                   "FSDP2 (torchrun), each decoder layer recomputed in the backward pass")
    g.add_argument("--global_batch", type=int, help="reports per optimiser step = --batch_size x --grad_accum x "
                   "world size (default: 128 with --lm; else --batch_size x world)")
    g.add_argument("--grad_accum", type=int, help="micro-batches per optimiser step (default: from --global_batch)")
    g.add_argument("--max_report_tokens", type=int, default=150, help="reports are cut to this many tokens to train")
    g.add_argument("--max_new_tokens", type=int, default=150, help="longest report (paper 150, LLaVA-Rad 256)")
    g.add_argument("--image_pool", type=int, help="average-pool the patch grid k x k before the projector")
    g.add_argument("--gen_dtype", default="fp32", choices=["fp32", "bf16"], help="decoding precision (paper: fp32)")
    g.add_argument("--num_beams", type=int, default=1, help="beam search with this many beams (default 1: greedy)")
    g.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding (seeded by --seed)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do_sample)")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this probability")
    g.add_argument("--save_every", type=int, help="save the training state every N steps (always at the end with "
                   "--fsdp) to OUT_DIR/train_state")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/train_state")
    g.add_argument("--stop_at", type=int, help="stop after this many steps of the schedule (then --resume)")
    g.add_argument("--log_every", type=int, default=10, help="optimiser steps between log.jsonl lines")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_only", action="store_true", help="no training: evaluate --checkpoint on the test set given")
    g.add_argument("--checkpoint", help="a report.py out_dir (checkpoint.pt, tokenizer) for --eval_only")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two predictions.csv files (or run folders): paired bootstrap, one-tailed 'A better than B'")
    g.add_argument("--chexbert", help="CheXbert's chexbert.pth, bert-base-uncased's vocab.txt beside it: CheXpert F1 "
                   "from CheXbert's labels (default: $RADJEPA_CHEXBERT, else labeler.py's rules)")
    g.add_argument("--radgraph", help="RadGraph's model, radgraph.tar.gz extracted (config.json, vocabulary/, "
                   "weights.th), run by the radgraph package: RadGraph F1 (default: $RADJEPA_RADGRAPH, else none)")
    downstream.add_eval_args(p, n_boot=500)
    base.add_common_args(p, "report")
    base.add_preset_arg(p, PRESETS, "paper (the default with --lm); demo (without: the small LM from scratch)")
    args = p.parse_args(argv)
    if args.eval_only:  # the evaluated model is exactly the one trained: its settings come from the checkpoint
        if not args.checkpoint:
            raise UserError("--eval_only needs --checkpoint DIR (the out_dir of a report.py training run)")
        settings = read_checkpoint(args.checkpoint)["settings"]
        vars(args).update({k: settings[k] for k in MODEL_SETTINGS if k in settings}, fsdp=False)  # one copy per rank
    paper = args.lm is not None
    base.apply_preset(args, PRESETS, "paper" if paper else "demo")
    base.check(args, *base.COMMON_RULES, *downstream.ENCODER_RULES, "image_pool >= 1", "grad_accum >= 1",
               "global_batch >= 1", "max_new_tokens >= 1", "vocab_size >= 300", "max_report_tokens >= 1",
               "lm_layers >= 1", "lm_dim >= 1", "lm_heads >= 1", "lora_r >= 1", "save_every >= 1", "stop_at >= 1",
               "log_every >= 1", "n_boot >= 1", "num_beams >= 1", "temperature > 0", "top_p > 0", "top_p <= 1",
               models=VIT_CONFIGS)
    args.grad_ckpt = args.grad_ckpt or args.fsdp
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_step = args.batch_size * world
    if args.global_batch is None:
        args.global_batch = 128 if paper and not args.grad_accum else per_step * (args.grad_accum or 1)
    args.grad_accum = args.grad_accum or max(1, args.global_batch // per_step)
    if args.grad_accum * per_step != args.global_batch:
        raise UserError(f"--global_batch {args.global_batch} != --batch_size {args.batch_size} x --grad_accum "
                        f"{args.grad_accum} x {world} ranks: choose --batch_size so that it divides --global_batch, "
                        f"or give only one of --global_batch / --grad_accum")
    if args.do_sample and args.num_beams > 1:
        raise UserError("give either --do_sample or --num_beams, not both (beam search here is deterministic)")
    if args.dataset and (args.csv or args.test_csv):
        raise UserError("give either --dataset (with --data_dir) or --csv, not both")
    if args.dataset == "llava_rad" and not args.eval_only:
        raise UserError("--dataset llava_rad is LLaVA-Rad's MIMIC-CXR test set: evaluate a trained model on it with "
                        "--eval_only --checkpoint DIR")
    if args.dataset == "iu_xray" and args.iu_split == "test" and not args.eval_only and not args.label_only:
        raise UserError("IU-Xray is the paper's out-of-distribution test set: evaluate a trained model on it with "
                        "--eval_only --checkpoint DIR, or train on R2Gen's split with --iu_split r2gen")
    args.subject_given = args.subject_col is not None
    if args.subject_col is None:
        args.subject_col = "patientid" if not args.csv or os.path.abspath(args.csv) == DEMO_CSV else "subject"
    args.csv = args.csv or (None if args.dataset else DEMO_CSV)
    return args


# what a trained report model is made of: --eval_only takes these from the checkpoint, not from the command line
MODEL_SETTINGS = ("lm", "lm_layers", "lm_dim", "lm_heads", "vocab_size", "projector", "train", "lora_r", "image_pool",
                  "encoder", "encoder_format", "model", "img_size", "patch_size", "enc_img_size", "enc_mean",
                  "enc_std", "seed")


def read_checkpoint(run_dir):
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        raise UserError(f"--checkpoint {run_dir}: no checkpoint.pt (is it a report.py out_dir?)")
    return load_torch(path, ("model", "lm_config", "step", "settings"))


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
        for part, f in downstream.csv_parts(args, DEMO_CSV):
            rows, n = archives.read_csv_samples(f, args.image_root, cols, part=part, drop_blank="text",
                                                subject_given=args.subject_given)
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
# the prompt, sequences and the model

def train_tokenizer(texts, path, vocab_size):
    """llama.train_tokenizer on the training reports, plus the prompt so that it has pieces for it too."""
    return llama.train_tokenizer(list(texts) + [PROMPT.replace("<image>", "")] * 20, path, vocab_size)


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
    def generate(self, feats, tok, max_new_tokens, decoding=None):
        """Reports for a batch of images: greedy, or llama.generate's beam search / sampling (`decoding`)."""
        ids = torch.tensor([prompt_ids(tok, feats.shape[1])] * len(feats), device=feats.device)
        out = generate(self.lm, inputs_embeds=self.embed(ids, feats), max_new_tokens=max_new_tokens,
                       eos_token_id=tok.eos, **(decoding or {}))  # one prompt length for all: no padding needed
        return [tok.decode(o) for o in out]


def build_lm(args, train_texts, env):
    """(lm, tokenizer): a local HF checkpoint, or a small Llama + a sentencepiece model trained on the reports
    (--eval_only: the small LM's config and tokenizer from --checkpoint, on the meta device: its weights follow)."""
    if args.lm:
        tp = os.path.join(args.lm, "tokenizer.model")
        if not os.path.exists(tp):
            raise UserError(f"--lm {args.lm}: no tokenizer.model (the sentencepiece file of Llama / Vicuna)")
        if args.fsdp:  # rank 0 reads the checkpoint (its dtype, CPU); the others receive their shards from rank 0
            return load_hf_llama(args.lm, meta=not env.is_main), Tokenizer(tp)  # one copy in host memory per node
        # trained weights in float32 (full), frozen ones in the run's dtype: bf16 halves a 7B model's memory
        dt = torch.float32 if args.train == "full" or env.device.type == "cpu" else env.dtype
        return load_hf_llama(args.lm, dtype=dt, device=env.device), Tokenizer(tp)
    if args.eval_only:
        with torch.device("meta"):
            lm = Llama(LlamaConfig(**read_checkpoint(args.checkpoint)["lm_config"]))
        return lm, Tokenizer(os.path.join(args.checkpoint, "tokenizer.model"))
    path = os.path.join(args.out_dir, "tokenizer.model")
    if env.is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        train_tokenizer(train_texts, path, args.vocab_size)
    env.barrier()
    tok = Tokenizer(path)
    d = args.lm_dim
    ffn = int(8 * d / 3 + 63) // 64 * 64  # Llama's SwiGLU width: 8/3 of the model width, rounded up to 64
    cfg = LlamaConfig(vocab_size=tok.sp.get_piece_size(), hidden_size=d, intermediate_size=ffn,
                      num_hidden_layers=args.lm_layers, num_attention_heads=args.lm_heads, max_position_embeddings=2048,
                      bos_token_id=tok.bos, eos_token_id=tok.eos)
    torch.manual_seed(args.seed)
    lm = Llama(cfg)
    return (lm if args.fsdp else lm.to(env.device)), tok


def build_model(d_in, lm, args):
    """Projector + LM, with what --train learns set to require gradients (LoRA adapters added for --train lora)."""
    model = ReportModel(Projector(d_in, lm.config.hidden_size, args.projector, RES_LAMBDA), lm)
    lm.requires_grad_(args.train == "full")
    if args.train == "lora":
        apply_lora(lm, r=args.lora_r, alpha=2 * args.lora_r)
    model.projector.requires_grad_(True)
    lm.gradient_checkpointing = args.grad_ckpt
    return model


def is_trained(key, args):
    """Whether a state-dict key is learnt by the run: the projector, plus the LM (--train full) or its adapters."""
    return key.startswith("projector.") or args.train == "full" or "lora_" in key


def trained_state(model, args):
    """The tensors a run learnt, on the CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if is_trained(k, args)}


def load_trained(model, ck, args):
    """--eval_only: put checkpoint.pt's trained tensors into the freshly built model (meta-device parts included),
    checking that every tensor the run trained is there."""
    state, own = ck["model"], model.state_dict()
    missing = sorted({k for k in own if is_trained(k, args)} - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"--checkpoint: checkpoint.pt does not match the model its settings describe: missing "
                        f"{missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(state, strict=False, assign=True)
    if any(p.is_meta for p in model.parameters()):
        raise UserError("--checkpoint: checkpoint.pt lacks weights the model needs (a --train full LM?)")


def unsharded_copy(model, args):
    """After FSDP training: the whole model rebuilt unsharded on this rank (generation calls the LM a different
    number of times per rank, which sharded layers, each forward a collective, cannot do)."""
    full = full_state(model)
    with torch.device("meta"):
        plain = build_model(model.projector.fc1.in_features, Llama(model.lm.config), args)
    plain.load_state_dict(full, assign=True)
    return plain


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
def features(vit, paths, info, env, args):
    """feats_of(idx, off=0): the float32 patch tokens of paths[off + i] for i in idx. Up to PRECOMPUTE_MAX images
    they are encoded once (the encoder is frozen) and kept in float16 on the CPU, else encoded batch by batch."""
    if len(paths) > PRECOMPUTE_MAX:
        images = downstream.EvalImages(paths, info, crop=False)

        @torch.no_grad()
        def feats_of(idx, off=0):
            x, _, errors = zip(*[images[off + i] for i in idx])
            if any(errors):
                raise UserError(next(e for e in errors if e))
            return patch_tokens(vit, torch.stack(x), env, args.image_pool).float()
        return feats_of
    cache = None
    for x, idx in tqdm(downstream.image_batches(paths, info, 32, args.num_workers, crop=False), desc="encoding images",
                       disable=not env.is_main):
        t = patch_tokens(vit, x, env, args.image_pool).to("cpu", torch.float16)
        cache = torch.empty(len(paths), *t.shape[1:], dtype=torch.float16) if cache is None else cache
        cache[idx] = t
    return lambda idx, off=0: cache[[off + i for i in idx]].float()


# ----------------------------------------------------------------------------------------------------------------
# training batches and generation

def gather(obj, env):
    """obj of every rank, in rank order."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def training_batches(samples, feats_of, tok, args, env):
    """batch_of(indices) for llama.fine_tune: ReportModel's inputs on the device, and the number of labelled tokens."""
    def batch_of(idx):
        f = feats_of(idx).to(env.device)
        ids, labels, mask = build_batch(tok, [samples[i]["text"] for i in idx], f.shape[1], args.max_report_tokens)
        return (ids.to(env.device), f, labels.to(env.device), mask.to(env.device)), int((labels[:, 1:] != -100).sum())
    return batch_of


@torch.no_grad()
def generate_all(model, samples, feats_of, tok, args, env):
    """Generated report per sample; under torchrun each rank decodes a strided shard (with its own unsharded copy
    of the model) and rank 0 gathers them."""
    mine = list(range(env.rank, len(samples), env.world))
    out = {}
    decoding = dict(num_beams=args.num_beams, do_sample=args.do_sample, temperature=args.temperature,
                    top_p=args.top_p, generator=torch.Generator(env.device).manual_seed(args.seed + env.rank)
                    if args.do_sample else None)
    for i in tqdm(range(0, len(mine), GEN_BATCH), desc="generating", disable=not env.is_main):
        b = mine[i:i + GEN_BATCH]
        # fp32 decoding by default (the paper's); --gen_dtype bf16 autocasts like training
        with env.autocast() if args.gen_dtype == "bf16" else contextlib.nullcontext():
            out.update(zip(b, model.generate(feats_of(b).to(env.device), tok, args.max_new_tokens, decoding)))
    out = {k: v for part in gather(out, env) for k, v in part.items()}
    return [out[i] for i in range(len(samples))]


# ----------------------------------------------------------------------------------------------------------------
# --compare

def load_predictions(path):
    path = os.path.join(path, "predictions.csv") if os.path.isdir(path) else path
    return path, {r["path"]: r for r in data.read_csv(path, required=("path", "reference", "generated"))}


def compare(args):
    pa, A = load_predictions(args.compare[0])
    pb, B = load_predictions(args.compare[1])
    downstream.same_items(pa, sorted(A), pb, sorted(B))
    keys = sorted(A)
    if any(A[k]["reference"] != B[k]["reference"] for k in keys):
        raise UserError(f"{pa} and {pb} have different reference reports for the same images")
    refs = [A[k]["reference"] for k in keys]
    chexbert, annotate, notes = model_labelers(args.chexbert, args.radgraph)
    print(f"CheXpert F1 labels: {notes['labeler']}")
    sa, sb = (Scorer([X[k]["generated"] for k in keys], refs, chexbert, annotate) for X in (A, B))
    stats = {name: (lambda idx, fa=getattr(sa, fn), fb=getattr(sb, fn): (fa(idx), fb(idx)))
             for name, fn in sa.metrics()}
    return downstream.paired_compare(args, pa, pb, stats, len(keys), unit="test reports", digits=2)


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    if args.compare:
        return compare(args)
    if args.label_only:
        return write_labels(data.read_csv(args.csv, required=(args.text_col,)), args.text_col, args.out_dir)
    env = base.setup(args)
    t0 = time.time()
    labelers = model_labelers(args.chexbert, args.radgraph) if env.is_main else None  # a bad path fails here, early
    base.write_args(args, args.out_dir)
    splits, source = load_samples(args)
    train_set, test = splits["train"], splits["test"]  # val is not used for selection: a fixed schedule, as in LLaVA
    env.print(f"data: {source}: train {len(train_set)}, val {len(splits['val'])}, test {len(test)} reports")
    torch.manual_seed(args.seed)  # one random-init encoder on every rank, and again in --eval_only
    vit, info, name = downstream.load_frozen_encoder(args, env)
    vit.to(env.device)
    env.print(f"encoder: {info.source}")
    lm, tok = build_lm(args, [s["text"] for s in train_set], env)  # before encoding: fail early on a bad --lm
    torch.manual_seed(args.seed)  # the same projector on every rank: FSDP shards it and nothing broadcasts it
    model = build_model(vit.embed_dim, lm, args)
    del lm  # model.lm from here on: after FSDP training it is an unsharded copy, and the shards must go
    if args.eval_only:
        ck = read_checkpoint(args.checkpoint)
        load_trained(model, ck, args)
        env.print(f"evaluating {args.checkpoint} (trained {ck['step']} steps, --train {args.train})")
    if args.fsdp:
        shard_fsdp(model, model.lm.model.layers, env.device,
                   param_dtype=None if env.dtype == torch.float32 else env.dtype, from_rank0=args.lm is not None)
    else:
        model.to(env.device)
    if args.train == "full" and not args.fsdp and not args.eval_only and env.device.type == "cuda":
        need = 16 * count_params(model) / 2**30  # float32 weights + gradients + AdamW's two moments
        if need > 0.8 * torch.cuda.get_device_properties(env.device).total_memory / 2**30:
            env.print(f"warning: full fine-tuning without --fsdp keeps ~{need:.0f} GiB of weights, gradients and AdamW "
                      f"state on every GPU: add --fsdp (it divides that by the number of GPUs) or use --train lora")
    if args.train == "projector" and not args.lm and not args.eval_only:
        env.print("warning: --train projector leaves the from-scratch LM untrained: expect noise, not reports")
    cfg = model.lm.config
    env.print(f"LM: {args.lm or 'from scratch'}, {count_params(model.lm):,} parameters, vocab {cfg.vocab_size}; "
              f"projector {args.projector} {vit.embed_dim} -> {cfg.hidden_size}")
    feats_of = features(vit, [s["path"] for s in train_set + test], info, env, args)
    steps, mem = 0, None
    if not args.eval_only:
        batch_of = training_batches(train_set, feats_of, tok, args, env)
        steps, mem, total = fine_tune(model, len(train_set), batch_of, args, env, warmup=WARMUP)
        if steps < total:
            env.print(f"--stop_at {args.stop_at}: training state saved to {args.out_dir}/train_state; continue "
                      f"with the same command and --resume instead of --stop_at")
            return {"stopped_at": steps, "total_steps": total}
        if args.fsdp:
            model = unsharded_copy(model, args).to(env.device)
        base.refuse_nonfinite(trained_state(model, args).values(), "the trained report model")
        mem = gather(mem, env)
    if args.gen_dtype == "fp32":
        model.float()
    model.eval()
    hyps = generate_all(model, test, lambda idx: feats_of(idx, len(train_set)), tok, args, env)
    if not env.is_main:
        return None
    refs = [s["text"] for s in test]
    if args.dataset == "iu_xray":  # lower-case references (R2Gen's IU cleaning): score lower-cased reports
        hyps = [h.lower() for h in hyps]
    metrics, _ = score(hyps, refs, args.n_boot, args.seed, labelers)
    for i in range(min(N_EXAMPLES, len(test))):
        print(f"\n--- example {i + 1}: {test[i]['path']}\nreference: {refs[i]}\ngenerated: {hyps[i]}")
    print_table(name, metrics, args.n_boot)
    distinct = len(set(hyps))
    print(f"{distinct} distinct generated report(s) for {len(hyps)} test images" + (
        ": the model repeats a few reports it memorised, whatever the image (expected of a small LM trained from "
        "scratch on few reports; image conditioning needs the paper's scale)" if distinct * 2 <= len(hyps)
        else ""))
    print(f"encoder: {info.source}")
    rows = [[s["path"], s["subject"], r, h] for s, r, h in zip(test, refs, hyps)]
    downstream.write_csv([["path", "subject", "reference", "generated"]] + rows,
                         os.path.join(args.out_dir, "predictions.csv"))
    wrote = ["results.json", "predictions.csv"]
    if not args.eval_only:
        plain = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str, bool)) or
                 (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))}
        base.save_torch({"model": trained_state(model, args), "lm_config": model.lm.config.to_dict(),
                         "step": steps, "settings": plain}, os.path.join(args.out_dir, "checkpoint.pt"))
        wrote += ["checkpoint.pt", "log.jsonl"]
        if args.train == "lora":
            save_peft_adapter(model.lm, os.path.join(args.out_dir, "adapter"), base=args.lm)
            wrote.append("adapter/ (peft)")
    deviations = ([] if args.lm else ["a small Llama trained from scratch instead of Vicuna-7B v1.5 (--lm)"]) + (
        [f"--max_steps {args.max_steps} instead of {args.epochs} epochs"] if args.max_steps else [])
    res = {"name": name, "encoder": info.source, "encoder_format": info.format, "metrics": metrics,
           "deviations": deviations, "n_test": len(test), "distinct_generated": distinct, "n_train": len(train_set),
           "data": source, "lm": args.lm or "small Llama from scratch", "lm_params": count_params(model.lm),
           "train_mode": args.train, "steps": steps, "fsdp": args.fsdp, "eval_only": args.eval_only,
           "checkpoint": args.checkpoint, "world_size": env.world, "memory_per_rank": mem,
           "preprocess": {k: getattr(info, k) for k in ("img_size", "mean", "std")},
           "settings": vars(args), "time_s": round(time.time() - t0, 1)}
    base.write_json(res, os.path.join(args.out_dir, "results.json"))
    print(f"wrote {', '.join(wrote)} to {args.out_dir}")
    res["baseline"] = downstream.run_baseline(main, args, argv)
    return res


if __name__ == "__main__":
    base.run(main)
