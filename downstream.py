"""
What the three evaluations (probe.py, segment.py, report.py) share, written once: their data and encoder flags,
the frozen encoder (and a random one of the same architecture, the floor it must beat), images with the paper's
centre crop, embeddings computed once and cached, the subject-level split with fixed validation / test sets, the
paired comparison of two runs, result tables and CSV files, and the L-BFGS solver of the convex heads.

    vit, info, name = load_frozen_encoder(args, env)       # info: an encoders.Feed, .crop_frac set
    feats = encode_images(paths, info, fn, env, 64, 4, cache="out/probe/features/x.pt")
    parts = split_samples(samples)                         # {'train', 'val', 'test'}: subjects never in two
    main(["--compare", A, B])  ->  paired_compare(args, A, B, stats, n)   # compare.json, Table 6's marks
    W, b, facts = fit_converged(X, Y, selection_folds(tr, va, subjects, False, 0), "binary", norm, device)
"""
import csv
import dataclasses
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.stats import rankdata
from tqdm import tqdm

import data
import model
from base import UserError, atomic_write, mark, nanmean, paired_bootstrap, save_torch, write_json
from encoders import add_encoder_args, load_encoder_from_args


# ----------------------------------------------------------------------------------------------------------------
# flags

ENCODER_RULES = ("enc_img_size >= 1", "enc_img_size <= 4096", "enc_std > 0", "n_boot >= 1")

def add_data_args(p, title, layouts, what, subject_default="subject"):
    """The data flags of the three evaluations (docs/CONVENTIONS.md): a generic CSV with fixed val / test sets, or
    a published layout (archives.py). `what`: the CSV's columns, for the help."""
    g = p.add_argument_group(title)
    g.add_argument("--csv", default=None, help=f"table of samples: {what}")
    g.add_argument("--image_root", default=None, help="folder the CSV's paths are relative to (default: its folder)")
    g.add_argument("--path_col", default="path", help="image path column")
    g.add_argument("--subject_col", default=None, help=f"subject / patient id column (default: {subject_default})")
    g.add_argument("--val_csv", default=None, help="fixed validation set, same columns (replaces the inner split)")
    g.add_argument("--test_csv", default=None, help="fixed test set, same columns (replaces the split / CV)")
    g.add_argument("--dataset", default=None, choices=layouts, help="a published layout under --data_dir "
                   "(archives.py)")
    g.add_argument("--data_dir", default=None, help="root folder of --dataset")
    return g


def csv_parts(args, demo_csv):
    """(part, path) per CSV of the data flags: --csv (else the bundled demo_csv) with part None, to be split by
    subject, then the fixed --val_csv / --test_csv where given."""
    if args.csv is None and (args.val_csv or args.test_csv):
        raise UserError("--val_csv / --test_csv need --csv for the training data")
    return [(k, f) for k, f in ((None, args.csv or demo_csv), ("val", args.val_csv), ("test", args.test_csv)) if f]


def add_eval_args(p, n_boot=1000):
    """Encoder flags (encoders.py) plus what every evaluation adds: its row label and the random baseline."""
    add_encoder_args(p)
    g = p.add_argument_group("baseline")
    g.add_argument("--name", default=None, help="the encoder's row label in the table")
    g.add_argument("--baseline", default="none", choices=["none", "random"],
                   help="random: also run a randomly initialised encoder of the SAME architecture and preprocessing "
                        "as --encoder, and test (paired, one-tailed) whether --encoder beats it")
    g.add_argument("--random_like", action="store_true",
                   help="evaluate a random init of --encoder's architecture instead of its weights (the baseline)")
    g.add_argument("--n_boot", type=int, default=n_boot, help="bootstrap resamples (CIs and comparisons)")


def load_frozen_encoder(args, env):
    """(encoder, info, name) by docs/CONVENTIONS.md's resolution rule: --img_size / --patch_size / --model build a
    random encoder; a loaded one keeps its own resolution unless --enc_img_size says otherwise. --random_like
    swaps the weights for a seeded random init of exactly the loaded architecture (same preprocessing). The
    attention is --attn, else the device's default (model.default_attention)."""
    args.attn = args.attn or model.default_attention(env.device)
    vit, info = load_encoder_from_args(args)
    name = args.name or (os.path.basename(args.encoder) if args.encoder else info.source.split(" (")[0])
    if args.random_like and info.format != "random-init":
        vit, info = random_like(vit, info, args.attn)
    if args.random_like:
        name = args.name or f"random {name}"
    info.crop_frac = crop_frac(info)
    return vit, info, name


def random_like(vit, info, attn="sdpa", seed=0):
    """A randomly initialised ViT of vit's architecture (its config), frozen, with the same preprocessing."""
    torch.manual_seed(seed)
    rand = model.VisionTransformer(attn=attn, **vit.config).eval().requires_grad_(False)
    info = dataclasses.replace(info, format="random-init", source=f"random-init of the architecture of {info.source}")
    return rand, info


def run_baseline(main, args, argv):
    """--baseline random: run the same evaluation with --random_like into out_dir/baseline_random, then the paired
    comparison of the two runs (main(['--compare', A, B])). Returns the comparison."""
    if args.baseline != "random" or args.random_like:
        return None
    base = os.path.join(args.out_dir, "baseline_random")
    argv = list(sys.argv[1:] if argv is None else argv)
    print(f"\nbaseline: a random encoder of the same architecture, in {base}")
    main(argv + ["--random_like", "--baseline", "none", "--out_dir", base])
    return compare_runs(main, args.out_dir, base, args.out_dir, args)


def compare_runs(main, a, b, out_dir, args):
    """The paired comparison of two run folders of the same script: main(['--compare', A, B, ...])."""
    return main(["--compare", a, b, "--out_dir", out_dir, "--n_boot", str(args.n_boot), "--seed", str(args.seed)])


# ----------------------------------------------------------------------------------------------------------------
# images: centre crop + resize (the paper's preprocessing), loaded in DataLoader workers

# Share of the shorter side the centre crop keeps, from the encoder's own preset (encoders.feed): an encoder whose
# card resizes the shorter side to resize_to and crops img_size keeps img_size / resize_to of it (DINOv2 224 / 256,
# CLIP and RAD-DINO 1, BioViL-T 448 / 512); one without (RadJEPa, I-JEPA, this project's) keeps the largest centred
# square, as the paper's "centre crop and resize" says. Cropping first and resizing after is the same geometry.
def crop_frac(info):
    return min(1.0, info.img_size / info.resize_to) if info.resize_to else 1.0


def center_box(h, w, frac=1.0):
    """(top, left, side) of the centred square covering frac of the shorter side."""
    side = max(1, int(round(min(h, w) * frac)))
    return (h - side) // 2, (w - side) // 2, side


def center_crop(img, frac=1.0):
    t, l, s = center_box(img.shape[0], img.shape[1], frac)
    return img[t:t + s, l:l + s]


class EvalImages(torch.utils.data.Dataset):
    """(image tensor, index, error) per path: centre crop, resize, normalise (info's img_size / mean / std). A bad
    file yields a placeholder and its error, reported by the main process in one line (not a worker traceback)."""

    def __init__(self, paths, info, crop=True):
        self.paths = paths
        self.frac = info.crop_frac if crop else None
        self.pre = data.Preprocess(info.img_size, info.mean, info.std)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = data.read_image(self.paths[i])
            return self.pre(center_crop(img, self.frac) if self.frac else img), i, ""
        except data.ImageReadError as e:
            return torch.zeros(len(self.pre.mean), self.pre.img_size, self.pre.img_size), i, str(e)


def image_batches(paths, info, batch_size, num_workers, crop=True):
    """Batches (x, indices) of EvalImages(paths); the first unreadable file ends the run with its one-line error."""
    for x, idx, err in torch.utils.data.DataLoader(EvalImages(paths, info, crop), batch_size=batch_size,
                                                   num_workers=num_workers):
        if any(err):
            raise UserError([e for e in err if e][0])
        yield x, idx


def file_identity(paths):
    """[real path, size, modification time] per file: a file rewritten in place gets a new identity."""
    return [[os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


@torch.no_grad()
def encode_images(paths, info, fn, env, batch_size, num_workers, cache=None):
    """fn(x) (a frozen encoder's features of a batch) for every image, in order, as one CPU tensor; cached in the
    file `cache` when given (a cache that does not load is recomputed, with a warning: it is only a shortcut).
    Under torchrun each rank encodes every world-th image and rank 0 gathers them (the other ranks get None)."""
    if cache and os.path.exists(cache):
        try:
            got = torch.load(cache, weights_only=True, mmap=True)  # mapped: the features need not fit in memory
            ok = got["paths"] == list(paths) and got["feats"].shape[0] == len(paths)
        except Exception as e:  # truncated, or not ours
            env.print(f"warning: feature cache {cache} is unreadable ({type(e).__name__}): recomputing it")
            ok = False
        if ok:
            env.print(f"features: reusing {cache}")
            return got["feats"]
    mine = list(range(env.rank, len(paths), env.world))
    feats, bar = [], tqdm(total=len(mine), desc="embedding images", disable=not env.is_main)
    for x, _ in image_batches([paths[i] for i in mine], info, batch_size, num_workers):
        feats.append(fn(x).cpu())
        bar.update(len(x))
    bar.close()
    feats = torch.cat(feats)
    if env.distributed:
        gathered = [None] * env.world
        dist.all_gather_object(gathered, (mine, feats.numpy()))
        if not env.is_main:
            return None
        feats = torch.empty(len(paths), *feats.shape[1:], dtype=feats.dtype)
        for idx, f in gathered:
            feats[idx] = torch.from_numpy(f)
    if cache:
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        save_torch({"paths": list(paths), "feats": feats, "source": info.source}, cache)
        env.print(f"features: {tuple(feats.shape)} cached in {cache}")
    return feats


# ----------------------------------------------------------------------------------------------------------------
# splits: fixed validation / test sets where the data has them, subjects never in two parts

def split_samples(samples, fractions=None, seed=0, need=("train", "val", "test")):
    """{'train', 'val', 'test'} -> samples. A sample's 'part' (a published split, --val_csv / --test_csv) is kept;
    the others are split by subject over the parts still missing, with fractions {part: share}. Then the leak
    check: no subject in two parts (e.g. one patient in both --csv and --test_csv) and no empty part."""
    fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
    parts = {k: [s for s in samples if s.get("part") == k] for k in ("train", "val", "test")}
    pool = [s for s in samples if s.get("part") not in parts]
    want = [k for k in ("train", "val", "test") if not parts[k] and fractions.get(k)]
    if pool and want:
        idx = data.split_by_subject([s["subject"] for s in pool], [fractions[k] for k in want], seed=seed)
        for k, ix in zip(want, idx):
            parts[k] = [pool[i] for i in ix]
    elif pool:
        parts["train"] += pool
    for k in need:
        if not parts[k]:
            raise UserError(f"the {k} part is empty: give more data or a --{k}_csv")
    names = ("train", "val", "test")
    bounds = np.cumsum([len(parts[k]) for k in names])
    data.check_disjoint([s["subject"] for k in names for s in parts[k]], *np.split(np.arange(bounds[-1]), bounds[:-1]),
                        names=names)
    return parts


# ----------------------------------------------------------------------------------------------------------------
# comparing two runs over the same test items (the paper's Table 6); result tables and CSV files

def paired_compare(args, a, b, stats, n_items, unit="test images", digits=3):
    """The compare driver of the three evaluations: a paired bootstrap per row of stats {row: stat(idx) -> (value of
    A, value of B)} over the same n_items, printed as a table and written to out_dir/compare.json. A row named by a
    tuple (metric, class) is filed as out['metrics'][metric][class], a plain name as out['metrics'][name]."""
    out = {"a": a, "b": b, f"n_{unit.split()[-1]}": n_items, "n_boot": args.n_boot, "metrics": {}}
    print(f"A = {a}\nB = {b}\npaired bootstrap over {n_items} {unit}, {args.n_boot} resamples")
    print(f"{'':30s} {'A':>8s} {'B':>8s} {'A-B':>9s}   {'95% CI of A-B':21s} {'p':>8s}")
    for key, stat in stats.items():
        r = paired_bootstrap(stat, n_items, n_boot=args.n_boot, seed=args.seed)
        if isinstance(key, tuple):
            out["metrics"].setdefault(key[0], {})[key[1]] = r
        else:
            out["metrics"][key] = r
        name, d = " ".join(key) if isinstance(key, tuple) else key, digits
        ci = f"[{r['ci95'][0]:+.{d}f}, {r['ci95'][1]:+.{d}f}]"
        print(f"{name[:30]:30s} {r['a']:8.{d}f} {r['b']:8.{d}f} {r['delta']:+9.{d}f}   {ci:21s} "
              f"{r['p_one_tailed']:8.4f}{mark(r['p_one_tailed'])}")
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(out, os.path.join(args.out_dir, "compare.json"))
    print(f"one-tailed p = share of resamples where A is not better (* p < 0.05, ** p < 0.01); wrote "
          f"{os.path.join(args.out_dir, 'compare.json')}")
    return out


def same_items(pa, keys_a, pb, keys_b, what="test images"):
    if list(keys_a) != list(keys_b):
        n = len(set(keys_a) ^ set(keys_b))
        raise UserError(f"{pa} and {pb} cover different {what} ({n} not in both): run both encoders on the same data "
                        f"and split (same --seed)")


def print_rows(title, head, rows):
    """A titled Markdown table: the header, a rule, the rows, each column as wide as its widest cell."""
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    print(f"\n{title}")
    for r in [head, ["-" * k for k in w]] + rows:
        print("| " + " | ".join(str(c).ljust(k) for c, k in zip(r, w)) + " |")


def write_csv(rows, path):
    """rows (the header first) as a CSV file, written whole or not at all (base.atomic_write)."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------------------------
# convex heads on frozen features (probe.py's linear head, segment.py's linear decoder): solved, not trained

# L2 strengths tried, strongest first, each fit warm-starting the next: half-decades spanning what standardised
# features of 10^2 to 10^5 images need; a sweep stops once PATIENCE strengths in a row bring nothing better
L2_GRID = np.logspace(0, -6, 13)
PATIENCE = 3
GRAD_TOL = 1e-6  # L-BFGS stops when no gradient entry is larger: converged in float64 for every practical purpose


def lbfgs(params, objective, tol=GRAD_TOL, max_iter=2000):
    """Minimise objective() (which returns its value and leaves its gradient in the params' .grad) by L-BFGS with
    a strong-Wolfe line search, until no gradient entry exceeds tol. Returns the facts results.json reports."""
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        return objective()
    opt.step(closure)
    opt.zero_grad()
    f = float(objective())
    g = max(float(p.grad.abs().max()) for p in params)
    return {"objective": f, "grad_max": g, "iterations": opt.state[params[0]]["n_iter"], "converged": g <= tol}


# ----------------------------------------------------------------------------------------------------------------
# probe.py's linear head solved to convergence: L2-regularised logistic regression on frozen features.
# On standardised features: per label the mean sigmoid + BCE over the rows where it is known (NaN: not labelled),
# summed, or the mean softmax CE (multi-class); + sum_c lam_c / 2 ||W[:, c]||^2, biases free. Labels decouple, so
# column c is label c's own logistic regression (scikit-learn's C = 1 / (lam_c * n_c)) and lam is chosen per label.

CHUNK = 65536  # rows per transfer to the device: the objective streams any number of cached features


def head_loss(logits, y, task, counts):
    """The data term on a block of rows; counts: known rows per label of all the rows averaged over."""
    if task == "multiclass":
        return F.cross_entropy(logits, y.argmax(1), reduction="sum") / counts[0]
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), reduction="none")
    return (torch.where(~torch.isnan(y), loss, 0.0).sum(0) / counts.clamp_min(1)).sum()


def known_counts(y, task):
    return (~torch.isnan(y).any(1)).sum().reshape(1) if task == "multiclass" else (~torch.isnan(y)).sum(0)


def objective(W, b, X, Y, rows, task, lam, norm):
    """The objective of (W, b) on X[rows] standardised by norm = (mean, std), streamed to W's device in blocks of
    CHUNK rows; where W requires a gradient, the gradient is accumulated into W.grad and b.grad block by block."""
    counts, total = known_counts(Y[rows], task).to(W), torch.zeros((), dtype=W.dtype, device=W.device)
    with torch.set_grad_enabled(W.requires_grad):
        for i in range(0, len(rows), CHUNK):
            r = rows[i:i + CHUNK]
            loss = head_loss(((X[r] - norm[0]) / norm[1]).to(W) @ W + b, Y[r].to(W), task, counts)
            if W.requires_grad:
                loss.backward()
            total += loss.detach()
        penalty = 0.5 * (lam * (W * W).sum(0)).sum()
        if W.requires_grad:
            penalty.backward()
    return total + penalty.detach()


def fit_lbfgs(X, Y, rows, task, lam, norm, init):
    """The optimum from init = (W, b) (a warm start) by L-BFGS (lbfgs above): W, b and convergence facts."""
    W, b = (t.detach().clone().requires_grad_(True) for t in init)
    facts = lbfgs([W, b], lambda: objective(W, b, X, Y, rows, task, lam, norm))
    return W.detach(), b.detach(), facts


@torch.no_grad()
def predict(W, b, X, rows, task, norm):
    z = torch.cat([((X[rows[i:i + CHUNK]] - norm[0]) / norm[1]).to(W) @ W + b for i in range(0, len(rows), CHUNK)])
    return (z.softmax(-1) if task == "multiclass" else torch.sigmoid(z)).cpu().numpy()


def val_scores(P, y, task, select):
    """Per label (multi-class: one) the validation score to maximise: minus the loss, or the AUPRC where defined;
    and the mean loss and AUPRC for the log."""
    y = np.asarray(y, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if task == "multiclass":
            loss = np.array([-np.mean(np.log(np.clip(P[np.arange(len(y)), y.argmax(1)], 1e-300, None)))])
        else:
            p = np.clip(P, 1e-15, 1 - 1e-15)
            loss = np.nanmean(-(y * np.log(p) + (1 - y) * np.log(1 - p)), axis=0)
    ap = fast_metrics(y, P)[0]
    ap_score = [nanmean(ap)] if task == "multiclass" else ap
    score = np.where(np.isfinite(ap_score), ap_score, -loss) if select == "auprc" else -loss
    return score, float(np.mean(loss)), nanmean(ap)


def selection_folds(tr, va, subjects, fixed_val, seed):
    """Where the L2 strength is scored: a fixed validation part as it is (published, --val_csv, the 'split'
    protocol's); otherwise 5-fold cross-validation by subject inside the training part (train + the inner split),
    its validation predictions pooled: a 15% split of a few hundred images is too noisy to choose by."""
    if fixed_val:
        return [(tr, va)]
    pool = np.concatenate([tr, va])
    k = min(5, len(set(subjects[pool])))
    if k < 2:
        raise UserError(f"the training part holds {k} subject(s): too few to choose the head's L2 strength")
    return [(pool[a], pool[b]) for a, b in data.kfold_by_subject(subjects[pool], k=k, seed=seed)]


def fit_converged(X, Y, folds, task, norm, device, select="loss", log=None, fold=0):
    """The default head: per strength of L2_GRID (strongest first, each fit warm-starting the next) the
    optimum on the training rows of each selection fold, scored on their validation rows pooled, until PATIENCE
    strengths in a row improve no label; then the optimum at each label's best strength on all rows of the folds."""
    K, f64 = Y.shape[1], dict(dtype=torch.float64, device=device)
    inits = [(torch.zeros(X.shape[1], K, **f64), torch.zeros(K, **f64))] * len(folds)
    held, best_score, best_l2, since = np.concatenate([va for _, va in folds]), -np.inf, 0.0, 0
    for step, l2 in enumerate(L2_GRID, start=1):
        fits = [fit_lbfgs(X, Y, tr, task, torch.full((K,), float(l2), **f64), norm, init)
                for (tr, _), init in zip(folds, inits)]
        inits = [(W, b) for W, b, _ in fits]
        P = np.concatenate([predict(W, b, X, va, task, norm) for (W, b, _), (_, va) in zip(fits, folds)])
        score, val_loss, val_ap = val_scores(P, Y[held].numpy(), task, select)
        better = (score > best_score) | (step == 1)
        best_score, best_l2 = np.where(better, score, best_score), np.where(better, l2, best_l2)
        since = 0 if better.any() else since + 1
        if log is not None:
            log.log(step=step, fold=fold, l2=float(l2), loss=float(np.mean([f["objective"] for *_, f in fits])),
                    val_loss=val_loss, val_auprc=val_ap if np.isfinite(val_ap) else None,
                    iterations=sum(f["iterations"] for *_, f in fits))
        if since >= PATIENCE:
            break
    chosen = np.broadcast_to(best_l2, (K,))  # multi-class: its one strength for every class
    rows = np.unique(np.concatenate([np.concatenate(f) for f in folds]))
    W, b, facts = fit_lbfgs(X, Y, rows, task, torch.tensor(chosen, **f64), norm, inits[0])
    how = "the validation part" if len(folds) == 1 else f"{len(folds)}-fold cross-validation by subject"
    return W, b, {"solver": "lbfgs", "l2": [float(v) for v in chosen], "l2_chosen_by": how, **facts}


def fast_metrics(Y, P):
    """scikit-learn's AUPRC and AUROC (ties included) for all classes at once in float64 numpy: AUROC = Mann-Whitney
    U with average ranks; AP = sum over distinct thresholds of (recall step) x precision. NaN where undefined. A
    column with unlabelled rows (NaN) is scored over its labelled rows."""
    Y, P = np.asarray(Y, np.float64), np.asarray(P, np.float64)
    if np.isnan(Y).any():
        cols = [fast_metrics(Y[np.isfinite(Y[:, c]), c:c + 1], P[np.isfinite(Y[:, c]), c:c + 1])
                for c in range(Y.shape[1])]
        return np.array([a[0] for a, _ in cols]), np.array([u[0] for _, u in cols])
    n, pos = len(Y), Y.sum(0)
    valid = (pos > 0) & (pos < n)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = ((rankdata(P, axis=0) * Y).sum(0) - pos * (pos + 1) / 2) / (pos * (n - pos))
    auroc[~valid] = np.nan
    ap = np.full(Y.shape[1], np.nan)
    for c in np.flatnonzero(valid):
        order = np.argsort(-P[:, c], kind="mergesort")
        p, y = P[order, c], Y[order, c]
        last = np.r_[np.flatnonzero(np.diff(p)), n - 1]  # the last item of each run of tied scores
        tp = np.cumsum(y)[last]
        ap[c] = np.sum(np.diff(np.r_[0.0, tp / pos[c]]) * tp / (last + 1))
    return ap, auroc
