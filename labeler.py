"""
A rule-based CheXpert-14 report labeler, written for this project after the design of the CheXpert labeler (Irvin
et al., AAAI 2019: mention phrases per observation, then negation and uncertainty rules, then aggregation), with
compact regular-expression rules instead of its dependency-parse patterns; and report.py's metrics as LLaVA-Rad's
evaluation computes them: BLEU-4 (sacrebleu), ROUGE-L (rouge-score, no stemmer) and CheXpert F1, with bootstrap
CIs; CheXbert F1 and RadGraph F1 only from f1chexbert / radgraph weights already on the machine (never downloaded
at run time, never approximated).

    from labeler import label_report, chexpert_f1, score, OBSERVATIONS
    label_report("Heart size normal. Small left effusion. No pneumothorax. Possible pneumonia.")
    # {'No Finding': None, 'Cardiomegaly': 0, 'Pleural Effusion': 1, 'Pneumothorax': 0, 'Pneumonia': -1, ...}
    chexpert_f1([label_report(g) for g in generated], [label_report(r) for r in references])["macro_f1"]
    metrics, scorer = score(generated, references, n_boot=500)   # BLEU-4, ROUGE-L, Macro-F1-14, ...: value, median, CI

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
import csv
import importlib.util
import os
import re
from unittest import mock

import numpy as np
from tqdm import tqdm

from base import bootstrap_ci

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
    g = np.array([binarise(gen_labels[i], uncertain_as, observations) for i in idx], dtype=bool).reshape(-1, K)
    r = np.array([binarise(ref_labels[i], uncertain_as, observations) for i in idx], dtype=bool).reshape(-1, K)
    tp, fp, fn = ((g & r).sum(0).tolist(), (g & ~r).sum(0).tolist(), (~g & r).sum(0).tolist())
    f1 = [2 * tp[k] / (2 * tp[k] + fp[k] + fn[k]) if tp[k] + fp[k] + fn[k] else 0.0 for k in range(K)]
    pres = [f for f, p in zip(f1, r.any(0)) if p]
    T, P, N = sum(tp), sum(fp), sum(fn)
    return {"macro_f1": sum(f1) / K, "macro_f1_present": sum(pres) / len(pres) if pres else float("nan"),
            "micro_f1": 2 * T / (2 * T + P + N) if T + P + N else 0.0,
            "per_class": dict(zip(observations, f1)), "uncertain_as": uncertain_as}


def _offline_model_metric(name, fn):
    """fn() of a metric that needs a downloaded model (f1chexbert, radgraph), with Hugging Face Hub downloads
    switched off: (value, None), or (None, why not)."""
    if importlib.util.find_spec(name) is None:
        return None, f"not available: the `{name}` package is not installed (pip install {name}, plus its weights)"
    try:
        with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}):
            return fn(), None
    except Exception as e:  # missing weights or any failure of the external model: say so, never guess a number
        return None, f"not available: `{name}` could not run from local files ({type(e).__name__}: {str(e)[:120]})"


def chexbert_f1(hyps, refs):
    """CheXbert-labelled CheXpert-14 F1 (f1chexbert's F1CheXbert: accuracy, ..., class report) from local weights."""
    def run():
        from f1chexbert import F1CheXbert
        _, _, report14, report5 = F1CheXbert()(hyps=hyps, refs=refs)
        return {"macro_f1_14": 100 * report14["macro avg"]["f1-score"],
                "micro_f1_5": 100 * report5["micro avg"]["f1-score"]}
    return _offline_model_metric("f1chexbert", run)


def radgraph_f1(hyps, refs):
    """RadGraph F1 (partial reward, as LLaVA-Rad reports it) from the radgraph package's local weights."""
    def run():
        from radgraph import F1RadGraph
        return 100 * float(F1RadGraph(reward_level="partial")(hyps=hyps, refs=refs)[0])
    return _offline_model_metric("radgraph", run)


# ----------------------------------------------------------------------------------------------------------------
# metrics: BLEU-4, ROUGE-L, CheXpert-14 F1, with bootstrap CIs

class Scorer:
    """Per-report sufficient statistics computed once, so each bootstrap resample only sums them: BLEU's n-gram
    counts (sacrebleu), ROUGE-L F per report, CheXpert labels per report."""

    def __init__(self, hyps, refs):
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import BLEU
        self.bleu = BLEU()
        # sacrebleu's per-sentence statistics (an internal API of sacrebleu >= 2), summed per resample
        self.bleu_stats = np.array([self.bleu._extract_corpus_statistics([h], [[r]])[0] for h, r in zip(hyps, refs)])
        rs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.rouge = np.array([rs.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)])
        self.gen_labels = [label_report(h) for h in hyps]
        self.ref_labels = [label_report(r) for r in refs]

    def bleu4(self, idx):
        return self.bleu._compute_score_from_stats(self.bleu_stats[idx].sum(0).tolist()).score

    def rouge_l(self, idx):
        return 100 * float(self.rouge[idx].mean())

    def macro14(self, idx):
        return 100 * chexpert_f1(self.gen_labels, self.ref_labels, 0, idx)["macro_f1"]

    def macro14_upos(self, idx):
        return 100 * chexpert_f1(self.gen_labels, self.ref_labels, 1, idx)["macro_f1"]

    def micro5(self, idx):
        return 100 * chexpert_f1(self.gen_labels, self.ref_labels, 0, idx, FIVE)["micro_f1"]


# name in the table, Scorer method; Macro-F1-14 (uncertain as negative) is the headline
METRICS = (("BLEU-4", "bleu4"), ("ROUGE-L", "rouge_l"), ("Macro-F1-14", "macro14"), ("Macro-F1-14+", "macro14_upos"),
           ("Micro-F1-5", "micro5"))


def score(hyps, refs, n_boot, seed=0):
    """Every metric on the whole test set ("value") and as median + 95% CI of n_boot resamples of its reports,
    plus CheXbert / RadGraph F1 when their packages and weights are on this machine (else value None + why)."""
    s, n = Scorer(hyps, refs), len(refs)
    out = {}
    for name, fn in METRICS:
        f = getattr(s, fn)
        out[name] = {"value": f(np.arange(n)), **bootstrap_ci(f, n, n_boot=n_boot, seed=seed)}
    for name, u in (("Macro-F1-14", 0), ("Macro-F1-14+", 1)):
        full = chexpert_f1(s.gen_labels, s.ref_labels, u)
        out[name].update(macro_f1_present=100 * full["macro_f1_present"], uncertain_as=u,
                         per_class={k: 100 * v for k, v in full["per_class"].items()}, labeler="labeler.py (rules)")
    val, why = chexbert_f1(hyps, refs)
    out["CheXbert F1"] = {"value": val, "note": why or "f1chexbert, local weights"}
    val, why = radgraph_f1(hyps, refs)
    out["RadGraph F1"] = {"value": val, "note": why or "radgraph partial reward, local weights"}
    return out, s


def print_table(name, metrics, n_boot):
    """The paper's Table 5 layout: median [95% CI] per metric, then the model-based metrics."""
    cols = [m for m, _ in METRICS] + ["CheXbert F1", "RadGraph F1"]
    cells = [f"{metrics[c]['median']:.2f} [{metrics[c]['ci95'][0]:.2f}, {metrics[c]['ci95'][1]:.2f}]"
             for c, _ in METRICS]
    for c in cols[-2:]:
        v = metrics[c]["value"]
        cells.append("n/a*" if v is None else f"{v['macro_f1_14'] if isinstance(v, dict) else v:.2f}")
    w = max(28, len(name))
    print("\n" + f"{'encoder':{w}s}" + "".join(f"{c:>22s}" for c in cols))
    print(f"{name:{w}s}" + "".join(f"{c:>22s}" for c in cells))
    print(f"(0-100; median and 95% CI of {n_boot} bootstrap resamples of the test reports. Macro-F1-14: CheXpert-14 "
          f"labels of labeler.py, uncertain as negative (the headline); Macro-F1-14+: uncertain as positive; "
          f"Micro-F1-5: the five competition observations)")
    for c in cols[-2:]:
        if metrics[c]["value"] is None:
            print(f"* {c} {metrics[c]['note']}")


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
