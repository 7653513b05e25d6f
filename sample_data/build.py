"""Rebuild the bundled sample from the public data sets it was cut from (developer tool, not needed to use the
project). SRC holds one folder per set (nih14/, kermany/, lungseg/, reports/), each with its label file.

    python sample_data/build.py --src SRC

Takes a fixed, patient-disjoint-friendly subset of each public set, downscales it so the longest side is 256 px
(the models work at 224 px; this keeps the whole sample at a few MB), and copies each set's labels and licence
text beside it. Masks are resized with nearest-neighbour so their values (0 / 127 / 255) survive.
"""
import argparse, csv, os, random
from PIL import Image

SETS = {  # name: (label file, path columns, how many rows, a column to balance on)
    "nih14": ("labels.csv", ["path"], 80, None),
    "kermany": ("labels.csv", ["path"], 120, "pneumonia"),
    "lungseg": ("manifest.csv", ["image", "mask"], 30, None),
    "reports": ("reports.csv", ["path"], 60, None),
}


def shrink(src, dst, is_mask):
    im = Image.open(src)
    im = im.convert("L")
    w, h = im.size
    s = 256 / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    im = im.resize(size, Image.NEAREST if is_mask else Image.BICUBIC)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if dst.lower().endswith((".jpg", ".jpeg")):
        im.save(dst, quality=90)
    else:
        im.save(dst, optimize=True)
    return size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="folder holding nih14/, kermany/, lungseg/ and reports/")
    ap.add_argument("--dst", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    rng = random.Random(0)
    for name, (table, cols, n, balance) in SETS.items():
        with open(os.path.join(args.src, name, table), newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames, list(reader)
        rows.sort(key=lambda r: r[cols[0]])
        rng.shuffle(rows)
        if balance:  # equal numbers of each value of the balance column
            groups = {}
            for r in rows:
                groups.setdefault(r[balance], []).append(r)
            rows = [r for g in groups.values() for r in g[: n // len(groups)]]
        rows = sorted(rows[:n], key=lambda r: r[cols[0]])
        for r in rows:
            for c in cols:
                size = shrink(os.path.join(args.src, name, r[c]), os.path.join(args.dst, name, r[c]), c == "mask")
            if "width" in r:
                r["width"], r["height"] = size
        with open(os.path.join(args.dst, name, table), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
