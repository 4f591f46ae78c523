"""Quality of a masked generation against the dense label."""
from __future__ import annotations

import sacrebleu


def bleu(hypothesis: str, reference: str) -> float:
    """Sentence-level sacreBLEU (0-100, sacreBLEU's default smoothing)."""
    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)


def token_agreement(output_ids: list[int], label_ids: list[int]) -> float:
    """Share of the label's positions where the masked output has the same token (a shorter output
    counts its missing positions as disagreeing)."""
    if not label_ids:
        return 1.0
    same = sum(1 for a, b in zip(output_ids, label_ids) if a == b)
    return same / len(label_ids)
