"""Errors a user can cause, named once for the whole project.

    RewardRouterError
    ├── ConfigError        a bad setting or policy parameter (names the field and allowed range)
    └── DataFormatError    a malformed pairs / behaviour file (names the file, line and field)

HTTP layers map these to 4xx responses in one place; the CLI prints them without a traceback.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class RewardRouterError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(RewardRouterError, ValueError):
    """A configuration value is out of range or of the wrong type.

    >>> raise ConfigError("lambda0", "must be > 0, got -1")
    Traceback (most recent call last):
    ...
    reward_router.errors.ConfigError: lambda0: must be > 0, got -1
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")

    @classmethod
    def from_validation(cls, exc: ValidationError, default: str = "config") -> ConfigError:
        """The first error of a pydantic validation, naming its field (``rms.0.url``).

        A model-level check has no location: it names its field at the start of its message
        (``"policy.name: ..."``); ``default`` names an error that does neither.
        """
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", ""))
        if not loc:
            found = re.match(r"(?:Value error, )?([A-Za-z_][\w.]*): (.*)", msg, re.S)
            if found:
                return cls(found.group(1), found.group(2))
        return cls(loc or default, msg)


class DataFormatError(RewardRouterError, ValueError):
    """A data file does not follow the documented format (data/README.md)."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        where = path if line is None else f"{path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")
