"""What every scoring backend implements, and the plain values that cross the batcher.

A backend is built once at service start-up (``load`` runs in a worker thread, never on the
event loop) and then answers whole micro-batches: ``score_batch`` for pointwise scores and,
for pairwise judges, ``compare_batch``. Pointwise backends get ``/v1/compare`` for free: the
service scores both sides in the same forward pass as every other request of the batch.

Backends never raise for one bad item: an input that does not fit under the ``error``
truncation policy comes back as a result with ``too_long=True`` so that the other requests
sharing the forward pass still get their answers; the service turns it into a 4xx naming
the item.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from reward_router.data import Message

if TYPE_CHECKING:
    from services.settings import ServiceSettings


@dataclass(frozen=True)
class ScoreInput:
    """One response to score, with its (normalised) prompt and optional reference answer."""

    prompt: list[Message]
    response: str
    reference: str | None = None


@dataclass(frozen=True)
class PairInput:
    """Two responses to the same prompt, for a pairwise judge."""

    prompt: list[Message]
    response_a: str
    response_b: str
    reference: str | None = None


@dataclass(frozen=True)
class Scored:
    """A pointwise score. ``truncated``: the input was cut to fit; ``abstained``: the RM had
    nothing to go on (e.g. the verifier without a reference) and returned its neutral score;
    ``too_long``: the input does not fit and the policy forbids cutting (score is NaN)."""

    score: float
    truncated: bool = False
    abstained: bool = False
    too_long: bool = False


@dataclass(frozen=True)
class Compared:
    """A pairwise judgement: a score for each side (higher is better)."""

    score_a: float
    score_b: float
    truncated: bool = False
    abstained: bool = False
    too_long: bool = False


class Backend(ABC):
    """Base of the scoring backends (one file each under ``services/backends``).

    >>> backend = make_backend(settings)   # doctest: +SKIP
    >>> backend.load()                      # heavy: weights, tokenizer
    >>> backend.score_batch([ScoreInput([{"role": "user", "content": "2+2?"}], "4")])
    [Scored(score=..., truncated=False, abstained=False, too_long=False)]
    """

    #: The ``backend`` value of the settings that selects this class.
    kind: ClassVar[str]
    #: True for judges that compare two responses natively (``compare_batch`` overridden).
    pairwise: ClassVar[bool] = False

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings

    @property
    def model_ref(self) -> str:
        """What model this backend runs (a path, a hub id or a rule name), for ``/v1/info``."""
        return self.settings.model or self.kind

    def load(self) -> None:  # noqa: B027 - rule-based backends have nothing to load
        """Load weights and tokenizers. Called once, off the event loop."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release what ``load`` acquired (clients, memory)."""

    @abstractmethod
    def score_batch(self, items: Sequence[ScoreInput]) -> list[Scored]:
        """Score every item, in order, in as few forward passes as the backend can."""

    def compare_batch(self, pairs: Sequence[PairInput]) -> list[Compared]:
        """Pairwise judgement; only pairwise backends are asked (see ``pairwise``)."""
        raise NotImplementedError(f"backend {self.kind!r} is pointwise")
