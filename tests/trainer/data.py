"""Small prompt files for the trainer's tests (shared by tests/trainer and tests/reliability)."""

from __future__ import annotations

import json
from pathlib import Path


def write_prompts(path: Path) -> Path:
    """Chat and math prompts (math with reference answers, for the verifier RM)."""
    rows = [
        {"prompt": "Which answer is better, A or B?", "domain": "chat"},
        {"question": "What is 2 + 40?", "answer": "2 + 40 = 42\n#### 42"},
        {"prompt": [{"role": "user", "content": "the answer is"}], "reference": "42"},
        {"prompt": "A B A B", "domain": "chat"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
