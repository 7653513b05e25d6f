"""compare.py: the three evaluations for two encoders on the bundled data, tiny settings, the tables with the
significance marks of the paired tests against each encoder's same-architecture random baseline, results.json."""
import json

import numpy as np
import torch

import data
import compare
from conftest import SAMPLE
from encoders import save_encoder
from model import build_vit

LIGHT = {"probe": "--epochs 2 --folds 2",
         "segment": "--decoder linear --max_steps 20 --n_overlays 0",
         "report": "--max_steps 2 --lm_layers 1 --lm_dim 64 --lm_heads 2 --vocab_size 400 --max_new_tokens 4"}


def test_compare_two_encoders_tables_and_marks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", img_size=56, patch_size=14)
    x = torch.stack([data.Preprocess(56)(data.read_image(p)) for p in sorted((SAMPLE / "lungseg" / "images").glob("*"))[:8]])
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3)
    for _ in range(2):  # a briefly trained encoder: two steps of a toy objective on real X-rays
        loss = -vit(x).std(0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_encoder(vit, str(tmp_path / "tiny.safetensors"), step=2)
    argv = ["--encoders", "random", str(tmp_path / "tiny.safetensors"), "--model", "vit_tiny", "--img_size", "56",
            "--n_boot", "30", "--device", "cpu", "--out_dir", str(tmp_path / "ev")]
    argv += [f"--{k}={v}" for k, v in LIGHT.items()]
    out = compare.main(argv)
    text = capsys.readouterr().out
    for title in ("Table 3 (linear probe): AUPRC", "Table 3 (linear probe): AUROC", "Table 4 (segmentation",
                  "Table 5 (report generation)"):
        assert title in text
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["baseline"] == "random" and set(saved["results"]) == {"probe", "segment", "report"}
    # rows: the two encoders and the random init of the trained one's architecture (the `random` one is its own)
    for stage in ("probe", "segment", "report"):
        assert set(saved["results"][stage]) == {"random", "tiny", "random tiny"}
        assert set(saved["tests"][stage]) == {"tiny"}
    assert saved["results"]["probe"]["random tiny"]["encoder"].startswith("random-init of the architecture")
    # the mark in the table is the one of the test's p-value
    p = saved["tests"]["probe"]["tiny"]["metrics"]["auroc"]["Agg."]["p_one_tailed"]
    agg = saved["results"]["probe"]["tiny"]["agg"]["auroc"]
    want = "**" if p < 0.01 else "*" if p < 0.05 else ""
    row = next(l for l in text.split("Table 3 (linear probe): AUROC")[1].splitlines() if l.startswith("| tiny "))
    assert row.rstrip(" |").endswith(f"{agg['mean']:.3f}±{agg['std']:.3f}{want}")
    assert 0 <= saved["tests"]["segment"]["tiny"]["metrics"]["dice"]["mean Dice"]["p_one_tailed"] <= 1
    assert np.isfinite(out["results"]["report"]["tiny"]["metrics"]["ROUGE-L"]["median"])
    assert any("small Llama" in d for d in saved["results"]["report"]["tiny"]["deviations"])


def test_compare_flags(tmp_path):
    import pytest
    from base import UserError
    (tmp_path / "a.safetensors").write_bytes(b"")
    a = str(tmp_path / "a.safetensors")
    assert compare.get_args(["--encoders", "random", a, "--baseline", "a"]).baseline == "a"  # by name
    assert compare.get_args(["--encoders", "random", a, "--baseline", a]).baseline == "a"  # or by path
    for argv, msg in ((["--encoders", "nope.pt"], "no such file"), (["--encoders", a, a], "one distinct name"),
                      (["--encoders", a, "--baseline", "b"], "none of random, none, a")):
        with pytest.raises(UserError, match=msg):
            compare.get_args(argv)
    flags = compare.stage_argv(compare.get_args(["--encoders", a, "--probe", "--csv x.csv --folds 3"]), "probe", a,
                                "o")
    assert flags[-3:] == ["x.csv", "--folds", "3"] and flags.count("--folds") == 1  # data given: no quick settings
    quick = compare.stage_argv(compare.get_args(["--encoders", a]), "probe", a, "o")
    assert quick[-len(compare.QUICK["probe"]):] == compare.QUICK["probe"]


def test_the_random_row_is_random_whatever_lies_in_out(tmp_path, monkeypatch):
    """A default pretraining export in out/ must not stand in for the `random` row (it used to: the scripts fell
    back to it when no --encoder was passed, while results.json said random)."""
    import probe
    monkeypatch.chdir(tmp_path)
    trained = build_vit("vit_tiny", img_size=56, patch_size=14)
    (tmp_path / "out" / "pretrain").mkdir(parents=True)
    save_encoder(trained, str(tmp_path / "out" / "pretrain" / "encoder.safetensors"))
    argv = compare.stage_argv(compare.get_args(["--encoders", "random", "--img_size", "56"]), "probe", "random", "o")
    assert argv[argv.index("--encoder") + 1] == "random"
    res = probe.main(argv + ["--epochs", "1", "--folds", "2"])
    assert res["encoder"] == "random-init vit_tiny (--encoder random)" and res["encoder_format"] == "random-init"
