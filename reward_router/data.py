"""The project's data formats: preference pairs and reward-model behaviour files.

Both are JSON Lines, optionally gzip-compressed (``.gz``), as documented in ``data/README.md``.

>>> pairs = load_pairs("data/pairs/judgebench.jsonl.gz")          # doctest: +SKIP
>>> matrix = load_behavior("data/rm_outputs/judgebench.jsonl.gz", pairs)  # doctest: +SKIP
>>> matrix.correct.shape                                          # doctest: +SKIP
(350, 6)

Every loader error names the file, the line and the field (:class:`DataFormatError`).
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reward_router.errors import DataFormatError

Message = dict[str, str]
PromptLike = str | list[Message]

#: Allowed values of a behaviour line's ``correct``: preferred chosen, preferred rejected, tie.
CORRECT_VALUES = (0.0, 0.5, 1.0)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL or JSONL.gz file."""
    p = Path(path)
    if not p.exists():
        raise DataFormatError(str(p), None, None, "file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(str(p), lineno, None, f"invalid JSON: {exc.msg}") from exc
                if not isinstance(obj, dict):
                    raise DataFormatError(str(p), lineno, None, "each line must be a JSON object")
                yield lineno, obj
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataFormatError(str(p), None, None, f"cannot read: {exc}") from exc


def prompt_messages(prompt: PromptLike) -> list[Message]:
    """Normalise a prompt (a string or a list of ``{role, content}``) to a list of messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def prompt_text(prompt: PromptLike) -> str:
    """Render a prompt as plain text: a single user turn as is, several turns role-tagged.

    >>> prompt_text("What is 2+2?")
    'What is 2+2?'
    >>> prompt_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    'user: hi\\nassistant: yo'
    """
    msgs = prompt_messages(prompt)
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in msgs)


def first_user_turn(prompt: PromptLike) -> str:
    """The normalised first user turn: the key used to find overlaps between data sets."""
    for m in prompt_messages(prompt):
        if m["role"] == "user":
            return " ".join(m["content"].lower().split())
    return ""


#: Where a pair's reference answer may sit in its ``meta`` (first found wins).
REFERENCE_KEYS = ("reference", "ground_truth", "answer")


@dataclass(frozen=True)
class Pair:
    """One preference pair: ``chosen`` is the response the source labels better."""

    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    domain: str = "unknown"
    group: str = ""
    source: str = ""
    subset: str = ""
    use: str = "train-or-eval"
    meta: dict[str, Any] = field(default_factory=dict)
    license: str = ""

    @property
    def reference(self) -> str | None:
        """The pair's reference answer (``REFERENCE_KEYS`` in ``meta``), what a verifier
        needs to judge it; ``None`` when it has none."""
        for key in REFERENCE_KEYS:
            value = self.meta.get(key)
            if isinstance(value, str) and value.strip():
                return value
        return None


def _require_str(obj: dict[str, Any], key: str, path: str, lineno: int) -> str:
    if key not in obj:
        raise DataFormatError(path, lineno, key, "missing")
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(path, lineno, key, f"must be a string, got {type(value).__name__}")
    return value


def _parse_prompt(value: Any, path: str, lineno: int) -> list[Message]:
    if isinstance(value, str):
        return prompt_messages(value)
    if not isinstance(value, list) or not value:
        raise DataFormatError(path, lineno, "prompt", "must be a string or a non-empty list")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataFormatError(
                path, lineno, f"prompt[{i}]", "must be an object with string 'role' and 'content'"
            )
    return prompt_messages(value)


def load_pairs(path: str | Path) -> list[Pair]:
    """Load a pairs file; ids must be unique. Raises :class:`DataFormatError` on bad lines."""
    p = str(path)
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        pid = _require_str(obj, "id", p, lineno)
        if pid in seen:
            raise DataFormatError(
                p, lineno, "id", f"duplicate id {pid!r} (first on line {seen[pid]})"
            )
        seen[pid] = lineno
        if "prompt" not in obj:
            raise DataFormatError(p, lineno, "prompt", "missing")
        meta = obj.get("meta") or {}
        pairs.append(
            Pair(
                id=pid,
                prompt=_parse_prompt(obj["prompt"], p, lineno),
                chosen=_require_str(obj, "chosen", p, lineno),
                rejected=_require_str(obj, "rejected", p, lineno),
                domain=str(obj.get("domain") or "unknown"),
                group=str(obj.get("group") or pid),
                source=str(obj.get("source") or ""),
                subset=str(obj.get("subset") or ""),
                use=str(obj.get("use") or "train-or-eval"),
                license=str(obj.get("license") or ""),
                meta=meta if isinstance(meta, dict) else {"value": meta},
            )
        )
    if not pairs:
        raise DataFormatError(p, None, None, "no pairs in file")
    return pairs


@dataclass
class BehaviorMatrix:
    """What each reward model said on each pair, aligned row by row with ``pairs``.

    ``correct[i, n]`` is 1 when RM ``n`` preferred the chosen response of pair ``i``, 0 when it
    preferred the rejected one, 0.5 for a tie. ``margins[i, n]`` is ``score_chosen -
    score_rejected`` for scalar RMs and NaN for RMs that only give a decision.
    """

    pairs: list[Pair]
    rms: list[str]
    correct: np.ndarray
    margins: np.ndarray
    skipped_pairs: int = 0

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def n_rms(self) -> int:
        return len(self.rms)

    def signed_margins(self) -> np.ndarray:
        """Margins where an RM has scores, else the decision as +1 / -1 (0 for a tie)."""
        decision = 2.0 * self.correct - 1.0
        return np.where(np.isnan(self.margins), decision, self.margins)

    def subset(self, rows: Sequence[int] | np.ndarray) -> BehaviorMatrix:
        idx = np.asarray(rows, dtype=np.int64)
        return BehaviorMatrix(
            pairs=[self.pairs[i] for i in idx],
            rms=list(self.rms),
            correct=self.correct[idx],
            margins=self.margins[idx],
        )


def _parse_float(obj: dict[str, Any], key: str, path: str, lineno: int) -> float:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise DataFormatError(path, lineno, key, f"must be a number, got {type(value).__name__}")
    try:
        out = float(value)
    except ValueError as exc:
        raise DataFormatError(path, lineno, key, f"must be a number, got {value!r}") from exc
    if not math.isfinite(out):
        raise DataFormatError(path, lineno, key, f"must be finite, got {value!r}")
    return out


def load_behavior(path: str | Path, pairs: Sequence[Pair]) -> BehaviorMatrix:
    """Load a behaviour file and align it with ``pairs``.

    Pairs without behaviour lines are skipped (counted in ``skipped_pairs``); a ``pair_id`` not
    in ``pairs``, a duplicate (pair, rm) line, or a pair missing a line for some RM is an error.
    """
    p = str(path)
    by_id = {pair.id: pair for pair in pairs}
    cells: dict[tuple[str, str], tuple[float, float]] = {}
    rms: list[str] = []
    rm_seen: set[str] = set()
    first_line: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        pid = _require_str(obj, "pair_id", p, lineno)
        rm = _require_str(obj, "rm", p, lineno)
        if pid not in by_id:
            raise DataFormatError(p, lineno, "pair_id", f"{pid!r} is not in the pairs file")
        if "correct" not in obj:
            raise DataFormatError(p, lineno, "correct", "missing")
        correct = _parse_float(obj, "correct", p, lineno)
        if correct not in CORRECT_VALUES:
            raise DataFormatError(p, lineno, "correct", f"must be 0, 0.5 or 1, got {correct}")
        margin = math.nan
        has_c, has_r = "score_chosen" in obj, "score_rejected" in obj
        if has_c != has_r:
            missing = "score_rejected" if has_c else "score_chosen"
            raise DataFormatError(p, lineno, missing, "scores must come as a pair")
        if has_c:
            margin = _parse_float(obj, "score_chosen", p, lineno) - _parse_float(
                obj, "score_rejected", p, lineno
            )
        if (pid, rm) in cells:
            raise DataFormatError(p, lineno, "rm", f"duplicate line for pair {pid!r} and rm {rm!r}")
        cells[(pid, rm)] = (correct, margin)
        first_line.setdefault(pid, lineno)
        if rm not in rm_seen:
            rm_seen.add(rm)
            rms.append(rm)
    if not cells:
        raise DataFormatError(p, None, None, "no behaviour lines in file")
    covered = [pair for pair in pairs if pair.id in first_line]
    correct_m = np.empty((len(covered), len(rms)))
    margin_m = np.empty((len(covered), len(rms)))
    for i, pair in enumerate(covered):
        for n, rm in enumerate(rms):
            cell = cells.get((pair.id, rm))
            if cell is None:
                raise DataFormatError(
                    p, first_line[pair.id], "rm", f"pair {pair.id!r} has no line for rm {rm!r}"
                )
            correct_m[i, n], margin_m[i, n] = cell
    return BehaviorMatrix(
        pairs=covered,
        rms=rms,
        correct=correct_m,
        margins=margin_m,
        skipped_pairs=len(pairs) - len(covered),
    )
