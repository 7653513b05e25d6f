"""The model-based report metrics: CheXbert's labels and F1 from weights in chexbert.pth's published layout (tiny,
random) against f1chexbert run beside it on the same file; RadGraph's partial reward against radgraph's own reward
function; a missing or damaged weights file is one line; LLaVA-Rad's MIMIC-CXR annotation JSON."""
import contextlib
import json
import shutil
import sys
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
           "No pleural effusions.", "Mild edema. " * 150]  # the last one is cut to 512 wordpieces


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
    tok = transformers.BertTokenizer(vocab_file=str(d / "vocab.txt"))
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
    shutil.copy(d / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "chexbert.pth").write_bytes((d / "chexbert.pth").read_bytes()[:5000])  # truncated download
    with pytest.raises(UserError, match="chexbert.pth"):
        labeler.CheXbert(str(tmp_path / "chexbert.pth"))
    sd = torch.load(d / "chexbert.pth", weights_only=True)
    del sd["model_state_dict"]["module.linear_heads.13.weight"]
    torch.save(sd, tmp_path / "chexbert.pth")
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
