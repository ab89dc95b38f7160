"""``length``: a deliberately biased reward model that prefers longer answers.

Score = log(1 + words in the response). It is right whenever the better answer happens to be
the longer one, which is often enough to look useful and is exactly the reward-hacking
shortcut an RLHF policy learns to exploit; experiments show the router learning to avoid it.

>>> from services.settings import load_settings
>>> rm = LengthBackend(load_settings(None, name="len", backend="length"))
>>> a, b = rm.score_batch([ScoreInput([], "yes"), ScoreInput([], "yes it is, certainly")])
>>> a.score < b.score
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.backends.base import Backend, Scored, ScoreInput


class LengthBackend(Backend):
    kind = "length"

    @property
    def model_ref(self) -> str:
        return "rule:log1p-words"

    def score_batch(self, items: Sequence[ScoreInput]) -> list[Scored]:
        return [Scored(math.log1p(len(item.response.split()))) for item in items]
