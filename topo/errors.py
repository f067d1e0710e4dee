"""The project's own error types.

Every failure a user can cause carries enough context (file, line, field path) for the CLI to print one
line that says what is wrong and where, instead of a traceback.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Characters that would end or break a line of output (str.splitlines() splits at all of these): a value
# quoted in a message is shown with them escaped, so every issue stays one line.
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with control and line-separator characters written as escapes (\\n, \\x00, \\u2028)."""
    return _LINE_BREAKING.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class LabError(Exception):
    """Base of every error the CLI reports as a one-line message (exit code 1 unless overridden)."""

    exit_code = 1


@dataclass
class SpecIssue:
    """One problem in a spec: where it is and what to do about it."""

    path: str  # field path, e.g. "spec.nodes[1].podCIDR"
    message: str
    line: int | None = None

    def format(self, file: str | None) -> str:
        # a path with a space inside stays as it is ("my labs/lab.yaml"); one that starts or ends with a space,
        # or holds a control character, is quoted
        where = (file if file.isprintable() and file == file.strip() else repr(file)) if file else "<spec>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        prefix = f"{self.path}: " if self.path else ""
        return one_line(f"{where}: {prefix}{self.message}")


@dataclass
class SpecError(LabError):
    """A spec (or an object applied to a running lab) is invalid. Nothing was created."""

    file: str | None
    issues: list[SpecIssue] = field(default_factory=list)
    exit_code = 2

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def lines(self) -> list[str]:
        return [issue.format(self.file) for issue in self.issues]

    def __str__(self) -> str:
        return "\n".join(self.lines())


class StateError(LabError):
    """The lab named on the command line is not running, or several are and none was named."""

    exit_code = 2


class CommandNotRun(LabError):
    """`lab exec`'s command could not be started. Its exit code is a POSIX shell's for the same case (127: not
    found, 126: found but not executable), so a script tells it from the command's own exit codes."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ApplyError(LabError):
    """A kernel operation failed while building or changing a lab."""


class IpamExhausted(ApplyError):
    """A node's PodCIDR has no free address left (host-local semantics: its first address is the gateway)."""


class FeatureMissing(LabError):
    """The running kernel (or machine) lacks something the lab needs; the message names it."""

    exit_code = 3
