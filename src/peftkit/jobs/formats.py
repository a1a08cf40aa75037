"""Training files of fine-tuning jobs: OpenAI's JSONL formats, checked line by line.

Three formats, one per file:

- ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``
  ending with the assistant's message (the loss covers that one);
- ``prompt_completion``: ``{"prompt": "...", "completion": "..."}`` (the loss covers the completion);
- ``preference``: ``{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
  "content": "..."}], "non_preferred_output": [...]}`` (for ``method.type = "dpo"``).

:func:`check_file` reads every line and reports each bad one with its number and reason, so a
job fails at ``validating_files`` with everything to fix at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FORMATS", "FileCheck", "check_file"]

FORMATS = ("chat", "prompt_completion", "preference")
_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_REPORTED = 20  # problems named in a job's error; the count says how many more


@dataclass
class FileCheck:
    """What :func:`check_file` found: the format, the good records, and the problems as
    ``(line number, reason)``."""

    format: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.records)

    def message(self, name: str) -> str:
        """The problems as one message: ``name: line 3: ...; line 7: ...``."""
        if not self.problems and not self.records:
            return f"{name}: the file holds no examples (one JSON object per line expected)"
        shown = "; ".join(f"line {n}: {reason}" for n, reason in self.problems[:MAX_REPORTED])
        more = len(self.problems) - MAX_REPORTED
        return f"{name}: {len(self.problems)} invalid line(s): {shown}" + (f"; and {more} more" if more > 0 else "")


def _text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    return None


def _messages(value: Any, where: str, need_assistant_last: bool) -> tuple[list[dict[str, str]] | None, str | None]:
    if not isinstance(value, list) or not value:
        return None, f"{where} must be a non-empty list of messages"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return None, f"{where}[{i}] must be an object with role and content"
        role = m.get("role")
        if role not in _ROLES:
            return None, f"{where}[{i}].role must be one of {list(_ROLES)}, got {role!r}"
        text = _text(m.get("content"))
        if text is None:
            return None, f"{where}[{i}].content must be a string (or a list of text parts)"
        out.append({"role": role, "content": text})
    if need_assistant_last and out[-1]["role"] != "assistant":
        return None, f"{where} must end with an assistant message (the part that is trained)"
    return out, None


def _detect(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "preferred_output" in obj or "non_preferred_output" in obj or "input" in obj:
        return "preference"
    return None


def _record(obj: dict[str, Any], fmt: str) -> tuple[dict[str, Any] | None, str | None]:
    if fmt == "chat":
        messages, problem = _messages(obj.get("messages"), "messages", True)
        return ({"messages": messages} if messages else None), problem
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                return None, f"{key} must be a string"
        if not obj["completion"].strip():
            return None, "completion is empty: nothing to train on"
        return {"prompt": obj["prompt"], "completion": obj["completion"]}, None
    inp = obj.get("input")
    if not isinstance(inp, dict):
        return None, "input must be an object with messages"
    prompt, problem = _messages(inp.get("messages"), "input.messages", False)
    if problem:
        return None, problem
    outputs = {}
    for key in ("preferred_output", "non_preferred_output"):
        messages, problem = _messages(obj.get(key), key, True)
        if problem:
            return None, problem
        if len(messages) != 1:
            return None, f"{key} must hold exactly one assistant message"
        outputs[key] = messages
    return {"input": {"messages": prompt}, **outputs}, None


def check_file(path: str, expected: str | None = None) -> FileCheck:
    """Reads the JSONL file ``path`` and checks every line.

    Args:
        expected: the format the job needs (``preference`` for DPO); None: chat or
            prompt/completion, as the first valid line shows.

    Returns:
        A :class:`FileCheck`; its records are normalised (text content, known keys only).
    """
    check = FileCheck(format=expected)
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                check.problems.append((number, "not UTF-8 text"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                check.problems.append((number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                check.problems.append((number, f"a JSON object expected, got {type(obj).__name__}"))
                continue
            fmt = _detect(obj)
            if fmt is None:
                check.problems.append((number, f"unknown format: keys {sorted(obj)}; expected messages, prompt/completion, "
                                               "or input/preferred_output/non_preferred_output"))
                continue
            if check.format is None:
                if fmt == "preference":
                    check.problems.append((number, "a preference example (input/preferred_output/non_preferred_output) "
                                                   "needs method type 'dpo'"))
                    continue
                check.format = fmt
            elif fmt != check.format:
                check.problems.append((number, f"a {fmt} example in a {check.format} file: use one format per file"))
                continue
            record, problem = _record(obj, fmt)
            if problem:
                check.problems.append((number, problem))
            else:
                check.records.append(record)
    return check
