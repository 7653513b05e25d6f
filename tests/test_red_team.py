"""Bad input as a tough user types it, in every script: each number flag with a table of bad values, each file a
user names with a table of bad files. Every one must end with exit status 2 and one `error: ...` line, never a
Python traceback, and write nothing a later run would mistake for a result."""
import json
import os
import pickle
import re

import pytest

import base
import bench
import compare
import prepare
import pretrain
import probe
import report
import segment
from conftest import ROOT, SAMPLE

SCRIPTS = {"pretrain": (pretrain, []), "prepare": (prepare, ["--data_dir", "x", "--cache_dir", "y"]),
           "probe": (probe, []), "segment": (segment, []), "report": (report, []),
           "compare": (compare, ["--encoders", "random"]), "bench": (bench, [])}
# number flags where 0 or a negative number means something (a seed of 0, no workers, a feature switched off)
ZERO_OK = {"enc_mean", "seed", "num_workers", "probe_every", "monitor_every", "grad_clip", "warmup", "start_lr", "final_lr",
           "min_keep", "weight_decay", "dice_loss", "n_overlays", "steps", "data_workers", "ema", "crop_scale"}


def parser_of(module):
    """The parser a script's get_args builds (caught before it parses anything)."""
    seen = {}

    class Stop(Exception):
        pass

    def grab(self, argv=None, namespace=None):
        seen["parser"] = self
        raise Stop
    original = base.ArgumentParser.parse_args
    base.ArgumentParser.parse_args = grab
    try:
        module.get_args([])
    except Stop:
        pass
    finally:
        base.ArgumentParser.parse_args = original
    return seen["parser"]


def number_flags(module):
    """(flag, type, nargs) of every int / float flag of a script's parser."""
    return [(a.option_strings[0], a.type, a.nargs) for a in parser_of(module)._actions
            if a.type in (int, float) and a.option_strings]


def test_documented_commands_use_flags_the_scripts_have():
    """Every `python X.py ...` / `torchrun ... X.py ...` command in the README and docs/ names only flags X.py has
    (and in a choice flag, one of its choices): the docs never tell a user to type what the program refuses."""
    docs = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", n) for n in os.listdir(ROOT / "docs")
                                                if n.endswith(".md")]
    commands = []
    for path in docs:
        text = re.sub(r"\\\n\s*", " ", open(path).read())  # join continued lines
        for line in text.splitlines():
            for m in re.finditer(r"(?:python|torchrun[^`|]*?)\s+(\w+)\.py\b([^`|#&;]*)", line):
                if m.group(1) in SCRIPTS:
                    commands.append((os.path.basename(path), m.group(1), m.group(2)))
    assert len(commands) > 40
    parsers = {name: parser_of(module) for name, (module, _) in SCRIPTS.items()}
    wrong = []
    for doc, name, rest in commands:
        actions = parsers[name]._option_string_actions
        words = re.sub(r'"[^"]*"', "", rest).split()  # a quoted value holds another script's flags
        for i, w in enumerate(words):
            if not w.startswith("--"):
                continue
            flag = w.split("=")[0]
            if flag not in actions:
                wrong.append(f"{doc}: {name}.py {flag}")
            elif actions[flag].choices and i + 1 < len(words) and not words[i + 1].startswith("-") and \
                    words[i + 1].isidentifier() and words[i + 1] not in actions[flag].choices:
                wrong.append(f"{doc}: {name}.py {flag} {words[i + 1]}")
    assert not wrong, wrong


def refused(module, argv, capsys):
    """True when module.get_args(argv), run as the script runs it, exits 2 with one `error:` line and no traceback."""
    with pytest.raises(SystemExit) as e:
        base.run(lambda: module.get_args(argv) and (_ for _ in ()).throw(SystemExit(0)))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return e.value.code == 2 and len([l for l in err.splitlines() if l.startswith("error:")]) == 1


CASES = [(name, flag, typ, nargs) for name, (module, _) in SCRIPTS.items() for flag, typ, nargs in number_flags(module)]


@pytest.mark.parametrize("name,flag,typ,nargs", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_every_number_flag_refuses_bad_values(name, flag, typ, nargs, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module, required = SCRIPTS[name]
    n = nargs if isinstance(nargs, int) else 1
    bad = ["nan", "inf", "-inf", "abc", ""] + (["1.5", "1e12"] if typ is int else [])
    if flag.lstrip("-") not in ZERO_OK:
        bad += ["-1"] + (["0"] if typ is int or flag.lstrip("-") in ("lr", "ipe_scale", "frontal_ratio") else [])
    for value in bad:
        argv = required + [flag] + [value] * n
        assert refused(module, argv, capsys), (argv, "accepted")
    assert not os.listdir(tmp_path), os.listdir(tmp_path)  # nothing written for a run that cannot be right


# ----------------------------------------------------------------------------------------------------------------
# bad files where a script takes a file

class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def bad_files(tmp_path):
    out = {"empty": tmp_path / "empty.pt", "truncated": tmp_path / "truncated.pt", "text": tmp_path / "text.pt",
           "pickle": tmp_path / "evil.pt", "json": tmp_path / "bad.json"}
    out["empty"].write_bytes(b"")
    out["text"].write_text("not a checkpoint\n")
    import torch
    torch.save({"a": torch.zeros(100)}, out["truncated"])
    out["truncated"].write_bytes(out["truncated"].read_bytes()[:200])
    with open(out["pickle"], "wb") as f:
        pickle.dump({"x": Exploit()}, f)
    out["json"].write_text('{"classes": [')
    return out


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "pickle"])
def test_bad_checkpoints_are_one_line_everywhere(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    f = str(bad_files(tmp_path)[kind])
    tiny = ["--model", "vit_tiny", "--img_size", "56", "--num_workers", "0", "--out_dir", str(tmp_path / "o")]
    runs = [(probe.main, ["--encoder", f, *tiny]), (segment.main, ["--encoder", f, *tiny]),
            (report.main, ["--encoder", f, *tiny]), (pretrain.main, ["--init_from", f, *tiny])]
    ck = tmp_path / "rep"
    ck.mkdir()
    os.link(f, ck / "checkpoint.pt")
    runs.append((report.main, ["--eval_only", "--checkpoint", str(ck), "--out_dir", str(tmp_path / "e")]))
    for main, argv in runs:
        with pytest.raises(SystemExit) as e:
            base.run(lambda: main(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and err.count("error:") == 1, (main, err)
    assert not (tmp_path / "pwned").exists()


def test_malformed_result_files_are_one_line(tmp_path, capsys):
    files = bad_files(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    os.link(files["json"], run / "results.json")
    (run / "predictions.csv").write_text("path,fold\nx.png,zero\n")
    (run / "per_image_dice.csv").write_text("path,mean\nx.png,abc\n")
    for main, argv in [(probe.main, ["--table", str(run)]), (probe.main, ["--compare", str(run), str(run)]),
                       (segment.main, ["--compare", str(run), str(run)]),
                       (report.main, ["--compare", str(run), str(run)])]:
        with pytest.raises(SystemExit) as e:
            base.run(lambda: main(argv + ["--out_dir", str(tmp_path / "c")]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and err.count("error:") == 1, (argv, err)


def test_a_mask_column_of_words_and_a_missing_image_are_one_line(tmp_path, capsys):
    rows = open(SAMPLE / "lungseg" / "manifest.csv").read().splitlines()
    (tmp_path / "m.csv").write_text("\n".join([rows[0]] + [r.replace("masks/", "words are not a mask ") for r in
                                                          rows[1:12]]) + "\n")
    argv = ["--csv", str(tmp_path / "m.csv"), "--image_root", str(SAMPLE / "lungseg"), "--model", "vit_tiny",
            "--img_size", "56", "--num_workers", "0", "--out_dir", str(tmp_path / "o"), "--decoder", "linear"]
    with pytest.raises(SystemExit) as e:
        base.run(lambda: segment.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    json.dumps(err)
