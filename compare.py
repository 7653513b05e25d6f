"""
One command for a whole comparison: probe.py, segment.py and report.py for each encoder on the same data, printed
as the paper's Tables 3, 4 and 5 with Table 6's marks (one-tailed paired bootstrap tests against a baseline).

    python compare.py --encoders random out/pretrain/encoder.safetensors     # bundled data, CPU, minutes
    python compare.py --encoders A.safetensors B.pth.tar --baseline random   # each against a random encoder of
                                                                              # its own architecture (the default)
    python compare.py --encoders A B C --baseline C                          # every encoder against encoder C
    python compare.py --encoders A B --probe "--dataset vindr --data_dir /data/vindr-cxr/1.0.0" \\
        --segment "--csv /data/lungs/manifest.csv" --report "--dataset mimic --data_dir ... --lm /models/vicuna"
    python compare.py --encoders A --stages probe segment                   # a subset of the evaluations

An encoder is a checkpoint path (any format encoders.py reads) or `random` (a random init of --model at
--img_size). --probe / --segment / --report pass flags to that script as they are; a stage without data flags runs
on its bundled sample with the light settings of QUICK (--no-quick: the scripts' own presets). Writes to --out_dir:
<encoder>/<stage>/ (each script's outputs, its random baseline in baseline_random/), compare/, results.json.
"""
import argparse
import os
import re
import shlex
import time

import base
import data
import downstream
import probe
import report
import segment
from base import UserError, mark
from downstream import print_rows

STAGES = {"probe": probe, "segment": segment, "report": report}
# bundled data on a CPU in minutes: 3 folds, the linear decoder (solved, seconds), a short LM run
QUICK = {"probe": ["--folds", "3"],
         "segment": ["--decoder", "linear"],
         "report": ["--max_steps", "40", "--lm_layers", "2", "--lm_dim", "128", "--max_new_tokens", "40"]}


def get_args(argv=None):
    p = base.ArgumentParser(__doc__)
    p.add_argument("--encoders", nargs="+", required=True, help="checkpoint paths, or `random`")
    p.add_argument("--names", nargs="+", help="row labels (default: from the paths)")
    p.add_argument("--baseline", default="random", help="random | none | one of --encoders (name or path)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    for s in STAGES:
        p.add_argument(f"--{s}", default="", help=f"flags passed to {s}.py as they are (quote them)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction,
                   help="light settings (default: on for a stage without data flags)")
    p.add_argument("--model", default="vit_tiny", help="architecture of a `random` encoder")
    p.add_argument("--img_size", type=int, default=112, help="resolution of a `random` encoder")
    p.add_argument("--n_boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--out_dir", default=os.path.join("out", "compare"))
    args = base.check(p.parse_args(argv), "img_size >= 1", "img_size <= 4096", "n_boot >= 1", "seed >= 0",
                      "num_workers >= 0")
    names = args.names or [e if e == "random" else os.path.splitext(os.path.basename(e.rstrip("/")))[0]
                           for e in args.encoders]
    if len(names) != len(args.encoders) or len(set(names)) != len(names):
        raise UserError("--names: one distinct name per encoder (two encoders share a file name: give --names)")
    for e in args.encoders:
        if e != "random" and not os.path.exists(e):
            raise UserError(f"--encoders {e}: no such file or folder")
    args.names = [re.sub(r"[^\w.+-]", "_", n) for n in names]
    if args.baseline not in ("random", "none"):
        hit = [n for n, e in zip(args.names, args.encoders) if args.baseline in (n, e)]
        if not hit:
            raise UserError(f"--baseline {args.baseline!r} is none of random, none, {', '.join(args.names)}")
        args.baseline = hit[0]
    return args


def stage_argv(args, stage, encoder, out_dir):
    """The flags one script gets: the shared ones, the encoder, the user's --<stage> flags, the quick settings."""
    own = shlex.split(getattr(args, stage))
    quick = args.quick if args.quick is not None else not any(f in own for f in ("--csv", "--dataset", "--data_dir"))
    argv = ["--out_dir", out_dir, "--seed", str(args.seed), "--num_workers", str(args.num_workers),
            "--n_boot", str(args.n_boot), "--model", args.model, "--img_size", str(args.img_size)]
    # "random" is passed on as such: without --encoder a script would take out/pretrain's export instead
    argv += (["--device", args.device] if args.device else []) + ["--encoder", encoder]
    return argv + (QUICK[stage] if quick else []) + own


def run_all(args):
    """{stage: {row name: results}}, {stage: {row name: comparison with the baseline}}. The random baseline is each
    script's own --baseline random (its random encoder in <stage>/baseline_random)."""
    res, cmp = {s: {} for s in args.stages}, {s: {} for s in args.stages}
    for stage in args.stages:
        main = STAGES[stage].main
        for name, enc in zip(args.names, args.encoders):
            print(f"\n=== {stage}: {name} ===", flush=True)
            d = os.path.join(args.out_dir, name, stage)
            against_random = args.baseline == "random" and enc != "random"
            res[stage][name] = main(stage_argv(args, stage, enc, d) + (["--baseline", "random"] * against_random))
            if against_random:
                res[stage][f"random {name}"] = data.read_json(os.path.join(d, "baseline_random", "results.json"))
                cmp[stage][name] = res[stage][name]["baseline"]
        if args.baseline not in ("random", "none"):
            against = os.path.join(args.out_dir, args.baseline, stage)
            for name in (n for n in args.names if n != args.baseline):
                cmp[stage][name] = downstream.compare_runs(main, os.path.join(args.out_dir, name, stage), against,
                                                           os.path.join(args.out_dir, "compare", f"{name}_{stage}"),
                                                           args)
    return res, cmp


# ----------------------------------------------------------------------------------------------------------------
# the tables: a row per encoder (and per baseline), the mark of its test against the baseline after each cell

def mark_of(cmp, name, *keys):
    """The mark of row `name`'s test at cmp[name]['metrics'][keys...] ('' without a test)."""
    r = (cmp.get(name) or {}).get("metrics", {})
    for k in keys:
        r = r.get(k) or {}
    return mark(r.get("p_one_tailed"))


def probe_table(res, cmp, metric):
    first = next(iter(res.values()))
    rows = [[name] + [probe.cell(r[metric][k]) + mark_of(cmp, name, metric, k) for k in first["classes"]]
            + [probe.cell(r["agg"][metric]) + mark_of(cmp, name, metric, "Agg.")] for name, r in res.items()]
    print_rows(f"Table 3 (linear probe): {metric.upper()}, mean ± std over {probe.unit_of(first['protocol'])}s",
               ["Encoder"] + first["classes"] + ["Agg."], rows)


def segment_table(res, cmp):
    first = next(iter(res.values()))
    rows = [[name, r["decoder"], segment.params_text(r["decoder_params"])]
            + [f"{r['test']['dice'][k] * 100:.1f}{mark_of(cmp, name, 'dice', k)}" for k in first["classes"]]
            + [f"{r['test']['mean_dice'] * 100:.1f}{mark_of(cmp, name, 'dice', 'mean Dice')}"]
            for name, r in res.items()]
    print_rows(f"Table 4 (segmentation, {first['task']}): Dice x100 on the test set",
               ["Encoder", "Decoder", "Params"] + first["classes"] + ["Mean Dice"], rows)


def report_table(res, cmp):
    # of labeler.METRICS: the paper's Table 5 columns (RadGraph F1 = R_GER), and the 5-finding F1
    metrics = ["ROUGE-L", "BLEU-4", "RadGraph F1", "Macro-F1-14", "Micro-F1-5"]
    rows = [[name] + [f"{r['metrics'][m]['median']:.2f} [{r['metrics'][m]['ci95'][0]:.2f}, "
                      f"{r['metrics'][m]['ci95'][1]:.2f}]{mark_of(cmp, name, m)}"
                      if r["metrics"].get(m, {}).get("value") is not None else "n/a" for m in metrics]
            for name, r in res.items()]
    print_rows("Table 5 (report generation): median [95% CI] of bootstrap resamples, 0-100", ["Encoder"] + metrics,
               rows)


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    base.write_args(args, args.out_dir)
    res, cmp = run_all(args)
    print("\n" + "=" * 100)
    if "probe" in res:
        for metric in ("auprc", "auroc"):
            probe_table(res["probe"], cmp["probe"], metric)
    if "segment" in res:
        segment_table(res["segment"], cmp["segment"])
    if "report" in res:
        report_table(res["report"], cmp["report"])
    against = {"random": "a random encoder of the same architecture", "none": "nothing (--baseline none)"}
    print(f"\nmarks: one-tailed paired bootstrap ({args.n_boot} resamples of the test items) of each encoder against "
          f"{against.get(args.baseline, args.baseline)}: ** p < 0.01, * p < 0.05")
    for stage, rows in res.items():
        devs = sorted({d for r in rows.values() for d in r.get("deviations", [])})
        print(f"{stage} deviations from the paper: {'; '.join(devs) or 'none'}")
    keep = ("name", "encoder", "encoder_format", "classes", "auprc", "auroc", "agg", "protocol", "deviations",
            "task", "test", "decoder", "decoder_params", "metrics", "data", "preprocess", "n_test")
    out = {"encoders": dict(zip(args.names, args.encoders)), "baseline": args.baseline,
           "results": {s: {n: {k: r[k] for k in keep if k in r} for n, r in rows.items()} for s, rows in res.items()},
           "tests": cmp, "settings": vars(args), "time_s": round(time.time() - t0, 1)}
    base.write_json(out, os.path.join(args.out_dir, "results.json"))
    print(f"wrote {os.path.join(args.out_dir, 'results.json')} ({out['time_s']:.0f} s)")
    return out


if __name__ == "__main__":
    base.run(main)
