"""Cell type annotation metric (local `evaluate` module, loads offline): accuracy and macro-F1 over cell-type labels."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score

_DESCRIPTION = "Accuracy and macro-averaged F1 of predicted cell-type labels against reference labels."
_INPUTS = """
predictions: list of predicted cell-type labels (str); references: list of true labels (str).
Returns {"accuracy": float, "macro_f1": float}; macro-F1 averages over the labels present in the references.
"""


class CellAnnotation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        labels = sorted(set(references))
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0)),
        }
