"""report.py, llama.py, labeler.py: the Llama port against transformers, KV-cache decoding, the metrics against the
libraries, the CheXpert labeler on hand-written sentences, the loss mask, --label_only,
and a tiny end-to-end run on the bundled pairs."""
import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import report
from base import UserError
from labeler import OBSERVATIONS, Scorer, chexpert_f1, label_report
from llama import Llama, LlamaConfig, apply_lora, generate, load_hf_llama
from conftest import SAMPLE

REPORTS_CSV = SAMPLE / "reports" / "reports.csv"


# ----------------------------------------------------------------------------------------------------------------
# llama.py against transformers (a test-only dependency)

@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so a wrong RMSNorm cannot hide behind weight = 1
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("hf")
    m.save_pretrained(root / "single")
    m.save_pretrained(root / "sharded", max_shard_size="40KB")
    # .bin shards + index, written by hand in the pytorch_model-0000x-of-0000y.bin layout
    sd, binp = m.state_dict(), root / "bin"
    binp.mkdir()
    shutil.copy(root / "single" / "config.json", binp / "config.json")
    keys = sorted(sd)
    half, wmap = len(keys) // 2, {}
    for j, part in enumerate((keys[:half], keys[half:])):
        name = f"pytorch_model-0000{j + 1}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, binp / name)
        wmap.update({k: name for k in part})
    (binp / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return m, root


def test_llama_matches_transformers_logits(hf_model):
    m, root = hf_model
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1  # really sharded
    ids = torch.randint(0, 400, (3, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, :4], mask[2, :11] = 0, 0  # left padding
    with torch.no_grad():
        ref, ref_pad = m(ids).logits, m(ids, attention_mask=mask).logits
    for variant in ("single", "sharded", "bin"):
        ours = load_hf_llama(str(root / variant)).eval()
        with torch.no_grad():
            out, out_pad = ours(ids), ours(ids, attention_mask=mask)
        assert (out - ref).abs().max() < 1e-4, variant
        real = mask.bool()
        assert (out_pad[real] - ref_pad[real]).abs().max() < 1e-4, variant
        # inputs_embeds is the same computation (report.py splices image tokens this way)
        with torch.no_grad():
            assert torch.allclose(ours(inputs_embeds=ours.embed(ids)), out, atol=1e-6)


def test_llama_load_names_missing_and_unexpected_keys(hf_model, tmp_path):
    from safetensors.torch import load_file, save_file
    _, root = hf_model
    sd = load_file(root / "single" / "model.safetensors")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.1.extra.weight"] = torch.zeros(2)
    shutil.copy(root / "single" / "config.json", tmp_path / "config.json")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.layers\.1\.extra\.weight"):
        load_hf_llama(str(tmp_path))


def test_greedy_cached_equals_uncached_and_one_by_one(hf_model):
    m, root = hf_model
    ours = load_hf_llama(str(root / "single")).eval()
    lens = [7, 12, 4]
    prompts = [torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(n)) for n in lens]
    T = max(lens)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    cached = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=-1)
    uncached = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=-1, use_cache=False)
    single = [generate(ours, p[None], max_new_tokens=20, eos_token_id=-1)[0] for p in prompts]
    assert cached == uncached == single
    assert all(len(c) == 20 for c in cached)
    hf = m.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert [r[T:].tolist() for r in hf] == cached  # and the same tokens as transformers' own greedy search
    # EOS: a row stops at its first EOS (cut off), the others run on
    eos = cached[0][3]
    stopped = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos)
    assert stopped[0] == cached[0][:cached[0].index(eos)]


def test_beam_search_and_sampling(hf_model):
    """Beam search gives transformers' beams, without an EOS and with EOS tokens that end beams at every step, a
    prompt alone as in a padded batch; sampling with a seeded generator repeats itself, and top_p -> 0 is greedy."""
    m, root = hf_model
    ours = load_hf_llama(str(root / "single")).eval()
    prompts = [torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 9)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    beams = generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=-1, num_beams=3)
    for p, b in zip(prompts, beams):
        hf = m.generate(p[None], max_new_tokens=8, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                        length_penalty=1.0, early_stopping=False)
        assert hf[0, len(p):].tolist() == b
    assert beams == [generate(ours, p[None], max_new_tokens=8, eos_token_id=-1, num_beams=3)[0] for p in prompts]
    # with an EOS: the tokens of the no-EOS beams, each made the EOS in turn, so that beams end at every step
    ends = 0
    for p, b in zip(prompts, beams):
        for eos in dict.fromkeys(b[:6]):
            hf = m.generate(p[None], max_new_tokens=8, num_beams=3, do_sample=False, eos_token_id=eos, pad_token_id=0,
                            length_penalty=1.0, early_stopping=False)[0, len(p):].tolist()
            hf = hf[:hf.index(eos)] if eos in hf else hf
            ends += len(hf) < 8
            assert generate(ours, p[None], max_new_tokens=8, eos_token_id=eos, num_beams=3)[0] == hf, (eos, hf)
    assert ends >= 3  # the test saw reports end early, not only full-length beams
    draw = lambda **k: generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=-1, do_sample=True,
                                generator=torch.Generator().manual_seed(0), **k)
    assert draw(temperature=0.7, top_p=0.9) == draw(temperature=0.7, top_p=0.9)
    assert draw(top_p=1e-6) == generate(ours, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=-1)


def test_lora_starts_as_identity_and_trains_only_adapters():
    torch.manual_seed(0)
    lm = Llama(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 9))
    before = lm(ids).detach()
    apply_lora(lm, r=4, alpha=8)
    assert torch.allclose(lm(ids), before, atol=1e-6)  # B = 0 at the start
    names = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n and any(t in n for t in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in lm.state_dict()  # base weights keep their HF names


# ----------------------------------------------------------------------------------------------------------------
# metrics

HYPS = ["the heart size is normal . no pleural effusion", "small left effusion and mild edema",
        "no pneumothorax", "lungs are clear", "patchy opacity in the right lower lobe"]
REFS = ["heart size is normal and there is no pleural effusion", "moderate left pleural effusion with edema",
        "there is no pneumothorax or effusion", "the lungs are clear", "right lower lobe consolidation"]


def test_bleu_rouge_agree_with_the_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer
    s = Scorer(HYPS, REFS)
    assert s.bleu4(np.arange(5)) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    idx = np.array([0, 0, 2, 4, 4])  # a bootstrap resample with repeats
    want = sacrebleu.corpus_bleu([HYPS[i] for i in idx], [[REFS[i] for i in idx]]).score
    assert s.bleu4(idx) == pytest.approx(want, abs=1e-9)
    rs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # LLaVA-Rad's call: no stemmer
    want = 100 * np.mean([rs.score(REFS[i], HYPS[i])["rougeL"].fmeasure for i in idx])
    assert s.rouge_l(idx) == pytest.approx(want, abs=1e-9)


def test_chexpert_f1_matches_sklearn():
    from sklearn.metrics import f1_score
    gen = [label_report(h) for h in HYPS]
    ref = [label_report(r) for r in REFS]
    for u in (0, 1):
        to01 = lambda labs: np.array([[1 if l[o] == 1 or (u and l[o] == -1) else 0 for o in OBSERVATIONS]
                                      for l in labs])
        got = chexpert_f1(gen, ref, uncertain_as=u)
        assert got["macro_f1"] == pytest.approx(f1_score(to01(ref), to01(gen), average="macro", zero_division=0))
        assert got["micro_f1"] == pytest.approx(f1_score(to01(ref), to01(gen), average="micro", zero_division=0))


def test_f1_variants_against_hand_computed_values():
    """Four reports' labels written out, every count done by hand:
    uncertain as negative: Edema TP 1 (report 0), FN 1 (report 1) -> F1 2/3; Pneumonia FN, Cardiomegaly FP + FN,
    Pleural Effusion FP (its reference is uncertain), Atelectasis FN -> 0: Macro-F1-14 = (2/3) / 14;
    the five: TP 1, FP 2, FN 3 -> Micro-F1-5 = 2 / 7. Uncertain as positive: Edema, Pneumonia and Pleural
    Effusion F1 1, Cardiomegaly and Atelectasis 0 -> Macro-F1-14+ = 3 / 14."""
    from labeler import FIVE
    gen = [{"Edema": 1, "Pneumonia": -1}, {"Edema": -1, "Cardiomegaly": 1}, {"Pleural Effusion": 1}, {}]
    ref = [{"Edema": 1, "Pneumonia": 1}, {"Edema": 1}, {"Pleural Effusion": -1, "Cardiomegaly": 1},
           {"Atelectasis": 1}]
    s = Scorer(["a"] * 4, ["b"] * 4)
    s.gen_labels, s.ref_labels = gen, ref
    idx = np.arange(4)
    assert s.macro14(idx) == pytest.approx(100 * (2 / 3) / 14)
    assert s.macro14_upos(idx) == pytest.approx(100 * 3 / 14)
    assert s.micro5(idx) == pytest.approx(100 * 2 / 7)
    assert chexpert_f1(gen, ref)["micro_f1"] == pytest.approx(2 / 8)  # 14 pooled: TP 1, FP 2, FN 4
    assert chexpert_f1(gen, ref, 0, observations=FIVE)["per_class"]["Edema"] == pytest.approx(2 / 3)


def test_without_weights_the_rules_label_and_say_so(monkeypatch):
    import labeler
    monkeypatch.delenv(labeler.CHEXBERT_ENV, raising=False)
    monkeypatch.delenv(labeler.RADGRAPH_ENV, raising=False)
    cx, rg, notes = labeler.model_labelers()
    assert cx is None and rg is None
    metrics, s = labeler.score(HYPS, REFS, n_boot=5, labelers=(cx, rg, notes))
    assert s.labeler == "labeler.py rules" and s.rg is None
    assert all(metrics[m]["labeler"].startswith("labeler.py rules (fallback") for m in labeler.F1S)
    assert metrics["RadGraph F1"]["value"] is None and "not computed" in metrics["RadGraph F1"]["note"]
    assert [m for m in metrics][:3] == ["ROUGE-L", "BLEU-4", "Macro-F1-14"]  # the paper's order, R_GER absent


# ----------------------------------------------------------------------------------------------------------------
# the labeler

@pytest.mark.parametrize("text, want", [
    ("No pneumothorax, pleural effusion, or focal consolidation.",  # negation over a list
     {"Pneumothorax": 0, "Pleural Effusion": 0, "Consolidation": 0, "No Finding": 1}),
    ("Heart size normal and lungs are clear. No edema or pneumonia. No effusion",  # CheXpert's own sample report
     {"Cardiomegaly": 0, "Edema": 0, "Pneumonia": 0, "Pleural Effusion": 0, "No Finding": 1}),
    ("1. Left pleural effusion with adjacent atelectasis. Right effusion is also present.\n\n"
     "2. Cardiomegaly without overt edema.",
     {"Pleural Effusion": 1, "Atelectasis": 1, "Cardiomegaly": 1, "Edema": 0, "No Finding": None}),
    ("Minimal patchy airspace disease within the lingula, may reflect atelectasis or consolidation.",
     {"Lung Opacity": 1, "Atelectasis": -1, "Consolidation": -1, "No Finding": None}),
    ("There is a small left pleural effusion and no pneumothorax. Possible pneumonia in the right lower lobe.",
     {"Pleural Effusion": 1, "Pneumothorax": 0, "Pneumonia": -1}),
    ("Cannot exclude pneumonia. Pneumothorax is not excluded.", {"Pneumonia": -1, "Pneumothorax": -1}),
    ("No effusion. Large right effusion.", {"Pleural Effusion": 1}),  # positive beats negative
    ("The heart is moderately enlarged. Small pericardial effusion.", {"Cardiomegaly": 1, "Pleural Effusion": None}),
    ("Endotracheal tube in place. Lungs are clear.", {"Support Devices": 1, "No Finding": 1}),
    ("Bilateral ground-glass opacities concerning for COVID-19 pneumonia, but no pleural effusion.",
     {"Lung Opacity": 1, "Pneumonia": -1, "Pleural Effusion": 0}),
    ("Pneumothorax has resolved. Heart size is within normal limits.",
     {"Pneumothorax": 0, "Cardiomegaly": 0, "No Finding": 1}),
    # "suggestive of" is not one of CheXpert's uncertainty cues: the finding stays positive, as CheXpert labels it
    ("Findings suggestive of pulmonary oedema. Right rib fracture.", {"Edema": 1, "Fracture": 1, "No Finding": None}),
    ("Hyperinflated lungs consistent with emphysema.", {"No Finding": None}),  # a finding outside the 14
    ("No acute cardiopulmonary process.", {"No Finding": 1}),
])
def test_labeler_sentences(text, want):
    got = label_report(text)
    assert set(got) == set(OBSERVATIONS)
    for k, v in want.items():
        assert got[k] == v, (k, got)
    unmentioned = set(OBSERVATIONS) - set(want) - {"No Finding"}
    assert all(got[k] is None for k in unmentioned), got


LABELLED = json.loads((Path(__file__).parent / "labeler_sentences.json").read_text())


def test_labeler_agrees_with_hand_labelled_chexpert_sentences():
    """58 sentences in MIMIC-CXR's style, labelled by hand from the CheXpert labeler's published rules (its mention /
    unmention lists, negation and uncertainty patterns; the rule each one exercises is in the file). Every label
    of every sentence (14 x 58) must agree; the disagreements are listed if not."""
    bad = []
    for r in LABELLED:
        got = label_report(r["text"])
        bad += [(r["text"], o, got[o], r["labels"].get(o)) for o in OBSERVATIONS if got[o] != r["labels"].get(o)]
    assert len(LABELLED) >= 50 and not bad, bad


def test_labeler_over_calls_fixed():
    """Healed granulomatous infection is not Pneumonia; CheXpert's non-cues ('likely', 'suggestive of') and a
    negation far from the cue no longer make Pneumonia / Edema / Pneumothorax uncertain."""
    assert label_report("Calcified granuloma, sequela of prior granulomatous infection.")["Pneumonia"] is None
    assert label_report("Old granulomatous infection.")["Pneumonia"] is None
    assert label_report("Findings concerning for infection.")["Pneumonia"] == -1  # a current infection still counts
    assert label_report("No focal consolidation to suggest pneumonia.")["Pneumonia"] == 0
    assert label_report("Small left apical pneumothorax, likely from the recent line placement.")["Pneumothorax"] == 1
    assert label_report("The lungs may be mildly hyperinflated and edema is present.")["Edema"] == 1


# ----------------------------------------------------------------------------------------------------------------
# sequences and the loss mask

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rows = list(csv.DictReader(open(REPORTS_CSV)))
    # 400 pieces at most: the same tokenizer serves the tiny HF checkpoint (vocabulary 400) in the --lm test
    return report.train_tokenizer([r["text"] for r in rows], str(tmp_path_factory.mktemp("tok") / "tokenizer.model"),
                                  400)


def test_report_batch_decoding_equals_one_by_one(tok):
    """ReportModel.generate on a batch of images gives each image the text it gets alone: greedy and beam search."""
    torch.manual_seed(0)
    n = tok.sp.get_piece_size()
    lm = Llama(LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos, eos_token_id=tok.eos))
    model = report.ReportModel(report.Projector(16, 32), lm).eval()
    feats = torch.randn(3, 4, 16)
    for decoding in (None, {"num_beams": 3}):
        batch = model.generate(feats, tok, 12, decoding)
        assert batch == [model.generate(feats[i:i + 1], tok, 12, decoding)[0] for i in range(3)]
        assert len(set(batch)) > 1


def test_tokenizer_round_trips_characters_it_never_saw(tok):
    text = "Temp 38.1°C, SpO₂ 92% — naïve ≥ 5 mm; Ærø 中文 ✓"
    assert not any(ch in open(REPORTS_CSV, encoding="utf-8").read() for ch in "₂≥Æ中✓")  # unseen in training
    ids = tok.encode(text)
    assert tok.sp.unk_id() not in ids and tok.decode(ids) == text


def test_loss_mask_covers_only_report_tokens_and_eos(tok):
    reps = ["Small left pleural effusion.", "No pneumothorax. The heart size is normal and the lungs are clear."]
    n_img = 6
    ids, labels, mask = report.build_batch(tok, reps, n_img, max_report_tokens=150)
    prompt = report.prompt_ids(tok, n_img)
    assert (ids == report.IMAGE_TOKEN).sum(1).tolist() == [n_img, n_img]
    assert ids[0, 0] == tok.bos
    for i, r in enumerate(reps):
        want = tok.encode(r) + [tok.eos]
        pos = (labels[i] != -100).nonzero().flatten().tolist()
        assert pos == list(range(len(prompt), len(prompt) + len(want)))
        assert labels[i, pos].tolist() == want and ids[i, pos].tolist() == want
        assert mask[i].sum() == len(prompt) + len(want)  # padding is masked
    # the model's loss is the mean CE over exactly those tokens
    torch.manual_seed(0)
    lm = Llama(LlamaConfig(vocab_size=tok.sp.get_piece_size(), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2))
    model = report.ReportModel(report.Projector(16, 32), lm)
    feats = torch.randn(2, n_img, 16)
    loss = model(ids, feats, labels, mask)
    logits = lm(inputs_embeds=model.embed(ids, feats), attention_mask=mask)
    sel = labels[:, 1:] != -100
    assert torch.allclose(loss, F.cross_entropy(logits[:, :-1][sel], labels[:, 1:][sel]), atol=1e-6)
    with pytest.raises(UserError, match="residual"):
        report.Projector(16, 32, kind="residual")


# ----------------------------------------------------------------------------------------------------------------
# command line

def test_label_only_writes_input_columns_then_the_14(tmp_path):
    report.main(["--label_only", "--csv", str(REPORTS_CSV), "--out_dir", str(tmp_path)])
    src = list(csv.DictReader(open(REPORTS_CSV)))
    with open(tmp_path / "labels.csv") as f:
        r = csv.DictReader(f)
        rows = list(r)
        assert r.fieldnames == list(src[0]) + OBSERVATIONS
    assert len(rows) == len(src)
    for a, b in zip(src, rows):
        assert b["text"] == a["text"]
        lab = label_report(a["text"])
        assert all(b[o] == ("" if lab[o] is None else str(lab[o])) for o in OBSERVATIONS)
    assert {b[o] for b in rows for o in OBSERVATIONS} <= {"1", "0", "-1", ""}
    assert any(b["Lung Opacity"] == "1" for b in rows)


def test_end_to_end_tiny_run_and_compare(tmp_path, capsys):
    out = tmp_path / "run"
    res = report.main(["--model", "vit_tiny", "--img_size", "112", "--max_steps", "3", "--lm_layers", "1",
                       "--lm_dim", "64", "--lm_heads", "2", "--vocab_size", "400", "--max_new_tokens", "8",
                       "--n_boot", "20", "--num_workers", "0", "--out_dir", str(out), "--device", "cpu"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["encoder"].startswith("random-init vit_tiny")
    for m in ("BLEU-4", "ROUGE-L", "Macro-F1-14", "Micro-F1-14", "Macro-F1-5", "Micro-F1-5", "Macro-F1-14+"):
        v = saved["metrics"][m]
        assert v["ci95"][0] <= v["median"] <= v["ci95"][1]
    assert saved["metrics"]["Macro-F1-14"]["labeler"].startswith("labeler.py rules (fallback")
    assert saved["metrics"]["RadGraph F1"]["value"] is None  # no RadGraph weights given
    preds = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(preds) == saved["n_test"] == res["n_test"] > 0
    assert set(preds[0]) == {"path", "subject", "reference", "generated"}
    assert saved["distinct_generated"] == len({p["generated"] for p in preds})
    assert (out / "tokenizer.model").exists() and (out / "log.jsonl").exists()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("projector.") for k in ck["model"])
    cmp = report.main(["--compare", str(out), str(out), "--n_boot", "20", "--out_dir", str(tmp_path / "cmp")])
    assert all(r["delta"] == 0 for r in cmp["metrics"].values())
    assert (tmp_path / "cmp" / "compare.json").exists()
    # --eval_only on a second data set (a table of the training run's own test pairs): the same reports, the same
    # metrics; the model's settings come from the checkpoint, not from this command line
    second = tmp_path / "second.csv"
    with open(second, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "subject", "text"])
        w.writerows([p["path"], p["subject"], p["reference"]] for p in preds)
    capsys.readouterr()
    ev = report.main(["--eval_only", "--checkpoint", str(out), "--csv", str(second), "--max_new_tokens", "8",
                      "--n_boot", "20", "--num_workers", "0", "--out_dir", str(tmp_path / "eval"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert all(c in printed for c in ("ROUGE-L", "BLEU-4", "RadGraph F1", "Macro-F1-14", "Micro-F1-5"))
    assert "CheXpert F1 labels: labeler.py rules (fallback" in printed and "* RadGraph F1 not computed" in printed
    assert ev["eval_only"] and ev["steps"] == 0 and ev["n_test"] == saved["n_test"]
    assert list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv"))) == preds
    for m in ("BLEU-4", "ROUGE-L", "Macro-F1-14", "Macro-F1-14+", "Micro-F1-5"):
        assert ev["metrics"][m]["value"] == pytest.approx(saved["metrics"][m]["value"], abs=1e-9), m
    assert not (tmp_path / "eval" / "checkpoint.pt").exists()
    with pytest.raises(UserError, match="checkpoint.pt"):
        report.main(["--eval_only", "--checkpoint", str(tmp_path / "cmp"), "--csv", str(second)])


def test_end_to_end_with_a_hf_checkpoint_and_lora(hf_model, tok, tmp_path):
    """--lm DIR: a HF-format folder (config.json + safetensors + tokenizer.model) through the whole pipeline with
    LoRA; the adapters it saves load into transformers with peft and give the same logits as report.py's model;
    --eval_only on IU-Xray (R2Gen layout, test only) with that checkpoint is one command."""
    _, root = hf_model
    lm_dir = tmp_path / "lm"
    shutil.copytree(root / "sharded", lm_dir)
    shutil.copy(tok.path, lm_dir / "tokenizer.model")
    assert tok.sp.get_piece_size() <= 400  # ids fit the checkpoint's embedding
    out = tmp_path / "run"
    res = report.main(["--lm", str(lm_dir), "--train", "lora", "--grad_ckpt", "--model", "vit_tiny", "--img_size", "56",
                       "--max_steps", "2", "--lr", "1e-3", "--max_new_tokens", "5", "--n_boot", "10",
                       "--num_workers", "0", "--out_dir", str(out), "--device", "cpu"])
    assert res["train_mode"] == "lora" and res["lm"] == str(lm_dir)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert any("lora_A" in k for k in ck["model"]) and not any(k.endswith("q_proj.weight") for k in ck["model"])
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == res["n_test"]
    # peft reads the adapters: same logits as our LoRA model with the trained adapters
    peft = pytest.importorskip("peft")
    hf, _ = hf_model
    adapted = peft.PeftModel.from_pretrained(hf, str(out / "adapter")).eval()
    ours = load_hf_llama(str(lm_dir))
    apply_lora(ours, r=8, alpha=16)
    ours.load_state_dict({k[3:]: v for k, v in ck["model"].items() if k.startswith("lm.")}, strict=False)
    assert any(v.abs().sum() > 0 for k, v in ck["model"].items() if "lora_B" in k)  # the adapters moved
    ids = torch.randint(3, 400, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (adapted(ids).logits - ours.eval()(ids)).abs().max() < 1e-4
    # train on one set, test on IU-Xray: --eval_only with the checkpoint on an R2Gen-layout folder
    iu = tmp_path / "iu"
    img = SAMPLE / "reports" / "images" / os.listdir(SAMPLE / "reports" / "images")[0]
    (iu / "images" / "s1").mkdir(parents=True)
    shutil.copy(img, iu / "images" / "s1" / "0.png")
    ann = {"train": [{"id": "s1", "report": "The Heart is normal.", "image_path": ["s1/0.png"]}],
           "test": [{"id": "s1", "report": "No Effusion.", "image_path": ["s1/0.png"]}]}
    (iu / "annotation.json").write_text(json.dumps(ann))
    ev = report.main(["--eval_only", "--checkpoint", str(out), "--dataset", "iu_xray", "--data_dir", str(iu),
                      "--max_new_tokens", "5", "--n_boot", "10", "--num_workers", "0", "--device", "cpu",
                      "--out_dir", str(tmp_path / "iu_eval")])
    assert ev["n_test"] == 2 and ev["train_mode"] == "lora" and ev["lm"] == str(lm_dir)
    rows = list(csv.DictReader(open(tmp_path / "iu_eval" / "predictions.csv")))
    assert [r["reference"] for r in rows] == ["the heart is normal.", "no effusion."]
    assert all(r["generated"] == r["generated"].lower() for r in rows)
