"""Config problems, each pinned to a file, a line and a dotted key path."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["DOCUMENT", "ConfigError", "ConfigIssue", "IssueLog", "join"]

# The key path of problems that concern the file as a whole (syntax, empty file, top level).
DOCUMENT = "(document)"


def join(path: str, key: str) -> str:
    """The dotted key path of `key` inside `path`: `server` + `listen` is `server.listen`."""
    return f"{path}.{key}" if path else key


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int
    key_path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key_path}: {self.message}"


class ConfigError(Exception):
    """The config was rejected; `issues` holds every problem found, in file order."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[ConfigIssue, ...]]]:
        # Exception pickles its message string by default; rebuild from the issues instead.
        return (ConfigError, (self.issues,))


class IssueLog:
    """Collects the issues of one load, so all of them are reported together.

    `at` names the node an issue is about: the same node can be validated more than once
    (a `defaults:` value is checked on its own and again inside every route it is merged
    into), and the user should hear about it once, at the first, most specific, key path.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._issues: list[ConfigIssue] = []
        self._seen: set[tuple[int, str]] = set()

    def add(self, line: int, key_path: str, message: str, at: object = None) -> None:
        if at is not None:
            seen = (id(at), message)
            if seen in self._seen:
                return
            self._seen.add(seen)
        self._issues.append(ConfigIssue(self.source, line, key_path or DOCUMENT, message))

    def __bool__(self) -> bool:
        return bool(self._issues)

    def raise_if_any(self) -> None:
        if self._issues:
            raise ConfigError(sorted(self._issues, key=lambda issue: issue.line))
