"""
A rule-based CheXpert-14 report labeler, written for this project after the design of the CheXpert labeler (Irvin
et al., AAAI 2019: mention phrases per observation, then negation and uncertainty rules, then aggregation), with
compact regular-expression rules instead of its dependency-parse patterns; and report.py's metrics as LLaVA-Rad's
evaluation computes them: ROUGE-L (rouge-score, no stemmer), BLEU-4 (sacrebleu), RadGraph F1 (partial reward, from
RadGraph's model run by the radgraph package) and CheXpert F1 from CheXbert's labels (its chexbert.pth on
transformers' BertModel), with bootstrap CIs. The model weights are read from local paths only (never downloaded at
run time); without CheXbert's, the F1s come from the rules here, and say so.

    from labeler import label_report, chexpert_f1, score, model_labelers, OBSERVATIONS
    label_report("Heart size normal. Small left effusion. No pneumothorax. Possible pneumonia.")
    # {'No Finding': None, 'Cardiomegaly': 0, 'Pleural Effusion': 1, 'Pneumothorax': 0, 'Pneumonia': -1, ...}
    chexpert_f1([label_report(g) for g in generated], [label_report(r) for r in references])["macro_f1"]
    labelers = model_labelers("/models/chexbert.pth", "/models/radgraph")   # CheXbert, RadGraph (None: fallback)
    metrics, scorer = score(generated, references, 500, 0, labelers)   # ROUGE-L, BLEU-4, ...: value, median, CI

Labels: 1 positive, 0 negative, -1 uncertain, None not mentioned. How a report is labelled:
  1. split into sentences, each sentence into clauses at words that change the subject ("but", "however",
     "although", "which", "there is", ";" ...): a negation or uncertainty cue never reaches across a clause;
  2. find every mention phrase of the 14 observations (and of other findings that rule out "No Finding"), minus
     "unmention" phrases (pericardial effusion is not a pleural effusion, a calcified nodule not a lung lesion);
  3. per mention: an uncertainty cue that contains a negation ("cannot exclude", "not ruled out", "no new") makes it
     uncertain; else the nearest cue before it in its clause (within the cue's reach in words), or a cue right after
     it ("... is normal", "... has resolved", "... is suspected"), makes it negative or uncertain; two findings
     joined by "or" / "versus" are uncertain; otherwise positive. Words for anatomy rather than a finding ("heart
     size", "cardiac silhouette", "mediastinum") count only with a qualifier: enlarged -> positive, normal ->
     negative, stable / borderline -> uncertain (CheXpert's rules for these phrases);
  4. several mentions of one observation: positive > uncertain > negative (CheXpert's aggregation); "heart failure"
     or "CHF" also makes Cardiomegaly uncertain;
  5. No Finding = 1 when no observation other than Support Devices (and no other finding) is positive or uncertain,
     else blank (CheXpert never writes No Finding = 0).
"""
import contextlib
import csv
import importlib.util
import io
import os
import re
import tempfile
from functools import partialmethod
from unittest import mock

import numpy as np
import torch
from tqdm import tqdm

from base import UserError, bootstrap_ci

OBSERVATIONS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices"]
OTHER = "_other finding"  # findings outside the 14 that still mean the study is not normal

# ----------------------------------------------------------------------------------------------------------------
# phrases (lower case, matched on word starts). kind "finding": the phrase names the abnormality itself; kind
# "anatomy": it names a structure and needs a qualifier in its clause to say anything.

MENTIONS = {
    "Enlarged Cardiomediastinum": [
        ("finding", r"(widen\w*|enlarge\w*) (of the )?(cardio)?mediastin\w*|mediastinal (widening|enlargement)"),
        ("anatomy", r"(cardio)?mediastin(um|al)( silhouette| contours?| configuration)?|pericardial silhouette")],
    "Cardiomegaly": [("finding", r"cardiomegaly|cardiac enlargement|enlarged (heart|cardiac silhouette)"),
                     ("anatomy", r"(the )?heart( size)?\b|cardiac (size|shadow|contours?|silhouette)")],
    "Lung Lesion": [("finding", r"mass(es)?\b|nodul(e|es)\b|nodular (densit|opacit|opacification)\w*|lump\b|"
                                r"cavitary lesion|cavitation|carcinoma|neoplasm|tumou?r|malignan\w*|metasta\w*")],
    "Lung Opacity": [("finding", r"opaci\w*|decreased translucency|increased density|air[- ]?space (disease|shadowing)|"
                                 r"infiltrat\w*|interstitial (marking|pattern|lung|shadowing|thickening)\w*|"
                                 r"reticula\w*|ground[- ]glass|parenchymal scar\w*|peribronchial thickening|"
                                 r"scar(ring)?\b|haziness|hazy")],
    "Edema": [("finding", r"edema|heart failure|\bchf\b"),
              ("uncertain", r"(vascular|pulmonary) congestion|indistinctness|vascular prominence|cephalization")],
    "Consolidation": [("finding", r"consolidat\w*|condensation")],
    "Pneumonia": [("finding", r"(broncho)?pneumonia\w*|infection|infectious( process)?|pneumonitis")],
    "Atelectasis": [("finding", r"atelecta\w*|collapse[sd]?\b")],
    "Pneumothorax": [("finding", r"(hydro)?pneumothora(x|ces)")],
    "Pleural Effusion": [("finding", r"effusions?\b|pleural fluid|hydrothorax|hemothorax")],
    "Pleural Other": [("finding", r"pleural (thickening|plaques?|scar\w*)|fibrosis|fibrothorax|"
                                  r"pleuro-?(parenchymal|pericardial) scar\w*")],
    "Fracture": [("finding", r"fractur\w*")],
    "Support Devices": [("finding", r"pacer|pacemaker|\bpicc\b|catheter|tubes?\b|endotracheal|tracheostomy|"
                                    r"\bng\b|nasogastric|valve replacement|prosthetic valve|hardware|arthroplast\w*|"
                                    r"\bicd\b|defibrillator|devices?\b|drains?\b|plates?\b|screws?\b|cannula|"
                                    r"sternotomy wires?|\bwires?\b|\bcoils?\b|mediport|port-?a-?cath|\becmo\b|"
                                    r"(central|venous|arterial|jugular|subclavian|midline|swan-ganz) lines?|lines\b|"
                                    r"support (device|line|tube)s?")],
    # not one of the 14, but a study that shows them has a finding (CheXpert's "no finding" mention list)
    OTHER: [("finding", r"emphysema|bullae|bullous|hyperinfla\w*|hyperexpan\w*|copd|asthma|bronchiectasis|"
                        r"bronchitis|bronchiolitis|blunt\w*|eventration|(hemi)?diaphragm\w* elevat\w*|"
                        r"elevat\w* (of the )?(left |right )?(hemi)?diaphragm|scoliosis|kyphosis|degenerat\w*|"
                        r"calcifi\w*|hernia|granuloma\w*|pneumomediastinum|pneumoperitoneum|subcutaneous emphysema|"
                        r"volume loss|deformity|hemorrhage|hematoma|contusion|aspiration|cavit\w*|cyst\w*|"
                        r"nodular pattern|tracheal deviation|lymphadenopathy|adenopathy|thickening|"
                        r"atherosclero\w*|osteopenia|abnormal\w*|lesions?\b|densit(y|ies)")],
}
UNMENTIONS = {
    "Pleural Effusion": r"pericardial effusions?",
    # healed granulomatous disease (calcified granulomas, "sequelae of old granulomatous infection") is not a
    # pneumonia; CheXpert's own lists would count the word "infection" here, the one place this labeler departs
    "Pneumonia": r"(granulomatous|fungal|tuberculous|mycobacterial) (infection|disease)\w*|"
                 r"(old|prior|remote|healed|previous|past) (granulomatous |tuberculous )?infection\w*",
    "Lung Lesion": r"calcified nodul\w*|massive",
    "Lung Opacity": r"pleural scar\w*",
    "Cardiomegaly": r"(over|overlying|in|behind|projecting over|through) the( left| right)? heart|"
                    r"heart (failure|disease|rate|surgery|transplant\w*)",
    "Enlarged Cardiomediastinum": r"(in|of|into) the( superior| anterior| posterior)? mediastinum",
    "Support Devices": r"(kerley|septal|b-|fissural|reticular) lines|lines? of (the|a)",
    OTHER: r"pleural thickening|peribronchial thickening|interstitial thickening|wall thickening",
}

# qualifiers that turn an anatomy mention into a statement
ABNORMAL_Q = r"enlarg\w*|widen\w*|increas\w*|large|prominen\w*|dilat\w*|globular"
STABLE_Q = r"stable|unchanged|not changed|similar|borderline|top[- ]normal|upper limits? of normal"

# ----------------------------------------------------------------------------------------------------------------
# cues: (regex, reach in words for a cue before its mention)

PSEUDO_NEG = (r"no (significant |substantial |appreciable )?(interval )?(change|increase|decrease|worsening)|"
              r"without (interval )?change|not only|gram[- ]negative|not (significantly )?changed")
PRE_UNCERTAIN_STRONG = [  # negation words inside, uncertain meaning: matched before the negation cues
    (r"can ?not (be )?(exclude[d]?|rule[d]? out)|could not (be )?(exclude[d]?|rule[d]? out)|"
     r"not (be )?(excluded|ruled out)|no new|no evidence to rule out|may not be excluded", 15)]
PRE_NEGATION = [
    (r"\bno\b|\bnot\b|without|negative for|free of|clear of|absence of|\babsent\b|resolution of|resolved|"
     r"rule[sd]? out|exclude[sd]?|removal of|rather than|\bnor\b|neither|never|den(y|ies|ied)|"
     r"clearing of|cleared|interval clearing|history of|disappearance of|drainage of", 15),
    (r"\bnormal\b|unremarkable|\bclear\b", 3),
]
# CheXpert's uncertainty cues (patterns/pre_negation_uncertainty.txt and post_negation_uncertainty.txt): "possible",
# "probable", "may / might / could / would", "suspect", "question", "concern for", "versus", ... Its rules attach a
# cue to the word it governs in a dependency parse; a short reach in words stands in for that. Words CheXpert does
# not list ("likely", "suggestive of", "indeterminate", "evaluate for") leave a finding positive, as there.
PRE_UNCERTAIN = [
    (r"\bmay\b|\bmight\b|\bcould\b|\bwould\b|\bmaybe\b|possibl[ey]|probabl[ey]|presum\w*|suspect\w*|"
     r"suspicio\w*|concern(ing)? for|worrisome for|suggestion of|question(able|ed)?|differential|versus|\bvs\b|"
     r"consider\w*|favou?r\w*|less likely|secondary to|(be|is|are) compatible with|"
     r"correlat\w* (clinically )?for|not (well |clearly )?(seen|visualized|evaluated|assessed|appreciated)|"
     r"(poorly|incompletely) (seen|visualized|evaluated|assessed)|obscur\w*", 8),
]
POST_UNCERTAIN_STRONG = r"(is|are|was|were)? ?(can ?not|could not|not) (be )?(excluded|ruled out)"
POST_NEGATION = (r"\b(is|are|appears?|remains?|otherwise|now|has|have|been|within|seems?|looks?|\s)*"
                 r"(normal|unremarkable|within normal limits|resolved|cleared|removed|no longer|absent|negative|"
                 r"not (seen|identified|present|enlarged|widened|dilated|demonstrated|visuali[sz]ed|appreciated|"
                 r"evident|detected))")
POST_UNCERTAIN = (r"\b(is|are|was|were|could|may|might|also|be|\s)*(suspected|possible|possibly|less likely|"
                  r"questionable|versus|vs\b|or\b|(not|poorly|incompletely) (well |clearly )?(seen|visuali[sz]ed|"
                  r"evaluated|appreciated)|obscured)")
POST_AFFIRM = r"(is|are) (again |still |now |also |newly )?(seen|present|noted|identified|demonstrated|visible)"
POST_WINDOW = 5  # words after a mention searched for post cues (up to the next comma)

CLAUSE_BREAK = re.compile(r";|:|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b|\baside from\b|"
                          r"\bapart from\b|\bwhereas\b|\bwhile\b|\bwhich\b|\bwho\b|\bsince\b|\bbecause\b|"
                          r"\bthere (is|are|was|were)\b|\band (there|the)\b|\bwith (a|an)\b|"
                          r"\band (?=([a-z]+ ){1,3}(is|are|was|were|has|have)\b)")  # "..., and edema is present"
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n\s*\n|\n(?=\s*(?:\d+[.)]|[-*]))")
WORD = re.compile(r"[a-z0-9]+")


def _compile(p):
    return re.compile(r"(?<![a-z0-9])(?:" + p + r")")


_MENTIONS = {obs: [(kind, _compile(p)) for kind, p in lst] for obs, lst in MENTIONS.items()}
_UNMENTIONS = {obs: _compile(p) for obs, p in UNMENTIONS.items()}
_PSEUDO = _compile(PSEUDO_NEG)
_CUES = ([("U!", _compile(p), r) for p, r in PRE_UNCERTAIN_STRONG] + [("N", _compile(p), r) for p, r in PRE_NEGATION]
         + [("U", _compile(p), r) for p, r in PRE_UNCERTAIN])
_POST_U_STRONG, _POST_N, _POST_U, _POST_AFFIRM = (re.compile(r"^\W*" + p) for p in (
    POST_UNCERTAIN_STRONG, POST_NEGATION, POST_UNCERTAIN, POST_AFFIRM))
_ABNORMAL, _STABLE = _compile(ABNORMAL_Q), _compile(STABLE_Q)
_JOIN = re.compile(r"^\W*(or|versus|vs\.?|and/or)\W+(\w+\W+){0,3}$")


def normalise(text):
    """Lower case, British spellings to American (the mention lists are American), whitespace collapsed."""
    t = " " + str(text).lower() + " "
    for a, b in (("oedema", "edema"), ("haemo", "hemo"), ("haema", "hema"), ("tumour", "tumor"), ("oesoph", "esoph"),
                 ("paediatric", "pediatric"), ("centre", "center")):
        t = t.replace(a, b)
    return re.sub(r"[ \t]+", " ", t).strip()


def sentences(text):
    return [s.strip() for s in SENTENCE_SPLIT.split(text or "") if s and s.strip()]


def clauses(sentence):
    """Split at clause-breaking words; the breaking word starts the next clause (so 'there is no X' keeps 'no')."""
    cuts = [0] + [m.start() for m in CLAUSE_BREAK.finditer(sentence)] + [len(sentence)]
    return [sentence[a:b] for a, b in zip(cuts, cuts[1:]) if sentence[a:b].strip()]


def _n_words(s):
    return len(WORD.findall(s))


def _cue_spans(clause):
    """All cue matches (kind, start, end, reach), longest first where they overlap (so 'cannot exclude' beats
    'exclude' and 'no new' beats 'no'); pseudo-negations ('no change in') are removed first."""
    masked = _PSEUDO.sub(lambda m: "#" * len(m.group(0)), clause)
    found = sorted(((kind, m.start(), m.end(), reach) for kind, rx, reach in _CUES for m in rx.finditer(masked)),
                   key=lambda c: (c[1], -(c[2] - c[1])))
    out, last_end = [], -1
    for c in found:
        if c[1] >= last_end:
            out.append(c)
            last_end = c[2]
    return out


def _mentions(clause):
    """(observation, kind, start, end, text) of every mention not inside an unmention phrase (a mention that
    strictly contains the unmention, "widening of the mediastinum" around "of the mediastinum", still counts).
    Mentions of one observation separated only by spaces ("nasogastric tube") are one mention, so a cue after
    the last word ("... tube has been removed") reaches the whole phrase."""
    out = []
    for obs, lst in _MENTIONS.items():
        un = [m.span() for m in _UNMENTIONS[obs].finditer(clause)] if obs in _UNMENTIONS else []
        taken = []
        for kind, rx in lst:
            for m in rx.finditer(clause):
                s, e = m.span()
                inside = any(s < ue and e > us and not (s <= us and e >= ue and e - s > ue - us) for us, ue in un)
                if inside or any(s < te and e > ts for ts, te in taken):
                    continue  # an unmention, or a shorter phrase inside a longer mention of the same observation
                taken.append((s, e))
                out.append((obs, kind, s, e, m.group(0)))
    out.sort(key=lambda x: x[2])
    merged = []
    for m in out:
        j = next((k for k in range(len(merged) - 1, -1, -1) if merged[k][0] == m[0]), None)
        if j is not None and not clause[merged[j][3]:m[2]].strip(" -"):
            p = merged[j]
            kind = "finding" if "finding" in (p[1], m[1]) else p[1]
            merged[j] = (p[0], kind, p[2], m[3], clause[p[2]:m[3]])
        else:
            merged.append(m)
    return merged


def _classify(clause, cues, mention, mentions):
    """1 / 0 / -1 for one mention in its clause, or None (an anatomy word with no qualifier)."""
    obs, kind, s, e, _ = mention
    before = [c for c in cues if c[2] <= s and _n_words(clause[c[2]:s]) <= c[3]]
    pre = before[-1][0] if before else None
    after = clause[e:].split(",")[0]
    window = " ".join(after.split()[:POST_WINDOW])
    if pre and "," in clause[before[-1][2]:s] and _POST_AFFIRM.search(window):
        pre = None  # "no acute process, consolidation is seen": the finding is asserted in its own phrase
    if pre == "U!" or _POST_U_STRONG.search(window):
        return -1
    if pre == "N" or _POST_N.search(window):
        return 0
    joined = any(o is not mention and ((o[3] <= s and _JOIN.match(clause[o[3]:s])) or
                                       (o[2] >= e and _JOIN.match(clause[e:o[2]]))) for o in mentions)
    if pre == "U" or _POST_U.search(window) or joined or kind == "uncertain":
        return -1
    if kind == "anatomy":
        # a qualifier just before or after the word ("enlarged heart", "heart size is mildly enlarged")
        rest = " ".join(clause[:s].split()[-3:]) + " | " + window
        if _ABNORMAL.search(rest):
            return 1
        return -1 if _STABLE.search(rest) else None
    return 1


def label_report(text):
    """{observation: 1 | 0 | -1 | None} for the 14 CheXpert observations of one report."""
    found = {}  # observation -> labels of its mentions
    for sent in sentences(normalise(text)):
        for cl in clauses(sent):
            cues, ments = _cue_spans(cl), _mentions(cl)
            for m in ments:
                lab = _classify(cl, cues, m, ments)
                if lab is None:
                    continue
                found.setdefault(m[0], []).append(lab)
                if m[0] == "Edema" and lab != 0 and m[4] in ("heart failure", "chf"):
                    found.setdefault("Cardiomegaly", []).append(-1)  # CheXpert's heart-failure exception
    out = {}
    for obs in OBSERVATIONS[1:]:
        labs = found.get(obs)
        out[obs] = None if not labs else 1 if 1 in labs else -1 if -1 in labs else 0
    other = found.get(OTHER, [])
    any_finding = any(out[o] in (1, -1) for o in OBSERVATIONS[1:-1]) or 1 in other or -1 in other
    return {"No Finding": None if any_finding else 1, **out}


# ----------------------------------------------------------------------------------------------------------------
# CheXpert F1 of generated reports against references

FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]  # the CheXpert competition five


def binarise(labels, uncertain_as=0, observations=OBSERVATIONS):
    """1 / 0 per observation: positive -> 1; uncertain -> `uncertain_as`; negative or not mentioned -> 0."""
    return [1 if labels.get(o) == 1 else (uncertain_as if labels.get(o) == -1 else 0) for o in observations]


def chexpert_f1(gen_labels, ref_labels, uncertain_as=0, idx=None, observations=OBSERVATIONS):
    """CheXpert F1 of generated vs reference label dicts (lists of label_report outputs, same order), over the
    reports idx (a bootstrap resample; default all). Uncertain counts as negative (uncertain_as=0: LLaVA-Rad's
    "rrg", its Macro-F1-14) or positive (1: "rrg+", Macro-F1-14+). An observation positive in neither generated
    nor reference reports has F1 0 (scikit-learn's zero_division=0), so `macro_f1` averages all of `observations`;
    `macro_f1_present` averages those positive in some reference, `micro_f1` pools the counts."""
    idx = range(len(ref_labels)) if idx is None else idx
    K = len(observations)
    g, r = (np.array([binarise(L[i], uncertain_as, observations) for i in idx], dtype=bool).reshape(-1, K)
            for L in (gen_labels, ref_labels))
    tp, fp, fn = ((g & r).sum(0).tolist(), (g & ~r).sum(0).tolist(), (~g & r).sum(0).tolist())
    f1 = [2 * tp[k] / (2 * tp[k] + fp[k] + fn[k]) if tp[k] + fp[k] + fn[k] else 0.0 for k in range(K)]
    pres = [f for f, p in zip(f1, r.any(0)) if p]
    T, P, N = sum(tp), sum(fp), sum(fn)
    return {"macro_f1": sum(f1) / K, "macro_f1_present": sum(pres) / len(pres) if pres else float("nan"),
            "micro_f1": 2 * T / (2 * T + P + N) if T + P + N else 0.0,
            "per_class": dict(zip(observations, f1)), "uncertain_as": uncertain_as}


# ----------------------------------------------------------------------------------------------------------------
# CheXbert (Smit et al. 2020) and RadGraph F1 from the weights those labelers publish, read from local paths only

CHEXBERT_ENV, RADGRAPH_ENV = "RADJEPA_CHEXBERT", "RADJEPA_RADGRAPH"
CHEXBERT_URL = "https://huggingface.co/StanfordAIMI/RRG_scorers/resolve/main/chexbert.pth"
BERT_VOCAB_URL = "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/vocab.txt"
RADGRAPH_URL = "https://huggingface.co/StanfordAIMI/RRG_scorers/resolve/main/radgraph.tar.gz"
# CheXbert's heads, in its order (stanfordmlgroup/CheXbert src/constants.py CONDITIONS); classes 0 blank, 1 positive,
# 2 negative, 3 uncertain (the No Finding head: 0 blank, 1 positive), as labeler.py's None / 1 / 0 / -1
CHEXBERT_CONDITIONS = ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                       "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                       "Fracture", "Support Devices", "No Finding"]
CHEXBERT_CLASS = {0: None, 1: 1, 2: 0, 3: -1}


def weights_path(flag, given, env):
    """The weights file / folder a model-based metric reads: --flag, else the environment variable, else None."""
    path = given or os.environ.get(env) or None
    return (path, f"--{flag}" if given else env) if path else (None, None)


class CheXbert:
    """CheXbert's labeler (bert-base-uncased + 14 linear heads on the last layer's [CLS] state) rebuilt with
    transformers' BertModel from the published chexbert.pth ({"model_state_dict": {"module.bert....",
    "module.linear_heads.K...."}, ...}); the BERT shape is read from the weights (heads: width / 64, as bert-base).
    Reports are cleaned and tokenized as CheXbert's label.py: strip, whitespace collapsed, [CLS] wordpieces [SEP],
    cut to 512 ids; the tokenizer is bert-base-uncased's vocab.txt, which must sit beside chexbert.pth."""

    def __init__(self, path, where="--chexbert", device="cpu"):
        from weights import load_torch
        fetch = f"fetch {CHEXBERT_URL} to that path (or point {where} at chexbert.pth)"
        if not os.path.isfile(path):
            raise UserError(f"{where} {path}: no such file: {fetch}")
        folder = os.path.dirname(os.path.abspath(path))
        vocab = os.path.join(folder, "vocab.txt")
        if not os.path.isfile(vocab):
            raise UserError(f"{where} {path}: no vocab.txt beside it: fetch bert-base-uncased's {BERT_VOCAB_URL} "
                            f"into {folder}")
        try:
            import transformers
        except ImportError:
            raise UserError(f"{where}: CheXbert needs the transformers package (pip install transformers)")
        sd = load_torch(path, ("model_state_dict",))["model_state_dict"]
        try:
            sd = {k.removeprefix("module."): v for k, v in sd.items()}
            sd.pop("bert.embeddings.position_ids", None)  # older transformers saved it; it is arange(512) anyway
            words, width = sd["bert.embeddings.word_embeddings.weight"].shape
            cfg = transformers.BertConfig(
                vocab_size=words, hidden_size=width, num_attention_heads=max(1, width // 64),
                num_hidden_layers=len({k.split(".")[3] for k in sd if k.startswith("bert.encoder.layer.")}),
                intermediate_size=sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=sd["bert.embeddings.position_embeddings.weight"].shape[0],
                type_vocab_size=sd["bert.embeddings.token_type_embeddings.weight"].shape[0])
            self.bert = transformers.BertModel(cfg).eval()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(width, 4) for _ in range(13)] + [
                torch.nn.Linear(width, 2)]).eval()
            model = torch.nn.ModuleDict({"bert": self.bert, "linear_heads": self.heads})
            model.load_state_dict(sd, strict=True)
        except (KeyError, RuntimeError, IndexError, ValueError, AttributeError, TypeError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:150]
            raise UserError(f"{where} {path}: not CheXbert's chexbert.pth ({why}): {fetch}")
        # the folder's vocab.txt (BertTokenizer's constructor argument for it differs between transformers 4 and 5)
        self.tok = transformers.BertTokenizer.from_pretrained(folder, do_lower_case=True, local_files_only=True)
        if len(self.tok) != words:
            raise UserError(f"{vocab}: {len(self.tok)} tokens, but {path} embeds {words}: put bert-base-uncased's "
                            f"vocab.txt ({BERT_VOCAB_URL}) beside it")
        self.device = torch.device(device)
        model.to(self.device)
        self.max_len = cfg.max_position_embeddings

    def ids(self, text):
        text = re.sub(r"\s+", " ", str(text).strip().replace("\n", " ")).strip()
        tok = self.tok.tokenize(text)
        ids = [self.tok.cls_token_id] + self.tok.convert_tokens_to_ids(tok) + [self.tok.sep_token_id]
        return ids[:self.max_len - 1] + [self.tok.sep_token_id] if len(ids) > self.max_len else ids

    @torch.no_grad()
    def classes(self, reports, batch_size=32):
        """(N, 14) class ids (0 blank, 1 positive, 2 negative, 3 uncertain) in CHEXBERT_CONDITIONS order."""
        out = []
        for i in range(0, len(reports), batch_size):
            seqs = [self.ids(r) for r in reports[i:i + batch_size]]
            T = max(len(s) for s in seqs)
            x = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=self.device)
            mask = torch.tensor([[1.0] * len(s) + [0.0] * (T - len(s)) for s in seqs], device=self.device)
            cls = self.bert(x, attention_mask=mask).last_hidden_state[:, 0].float()
            out.append(torch.stack([h(cls).argmax(-1) for h in self.heads], 1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 14), dtype=int)

    def __call__(self, reports):
        """labeler.py's label dicts ({observation: 1 | 0 | -1 | None}) of CheXbert's classes."""
        return [{c: CHEXBERT_CLASS[int(k)] for c, k in zip(CHEXBERT_CONDITIONS, row)} for row in self.classes(reports)]


def radgraph_partial(hyp, ref):
    """RadGraph F1 of one report pair at the "partial" reward (RG_ER; radgraph's
    exact_entity_token_if_rel_exists_reward): an entity is (tokens, label, takes part in a relation as subject);
    F1 of the two sets; 0 when either report has no entity. Token matching is case-sensitive, as radgraph 0.1.18 on
    PyPI and LLaVA-Rad's copy compute it."""
    if not hyp["entities"] or not ref["entities"]:
        return 0.0
    h, r = ({(e["tokens"], e["label"], bool(e["relations"])) for e in a["entities"].values()} for a in (hyp, ref))
    p, rec = len(h & r) / len(h), len(h & r) / len(r)
    return 2 * p * rec / (p + rec) if p + rec else 0.0


def radgraph_annotator(path, where="--radgraph"):
    """annotate(list of reports) -> radgraph's annotation dicts, by the radgraph package (>= 0.1) running RadGraph's
    model (the "radgraph" model type: LLaVA-Rad's) from an extracted radgraph.tar.gz folder (config.json,
    vocabulary/, weights.th), with Hugging Face downloads switched off (its BERT tokenizer and config must be in
    the local Hugging Face cache)."""
    fetch = f"fetch {RADGRAPH_URL} and extract it into that folder (config.json, vocabulary/, weights.th)"
    if not os.path.isdir(path):
        raise UserError(f"{where} {path}: no such folder: {fetch}")
    missing = [n for n in ("config.json", "vocabulary", "weights.th") if not os.path.exists(os.path.join(path, n))]
    if missing:
        raise UserError(f"{where} {path}: no {', '.join(missing)} there: {fetch}")
    if importlib.util.find_spec("radgraph") is None:
        raise UserError(f"{where}: RadGraph F1 needs the radgraph package (pip install radgraph==0.1.18)")
    path = os.path.abspath(path)
    with radgraph_offline(), tempfile.TemporaryDirectory(prefix="radgraph_") as tmp:
        cache = os.path.dirname(path)
        if os.path.basename(path) != "radgraph":  # radgraph reads MODEL_CACHE_DIR/<model type>/; read at load only
            cache = tmp
            os.symlink(path, os.path.join(tmp, "radgraph"))
        try:
            from radgraph import RadGraph
            with contextlib.redirect_stdout(io.StringIO()):
                model = RadGraph(model_type="radgraph", model_cache_dir=cache, cuda=-1)
        except Exception as e:  # a damaged archive, or the BERT tokenizer not in the local cache
            raise UserError(f"{where} {path}: radgraph could not load it offline ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:150] if str(e) else ''}): {fetch}; its BERT tokenizer "
                            f"must be in the Hugging Face cache") from None

    def annotate(reports):
        with radgraph_offline():
            out = model(list(reports)) if reports else {}
        return [out[str(i)] for i in range(len(reports))]
    return annotate


@contextlib.contextmanager
def radgraph_offline():
    """Hugging Face downloads off; and the two tokenizer methods radgraph 0.1.18's vendored AllenNLP calls, which
    transformers 5 removed, put back for the while (as RadEval's vendored copy of radgraph rewrites them):
    encode_plus is the tokenizer's __call__, build_inputs_with_special_tokens BERT's [CLS] a [SEP] (b [SEP])."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase as T

    def with_specials(self, a, b=None):
        return [self.cls_token_id] + a + [self.sep_token_id] + (b + [self.sep_token_id] if b else [])
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}))
        for name, method in (("encode_plus", lambda self, *a, **k: self(*a, **k)),
                             ("build_inputs_with_special_tokens", with_specials)):
            if name not in dir(T):
                stack.enter_context(mock.patch.object(T, name, method, create=True))
        yield


def radgraph_rewards(annotate, hyps, refs):
    """Per-report partial-reward F1 (radgraph's F1RadGraph: an empty hypothesis or reference scores 0, unrun)."""
    keep = [i for i in range(len(hyps)) if hyps[i] and refs[i]]
    ann = annotate([hyps[i] for i in keep] + [refs[i] for i in keep])
    f1 = np.zeros(len(hyps))
    for j, i in enumerate(keep):
        f1[i] = radgraph_partial(ann[j], ann[len(keep) + j])
    return f1

# ----------------------------------------------------------------------------------------------------------------
# metrics: ROUGE-L, BLEU-4, RadGraph F1, CheXpert-14 F1 (CheXbert's labels, else labeler.py's), with bootstrap CIs

def rule_labels(reports):
    return [label_report(r) for r in reports]


class Scorer:
    """Per-report sufficient statistics computed once, so each bootstrap resample only sums them: BLEU's n-gram
    counts (sacrebleu), ROUGE-L F per report, CheXpert-14 labels per report (`labeler`: CheXbert, else the rules),
    RadGraph partial-reward F1 per report (`annotate`: radgraph's annotations, else no RadGraph column)."""

    def __init__(self, hyps, refs, labeler=None, annotate=None):
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import BLEU
        self.bleu = BLEU()
        # sacrebleu's per-sentence statistics (an internal API of sacrebleu >= 2), summed per resample
        self.bleu_stats = np.array([self.bleu._extract_corpus_statistics([h], [[r]])[0] for h, r in zip(hyps, refs)])
        rs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.rouge = np.array([rs.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)])
        labeler = labeler or rule_labels
        labels = labeler(list(hyps) + list(refs))
        self.gen_labels, self.ref_labels = labels[:len(hyps)], labels[len(hyps):]
        self.labeler = "CheXbert" if isinstance(labeler, CheXbert) else "labeler.py rules"
        self.rg = None if annotate is None else radgraph_rewards(annotate, list(hyps), list(refs))

    def metrics(self):
        """(name, method) of every metric this scorer has, in the paper's Table 5 order."""
        return [(n, f) for n, f in METRICS if f != "radgraph" or self.rg is not None]

    def bleu4(self, idx):
        return self.bleu._compute_score_from_stats(self.bleu_stats[idx].sum(0).tolist()).score

    def rouge_l(self, idx):
        return 100 * float(self.rouge[idx].mean())

    def radgraph(self, idx):
        return 100 * float(self.rg[idx].mean())

    def _f1(self, idx, uncertain_as=0, observations=OBSERVATIONS, key="macro_f1"):
        return 100 * chexpert_f1(self.gen_labels, self.ref_labels, uncertain_as, idx, observations)[key]

    macro14 = partialmethod(_f1)
    micro14 = partialmethod(_f1, key="micro_f1")
    macro5 = partialmethod(_f1, observations=FIVE)
    micro5 = partialmethod(_f1, observations=FIVE, key="micro_f1")
    macro14_upos = partialmethod(_f1, uncertain_as=1)


# name in the table, Scorer method: the paper's Table 5 columns first (ROUGE-L, BLEU-4, R_GER = RadGraph F1,
# Macro-F1-14), then the other CheXpert F1s LLaVA-Rad reports; uncertain counts as negative (LLaVA-Rad's "rrg"),
# Macro-F1-14+ counts it as positive (f1chexbert's / RadEval's convention, LLaVA-Rad's "rrg+")
METRICS = (("ROUGE-L", "rouge_l"), ("BLEU-4", "bleu4"), ("RadGraph F1", "radgraph"), ("Macro-F1-14", "macro14"),
           ("Micro-F1-14", "micro14"), ("Macro-F1-5", "macro5"), ("Micro-F1-5", "micro5"),
           ("Macro-F1-14+", "macro14_upos"))
F1S = ("Macro-F1-14", "Micro-F1-14", "Macro-F1-5", "Micro-F1-5", "Macro-F1-14+")


def model_labelers(chexbert=None, radgraph=None, device="cpu"):
    """(CheXbert labeler or None, RadGraph annotate or None, notes) from --chexbert / --radgraph or their
    environment variables: a path given but wrong is one line; none given leaves the fallback (rules; no RadGraph)."""
    cpath, where = weights_path("chexbert", chexbert, CHEXBERT_ENV)
    cx = CheXbert(cpath, where, device) if cpath else None
    rpath, where = weights_path("radgraph", radgraph, RADGRAPH_ENV)
    rg = radgraph_annotator(rpath, where) if rpath else None
    return cx, rg, labeler_notes(cpath, rpath)


def labeler_notes(chexbert_path=None, radgraph_path=None):
    return {"labeler": f"CheXbert ({chexbert_path})" if chexbert_path else
            f"labeler.py rules (fallback: no CheXbert weights; --chexbert PATH or {CHEXBERT_ENV})",
            "radgraph": f"radgraph package, partial reward, model {radgraph_path}" if radgraph_path else
            f"not computed: no RadGraph weights (--radgraph DIR or {RADGRAPH_ENV})"}


def score(hyps, refs, n_boot, seed=0, labelers=None):
    """Every metric on the whole test set ("value") and as median + 95% CI of n_boot resamples of its reports.
    labelers: model_labelers(...)'s (CheXbert, RadGraph annotate, notes); without, the CheXpert F1s come from
    labeler.py's rules and there is no RadGraph F1 (value None and why). Each F1 says its labeler in "labeler"."""
    chexbert, annotate, notes = labelers or (None, None, labeler_notes())
    s, n = Scorer(hyps, refs, chexbert, annotate), len(refs)
    out = {}
    for name, fn in s.metrics():
        f = getattr(s, fn)
        out[name] = {"value": f(np.arange(n)), **bootstrap_ci(f, n, n_boot=n_boot, seed=seed)}
    for name in F1S:
        out[name]["labeler"] = notes["labeler"]
    for name, u in (("Macro-F1-14", 0), ("Macro-F1-14+", 1)):
        full = chexpert_f1(s.gen_labels, s.ref_labels, u)
        out[name].update(macro_f1_present=100 * full["macro_f1_present"], uncertain_as=u,
                         per_class={k: 100 * v for k, v in full["per_class"].items()})
    out.setdefault("RadGraph F1", {"value": None})["note"] = notes["radgraph"]
    return out, s


def print_table(name, metrics, n_boot):
    """The paper's Table 5 layout: median [95% CI] per metric, and which labeler made the F1s."""
    cols = [m for m, _ in METRICS]
    cells = [("n/a*" if metrics[c]["value"] is None else
              f"{metrics[c]['median']:.2f} [{metrics[c]['ci95'][0]:.2f}, {metrics[c]['ci95'][1]:.2f}]") for c in cols]
    w = max(28, len(name))
    print("\n" + f"{'encoder':{w}s}" + "".join(f"{c:>22s}" for c in cols))
    print(f"{name:{w}s}" + "".join(f"{c:>22s}" for c in cells))
    print(f"(0-100; median and 95% CI of {n_boot} bootstrap resamples of the test reports. RadGraph F1: partial "
          f"reward (R_GER); F1-14 / F1-5: CheXpert-14 / the five competition observations, uncertain as negative; "
          f"Macro-F1-14+: uncertain as positive)")
    print(f"CheXpert F1 labels: {metrics['Macro-F1-14']['labeler']}")
    if metrics["RadGraph F1"]["value"] is None:
        print(f"* RadGraph F1 {metrics['RadGraph F1']['note']}")


def write_labels(rows, text_col, out_dir):
    """report.py --label_only: CheXpert-14 labels of every row's text_col, written to out_dir/labels.csv after the
    row's own columns, and a count per observation."""
    labels = [label_report(r[text_col]) for r in tqdm(rows, desc="labelling")]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "labels.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + OBSERVATIONS)
        w.writeheader()
        w.writerows({**r, **{o: "" if v is None else v for o, v in lab.items()}} for r, lab in zip(rows, labels))
    print(f"{'observation':28s} {'pos':>5s} {'neg':>5s} {'unc':>5s}")
    for o in OBSERVATIONS:
        print(f"{o:28s}" + "".join(f" {sum(lab[o] == v for lab in labels):5d}" for v in (1, 0, -1)))
    print(f"wrote {path} ({len(rows)} reports)")
    return path
