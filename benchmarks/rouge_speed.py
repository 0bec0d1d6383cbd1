"""Speed of ``helpers.instruct.rouge_l`` (bit-parallel LCS) against rouge-score and the textbook table.

Usage: python benchmarks/rouge_speed.py   (needs rouge-score, a test dependency)
Prints a markdown table: seconds for one ROUGE-L F1 of two random texts of each length, by each
implementation; all three give the same score (checked first).
"""

from __future__ import annotations

import random
import re

from _common import interleaved, print_report
from rouge_score import rouge_scorer

from helpers.instruct import rouge_l

LENGTHS = (100, 1_000, 3_000)
VOCABULARY = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "was"] + [f"word{i}" for i in range(30)]


def textbook_rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 by the longest-common-subsequence table, one row at a time (rouge_l before it went bit-parallel)."""
    cand, ref = (re.findall(r"\w+", text.lower()) for text in (candidate, reference))
    previous = [0] * (len(ref) + 1)
    for word in cand:
        current = [0]
        for j, other in enumerate(ref):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def measure(candidate: str, reference: str, scorer: rouge_scorer.RougeScorer) -> dict[str, float]:
    """Median seconds of each implementation on one pair, after checking that they agree."""
    ours, theirs = rouge_l(candidate, reference), scorer.score(reference, candidate)["rougeL"].fmeasure
    assert ours == textbook_rouge_l(candidate, reference) and abs(ours - theirs) < 1e-12, "the scores disagree"
    return interleaved({"ours": lambda: rouge_l(candidate, reference),
                        "textbook": lambda: textbook_rouge_l(candidate, reference),
                        "rouge-score": lambda: scorer.score(reference, candidate)}, rounds=3)


def main() -> None:
    rng = random.Random(0)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rows = []
    for n_words in LENGTHS:
        seconds = measure(*(" ".join(rng.choices(VOCABULARY, k=n_words)) for _ in range(2)), scorer)
        rows.append([f"{n_words:,}", f"{seconds['ours']:.4f}", f"{seconds['textbook']:.3f}",
                     f"{seconds['rouge-score']:.3f}", f"{seconds['textbook'] / seconds['ours']:.0f}x",
                     f"{seconds['rouge-score'] / seconds['ours']:.0f}x"])
    print_report("two random texts of n words each, drawn from 40 words (the three scores are identical)",
                 ["words", "rouge_l s", "textbook table s", "rouge-score s", "textbook / ours", "rouge-score / ours"],
                 rows)


if __name__ == "__main__":
    main()
