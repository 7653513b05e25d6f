"""The model-based report metrics: CheXbert's labels and F1 from weights in chexbert.pth's published layout (tiny,
random) against f1chexbert run beside it on the same file; RadGraph's partial reward against radgraph's own reward
function; a missing or damaged weights file is one line; LLaVA-Rad's MIMIC-CXR annotation JSON."""
import contextlib
import csv
import json
import os
import shutil
from unittest import mock

import numpy as np
import pytest
import torch

import labeler
import report
from base import UserError
from conftest import SAMPLE

transformers = pytest.importorskip("transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pleural", "effusion", "normal", "heart", "size", ".",
         "enlarged", "mild", "edema", "and", "left", "basal", "at", "##ele", "##ct", "##asis", "increased", "pulmonary",
         "pneum", "##onia", "stable", "cardio", "##megaly", "of", "evidence", "s", "##s", ",", "bilateral", "lung",
         "opacity", "possible", "tube", "in", "place"]
REPORTS = ["No pleural effusion. Normal heart size.", "Normal heart size.", "Enlarged heart.", "",
           "Increased mild pulmonary edema and left basal atelectasis.", "Possible pneumonia, stable cardiomegaly.",
           "No evidence of pneumonia.\n\nStable   cardiomegaly.", "Bilateral lung opacity; tube in place.",
           "No pleural effusions.", "Mild edema. " * 200]  # the last one is cut to 512 wordpieces


@pytest.fixture(scope="module")
def chexbert(tmp_path_factory):
    """chexbert.pth as CheXbert's run_bert.py saves it (DataParallel's module. prefixes, epoch and optimizer state
    beside the weights) for a 2-layer BERT, and a vocab.txt beside it; weights large enough that reports differ."""
    d = tmp_path_factory.mktemp("chexbert")
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                  intermediate_size=96, initializer_range=0.5)
    bert = transformers.BertModel(cfg)
    heads = torch.nn.ModuleList([torch.nn.Linear(64, 4) for _ in range(13)] + [torch.nn.Linear(64, 2)])
    for h in heads:
        torch.nn.init.normal_(h.weight, std=1.0)
    sd = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    sd.update({f"module.linear_heads.{k}": v for k, v in heads.state_dict().items()})
    torch.save({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {"state": {}}}, d / "chexbert.pth")
    return d, cfg


@contextlib.contextmanager
def f1chexbert_beside(d, cfg):
    """f1chexbert 0.0.2's F1CheXbert on the same chexbert.pth, with bert-base-uncased's config and tokenizer swapped
    for the tiny ones (it would fetch them) and shims for today's libraries: transformers 5 dropped encode_plus (on
    a token list: [CLS] + ids + [SEP]); scikit-learn's _check_targets returns more values and its count_nonzero
    takes only sparse matrices (both used for f1chexbert's accuracy, not its F1)."""
    mod = pytest.importorskip("f1chexbert.f1chexbert")
    tok = transformers.BertTokenizer.from_pretrained(str(d))
    check = mod._check_targets
    with mock.patch.object(mod, "CACHE_DIR", str(d)), \
            mock.patch.object(mod.AutoConfig, "from_pretrained", lambda *a, **k: cfg), \
            mock.patch.object(mod.BertTokenizer, "from_pretrained", lambda *a, **k: tok), \
            mock.patch.object(mod, "_check_targets", lambda *a: check(*a)[:3]), \
            mock.patch.object(mod, "count_nonzero", lambda X, axis=None: np.count_nonzero(np.asarray(X), axis=axis)), \
            mock.patch.object(type(tok), "encode_plus", lambda self, t: {
                "input_ids": [self.cls_token_id] + self.convert_tokens_to_ids(t) + [self.sep_token_id]}, create=True):
        yield mod.F1CheXbert(device="cpu")


def test_chexbert_labels_and_f1_equal_f1chexbert(chexbert):
    d, cfg = chexbert
    ours = labeler.CheXbert(str(d / "chexbert.pth"))
    assert ours.ids("No pleural\n effusion.") == [2, 5, 6, 7, 11, 3]  # [CLS] no pleural effusion . [SEP]
    assert ours.ids("Atelectasis") == [2, 18, 19, 20, 21, 3] and len(ours.ids(REPORTS[-1])) == 512
    classes = ours.classes(REPORTS, batch_size=4)  # batched and padded; f1chexbert labels one report at a time
    with f1chexbert_beside(d, cfg) as f1:
        ref = [f1.get_label(r, mode="classification") for r in REPORTS]
        want = {-1: 3, 1: 1, 0: 2, "": 0}
        assert [[want[v] for v in row] for row in ref] == classes.tolist()
        assert len({tuple(r) for r in classes.tolist()}) >= 4  # the reports get different labels
        hyps, refs = REPORTS[:5], REPORTS[5:]
        _, _, cr14, cr5 = f1(hyps=hyps, refs=refs)
    lab = ours(hyps + refs)
    g, r = lab[:5], lab[5:]
    # f1chexbert counts uncertain as positive: our uncertain_as=1
    for obs, cr in ((labeler.OBSERVATIONS, cr14), (labeler.FIVE, cr5)):
        got = labeler.chexpert_f1(g, r, uncertain_as=1, observations=obs)
        assert 0 < got["micro_f1"] < 1
        assert got["macro_f1"] == pytest.approx(cr["macro avg"]["f1-score"], abs=1e-12)
        assert got["micro_f1"] == pytest.approx(cr["micro avg"]["f1-score"], abs=1e-12)
    s = labeler.Scorer(hyps, refs, ours)
    assert s.labeler == "CheXbert" and s.gen_labels == g
    assert s.macro14_upos(np.arange(5)) == pytest.approx(100 * cr14["macro avg"]["f1-score"], abs=1e-9)


def test_chexbert_weights_missing_or_damaged_are_one_line(chexbert, tmp_path):
    d, _ = chexbert
    with pytest.raises(UserError, match=r"no such file: fetch https://huggingface.co/StanfordAIMI/RRG_scorers"):
        labeler.CheXbert(str(tmp_path / "chexbert.pth"))
    shutil.copy(d / "chexbert.pth", tmp_path / "chexbert.pth")
    with pytest.raises(UserError, match="no vocab.txt beside it"):
        labeler.CheXbert(str(tmp_path / "chexbert.pth"))
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS[:-3]) + "\n")  # another model's vocabulary
    with pytest.raises(UserError, match="38 tokens, but .* embeds 41"):
        labeler.CheXbert(str(tmp_path / "chexbert.pth"))
    shutil.copy(d / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "chexbert.pth").write_bytes((d / "chexbert.pth").read_bytes()[:5000])  # truncated download
    with pytest.raises(UserError, match="chexbert.pth"):
        labeler.CheXbert(str(tmp_path / "chexbert.pth"))
    sd = torch.load(d / "chexbert.pth", weights_only=True)
    del sd["model_state_dict"]["module.linear_heads.13.weight"]
    torch.save(sd, tmp_path / "chexbert.pth")
    with pytest.raises(UserError, match="not CheXbert's chexbert.pth"):
        labeler.CheXbert(str(tmp_path / "chexbert.pth"))
    torch.save({"model_state_dict": torch.zeros(3)}, tmp_path / "chexbert.pth")
    with pytest.raises(UserError, match="not CheXbert's chexbert.pth"):
        labeler.CheXbert(str(tmp_path / "chexbert.pth"))
    with pytest.raises(UserError, match="RADJEPA_CHEXBERT .*no such file"), \
            mock.patch.dict("os.environ", {"RADJEPA_CHEXBERT": str(tmp_path / "none.pth")}):
        labeler.model_labelers()
    with pytest.raises(UserError, match="--radgraph .*no such folder: fetch .*radgraph.tar.gz"):
        labeler.model_labelers(radgraph=str(tmp_path / "rg"))
    (tmp_path / "rg").mkdir()
    (tmp_path / "rg" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no vocabulary, weights.th there"):
        labeler.model_labelers(radgraph=str(tmp_path / "rg"))


RG_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "1", "2", "no", "acute", "cardio", "##pulmonary",
            "process", "moderate", "hiatal", "hernia", "mild", "pulmonary", "edema", "and", "effusion", ".", "left",
            "pleural", "heart", "is", "normal", "size"]


@pytest.fixture(scope="module")
def radgraph_model(tmp_path_factory):
    """A model folder in radgraph.tar.gz's layout (config.json in DyGIE's form, vocabulary/ with the radgraph__ NER
    and relation label files, weights.th) for a 1-layer BERT that is a local folder (config.json, vocab.txt; the
    real archive names microsoft/BiomedNLP-BiomedBERT from the Hugging Face cache); random weights, made large."""
    rr = pytest.importorskip("radgraph.radgraph")
    root = tmp_path_factory.mktemp("rg")
    bert, m = root / "bert", root / "radgraph"
    (m / "vocabulary").mkdir(parents=True)
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(RG_WORDS) + "\n")
    transformers.BertConfig(vocab_size=len(RG_WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                            intermediate_size=48).save_pretrained(bert)
    (m / "vocabulary" / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
    (m / "vocabulary" / "radgraph__ner_labels.txt").write_text("\nANAT-DP\nOBS-DP\nOBS-U\nOBS-DA\n")
    (m / "vocabulary" / "radgraph__relation_labels.txt").write_text("\nlocated_at\nmodify\nsuggestive_of\n")
    tix = {"bert": {"type": "pretrained_transformer_mismatched", "model_name": str(bert), "max_length": 512}}
    (m / "config.json").write_text(json.dumps({
        "dataset_reader": {"type": "dygie", "max_span_width": 3, "token_indexers": tix},
        "model": {"type": "dygie", "embedder": {"token_embedders": tix}, "feature_size": 8, "max_span_width": 3,
                  "target_task": "relation", "initializer": {}, "module_initializer": {},
                  "feedforward_params": {"num_layers": 2, "hidden_dims": 16, "dropout": 0.4},
                  "loss_weights": {"ner": 1.0, "relation": 1.0, "coref": 0.0, "events": 0.0},
                  "modules": {"coref": {"coref_prop": 0, "max_antecedents": 10, "spans_per_word": 0.3},
                              "ner": {}, "relation": {"spans_per_word": 0.5},
                              "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                                         "loss_weights": {"trigger": 1.0, "arguments": 0.5}}}}}))
    torch.manual_seed(0)
    with labeler.radgraph_offline(), mock.patch.object(rr.torch, "load", lambda *a, **k: {}), \
            mock.patch.object(rr.dygie.DyGIE, "load_state_dict", lambda *a, **k: None):
        sd = rr.RadGraph(model_type="radgraph", model_cache_dir=str(root), cuda=-1).model.state_dict()
    for k, v in sd.items():
        if v.dtype.is_floating_point and v.dim() == 2 and "transformer_model" not in k:
            torch.nn.init.normal_(v, std=1.0)
    torch.save(sd, m / "weights.th")
    return root


def test_radgraph_f1_equals_radgraphs_f1radgraph(radgraph_model, tmp_path):
    """report.py's RadGraph F1 (radgraph's annotations, labeler.radgraph_partial, empty reports 0) equals radgraph's
    own F1RadGraph(reward_level="partial", model_type="radgraph") on the same model folder, report by report; the
    folder may have any name; a damaged weights.th is one line."""
    rr = pytest.importorskip("radgraph.radgraph")
    hyps = ["no acute cardiopulmonary process moderate hiatal hernia", "", "mild pulmonary edema and left effusion .",
            "heart size is normal .", "left pleural effusion"]
    refs = ["moderate hiatal hernia", "no acute process", "mild pulmonary edema .", "heart is normal size .",
            "left pleural effusion"]
    other = tmp_path / "my-radgraph-model"
    shutil.copytree(radgraph_model / "radgraph", other)
    _, annotate, notes = labeler.model_labelers(radgraph=str(other))
    ours = labeler.radgraph_rewards(annotate, hyps, refs)
    with labeler.radgraph_offline():
        mean, per_report, _, _ = rr.F1RadGraph(reward_level="partial", model_type="radgraph", cuda=-1,
                                               model_cache_dir=str(radgraph_model))(refs=refs, hyps=hyps)
    assert ours.tolist() == per_report and ours[1] == 0 and ours[4] == 1
    assert len(set(per_report)) >= 3  # the reports score differently
    ann = annotate(hyps[:1])[0]
    assert ann["entities"] and any(e["relations"] for e in ann["entities"].values())
    metrics, s = labeler.score(hyps, refs, 10, labelers=(None, annotate, notes))
    assert metrics["RadGraph F1"]["value"] == pytest.approx(100 * mean)
    assert metrics["RadGraph F1"]["note"].startswith("radgraph package, partial reward")
    (other / "weights.th").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="radgraph could not load it offline .*radgraph.tar.gz"):
        labeler.model_labelers(radgraph=str(other))


def llava_rad_entry(i, image, view="AP", method="rule-based", findings="No pleural effusion.", reason=None):
    return {"id": f"{i}", "image": image, "generate_method": method, "view": view, "reason": reason,
            "conversations": [{"from": "human", "value": "<image>\nDescribe the findings of the chest x-ray.\n"},
                              {"from": "gpt", "value": findings}]}


def test_llava_rad_annotations_load_as_llava_rad_filters_them(tmp_path):
    """A file in LLaVA-Rad's layout (chat_test_MIMIC_CXR_all_gpt4extract_rulebased_v1.json): kept as its
    mimic_test_findings loader keeps entries (rule-based, findings a string, AP / PA; "mimic/" prefix stripped)."""
    import archives
    imgs = sorted((SAMPLE / "reports" / "images").iterdir())[:2]
    rel = ["p10/p10000032/s50414267/aaa.jpg", "p11/p11000011/s51000011/bbb.jpg"]
    for r, img in zip(rel, imgs):
        (tmp_path / "mimic-cxr-jpg" / "files" / r).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(img, tmp_path / "mimic-cxr-jpg" / "files" / r)
    entries = [llava_rad_entry(0, rel[0], reason="Dyspnea.\nEval for effusion"),
               llava_rad_entry(1, "mimic/" + rel[1], view="PA", findings="Mild  cardiomegaly.\n No edema."),
               llava_rad_entry(2, rel[0], method="gpt4"), llava_rad_entry(3, rel[0], view="LATERAL"),
               llava_rad_entry(4, rel[1], findings=float("nan")), llava_rad_entry(5, rel[1], findings=None)]
    ann = tmp_path / "chat_test_MIMIC_CXR_all_gpt4extract_rulebased_v1.json"
    ann.write_text(json.dumps(entries))  # NaN as pandas writes it: json's NaN literal
    args = type("Args", (), {"data_dir": str(tmp_path / "mimic-cxr-jpg"), "annotations": str(ann)})()
    out, source = archives.load_llava_rad(args)
    assert [(s["subject"], s["text"], s["part"]) for s in out] == [
        ("10000032", "No pleural effusion.", "test"), ("11000011", "Mild  cardiomegaly.\n No edema.", "test")]
    assert all(os.path.exists(s["path"]) for s in out)
    assert "2 kept; 1 not rule-based, 2 no findings, 1 not AP/PA dropped" in source
    args.data_dir += "/files"  # the files/ folder itself (LLaVA-Rad's image_folder) works too
    assert [s["path"] for s in archives.load_llava_rad(args)[0]] == [s["path"] for s in out]
    for bad, msg in (({"a": 1}, "a JSON list"), ([{"image": "x"}], "entry 0 is not in LLaVA-Rad's layout"),
                     ([llava_rad_entry(0, rel[0], method="gpt4")], "no entry left")):
        ann.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=msg):
            archives.load_llava_rad(args)
    ann.write_text("[{")
    with pytest.raises(UserError, match="not valid JSON"):
        archives.load_llava_rad(args)
    with pytest.raises(UserError, match="llava_rad is LLaVA-Rad's MIMIC-CXR test set"):
        report.get_args(["--dataset", "llava_rad", "--data_dir", str(tmp_path), "--annotations", str(ann)])


def test_compare_and_scores_with_chexbert_weights(chexbert, tmp_path, capsys):
    """report.py --compare --chexbert: the F1s come from CheXbert's labels and say so."""
    d, _ = chexbert
    refs = REPORTS[:6]
    for name, hyps in (("a", REPORTS[4:10]), ("b", REPORTS[2:8])):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "subject", "reference", "generated"])
            w.writerows([f"img{i}.png", i, r, h] for i, (r, h) in enumerate(zip(refs, hyps)))
    res = report.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--n_boot", "20", "--chexbert",
                       str(d / "chexbert.pth"), "--out_dir", str(tmp_path / "cmp")])
    assert "CheXpert F1 labels: CheXbert" in capsys.readouterr().out
    assert list(res["metrics"])[:3] == ["ROUGE-L", "BLEU-4", "Macro-F1-14"]
    cx = labeler.CheXbert(str(d / "chexbert.pth"))
    want = labeler.chexpert_f1(cx(REPORTS[4:10]), cx(refs))["macro_f1"] - labeler.chexpert_f1(
        cx(REPORTS[2:8]), cx(refs))["macro_f1"]
    assert res["metrics"]["Macro-F1-14"]["delta"] == pytest.approx(100 * want, abs=1e-9)
    metrics, _ = labeler.score(REPORTS[4:10], refs, 10, labelers=labeler.model_labelers(str(d / "chexbert.pth")))
    assert all(metrics[m]["labeler"] == f"CheXbert ({d / 'chexbert.pth'})" for m in labeler.F1S)
    labeler.print_table("x", metrics, 10)
    assert f"CheXpert F1 labels: CheXbert ({d / 'chexbert.pth'})" in capsys.readouterr().out


def ann(*entities):
    """radgraph's annotation dict from (tokens, label, relations) triples, entities numbered from "1"."""
    return {"text": "", "entities": {str(i + 1): {"tokens": t, "label": lab, "start_ix": i, "end_ix": i,
                                                  "relations": rel} for i, (t, lab, rel) in enumerate(entities)}}


def test_radgraph_partial_reward_equals_radgraphs():
    """labeler.radgraph_partial against radgraph's own compute_reward(..., "partial") on hand-made annotations:
    relations on the subject count, their type and object do not; tokens match case-sensitively (radgraph 0.1.18);
    a report with no entity scores 0; duplicates count once (sets)."""
    rewards = pytest.importorskip("radgraph.rewards")
    A = ann(("effusion", "OBS-DP", [["located_at", "2"]]), ("pleural", "ANAT-DP", []), ("edema", "OBS-DA", []))
    cases = [
        (A, A),
        (A, ann(("effusion", "OBS-DP", []), ("pleural", "ANAT-DP", []), ("edema", "OBS-DA", []))),
        (A, ann(("effusion", "OBS-DP", [["modify", "2"]]), ("left", "ANAT-DP", []), ("edema", "OBS-U", []))),
        (A, ann(("Effusion", "OBS-DP", [["located_at", "2"]]), ("pleural", "ANAT-DP", []))),
        (A, ann(("edema", "OBS-DA", []), ("edema", "OBS-DA", []), ("heart", "ANAT-DP", []))),
        (A, ann()), (ann(), ann()), (ann(("a", "OBS-DP", [])), ann(("b", "OBS-DP", []))),
    ]
    got = [labeler.radgraph_partial(h, r) for h, r in cases]
    assert got == [rewards.compute_reward(h, r, "partial") for h, r in cases]
    assert got[0] == 1 and got[5] == got[6] == got[7] == 0 and 0 < got[2] < got[1] < 1
    # per report: an empty hypothesis or reference is 0 without being annotated (radgraph's F1RadGraph)
    seen = []
    table = {"effusion": A, "no effusion": cases[1][1], "edema": cases[4][1]}

    def annotate(reports):
        seen.extend(reports)
        return [table[r] for r in reports]
    f1 = labeler.radgraph_rewards(annotate, ["effusion", "", "edema"], ["no effusion", "effusion", "effusion"])
    assert f1.tolist() == [got[1], 0.0, rewards.compute_reward(cases[4][1], A, "partial")]
    assert seen == ["effusion", "edema", "no effusion", "effusion"]


def test_eval_only_on_llava_rad_with_both_labelers(chexbert, radgraph_model, tmp_path, capsys):
    """The whole path: a tiny report model trained on the bundled pairs, then `report.py --eval_only` on a file in
    LLaVA-Rad's layout with --chexbert and --radgraph: Table 5's columns with CIs, each F1 saying its labeler."""
    d, _ = chexbert
    imgs = sorted((SAMPLE / "reports" / "images").iterdir())[:3]
    entries = []
    for i, img in enumerate(imgs):
        rel = f"p1{i}/p1{i}00000{i}/s5{i}00000{i}/{img.name}"
        (tmp_path / "mimic" / "files" / rel).parent.mkdir(parents=True)
        shutil.copy(img, tmp_path / "mimic" / "files" / rel)
        entries.append(llava_rad_entry(i, rel, findings=REPORTS[i]))
    (tmp_path / "test.json").write_text(json.dumps(entries))
    run = tmp_path / "run"
    report.main(["--model", "vit_tiny", "--img_size", "56", "--max_steps", "1", "--lm_layers", "1", "--lm_dim", "32",
                 "--lm_heads", "2", "--vocab_size", "400", "--max_new_tokens", "4", "--n_boot", "5",
                 "--num_workers", "0", "--out_dir", str(run), "--device", "cpu"])
    capsys.readouterr()
    res = report.main(["--eval_only", "--checkpoint", str(run), "--dataset", "llava_rad", "--data_dir",
                       str(tmp_path / "mimic"), "--annotations", str(tmp_path / "test.json"), "--chexbert",
                       str(d / "chexbert.pth"), "--radgraph", str(radgraph_model / "radgraph"), "--num_beams", "2",
                       "--max_new_tokens", "4", "--n_boot", "20", "--num_workers", "0", "--device", "cpu",
                       "--out_dir", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("encoder") and "ROUGE-L" in line)
    assert header.split()[1:7] == ["ROUGE-L", "BLEU-4", "RadGraph", "F1", "Macro-F1-14", "Micro-F1-14"]
    assert f"CheXpert F1 labels: CheXbert ({d / 'chexbert.pth'})" in out
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["n_test"] == res["n_test"] == 3 and "LLaVA-Rad MIMIC-CXR" in saved["data"]
    for m in ("ROUGE-L", "BLEU-4", "RadGraph F1", "Macro-F1-14", "Micro-F1-5"):
        assert saved["metrics"][m]["ci95"][0] <= saved["metrics"][m]["median"] <= saved["metrics"][m]["ci95"][1]
    assert saved["metrics"]["Macro-F1-14"]["labeler"].startswith("CheXbert")
    assert saved["metrics"]["RadGraph F1"]["note"].startswith("radgraph package, partial reward")
    assert saved["settings"]["num_beams"] == 2
