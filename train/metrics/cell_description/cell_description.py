"""Cell description metric (local `evaluate` module, loads offline): BLEU-2, BLEU-4, ROUGE-1/2/L and METEOR, the
paper's "textual discrepancy" scores, on a 0-1 scale.

METEOR uses exact and Porter-stem matches; WordNet synonym matching needs NLTK's WordNet corpus, which is not
available offline, so it is left out (scores can only be lower than with synonyms).
"""

import datasets
import evaluate
from nltk.stem.porter import PorterStemmer
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

_DESCRIPTION = "Corpus BLEU-2/4 (sacrebleu), mean ROUGE-1/2/L F1 (rouge_score) and mean METEOR (nltk) of texts."
_INPUTS = """
predictions: list of generated texts; references: list of reference texts (one per prediction).
Returns {"bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"}, each in [0, 1].
"""


class _NoWordNet:
    """Stands in for NLTK's WordNet reader: no synonyms."""

    def synsets(self, *args, **kwargs):
        return []


class CellDescription(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = {}
        for order in (2, 4):
            bleu = BLEU(max_ngram_order=order, effective_order=True)
            scores[f"bleu{order}"] = bleu.corpus_score(predictions, [references]).score / 100
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        rouge = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
        for key in ("rouge1", "rouge2", "rougeL"):
            scores[key] = sum(r[key].fmeasure for r in rouge) / max(len(rouge), 1)
        stemmer, wordnet = PorterStemmer(), _NoWordNet()
        meteor = [meteor_score([ref.lower().split()], pred.lower().split(), stemmer=stemmer, wordnet=wordnet)
                  for pred, ref in zip(predictions, references)]
        scores["meteor"] = sum(meteor) / max(len(meteor), 1)
        return {k: float(v) for k, v in scores.items()}
