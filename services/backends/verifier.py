"""``verifier``: rule-based math reward: is the response's final answer the reference's?

Final answers are found and compared by :mod:`reward_router.answers` (``#### ``, the last
``\\boxed{...}``, or the last number; numbers by value).

Scores: 1.0 correct, 0.0 wrong (including a response with no final answer at all). Without a
reference the verifier abstains: it returns ``abstain_score`` (0.5 by default, the neutral
midpoint) and lists the item in ``abstained``; it never guesses. A pair where either side
abstains is a tie.
"""

from __future__ import annotations

from collections.abc import Sequence

from reward_router.answers import answers_match, final_answer
from services.backends.base import Backend, Scored, ScoreInput


class VerifierBackend(Backend):
    kind = "verifier"

    @property
    def model_ref(self) -> str:
        return "rule:final-answer-match"

    def score_batch(self, items: Sequence[ScoreInput]) -> list[Scored]:
        out: list[Scored] = []
        for item in items:
            ref = final_answer(item.reference) if item.reference else None
            if ref is None:
                out.append(Scored(self.settings.abstain_score, abstained=True))
                continue
            got = final_answer(item.response)
            out.append(Scored(1.0 if got is not None and answers_match(got, ref) else 0.0))
        return out
