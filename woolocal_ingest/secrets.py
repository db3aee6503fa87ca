"""Find secrets in a document's text before it is chunked: private keys, cloud keys, tokens, password assignments.

Why a focused set of patterns and not the `detect-secrets` package: its scanner is driven by process-global
settings (plugins and filters configured through `transient_settings`), scans files by path rather than text we
already decoded (PDF, HTML, Word, notebooks), and its high-entropy plugins flag every sha256 and base64 blob in
ordinary docs (our own manifests are full of them), which would redact honest text. The patterns below are the
well-known, low-false-positive ones of its plugins (PrivateKeyDetector, AWSKeyDetector, GitHubTokenDetector,
GitLabTokenDetector, SlackDetector, StripeDetector, OpenAIDetector, JwtTokenDetector, BasicAuthDetector,
KeywordDetector, NpmDetector, PypiTokenDetector, SendGridDetector) plus Google and Hugging Face keys, kept here
where each can be tested against real text.

A `Finding` names the line and the kind of secret, never the secret itself: nothing from a secret reaches a
summary, a log or a store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["Finding", "SecretsMode", "SECRETS_MODES", "is_key_file", "redact", "scan"]

SecretsMode = Literal["redact", "skip-file", "allow"]
SECRETS_MODES: tuple[str, ...] = ("redact", "skip-file", "allow")
KEY_FILE_SHARE = 0.5  # a file whose non-empty lines are at least this share of secrets is a key file: skipped whole


@dataclass(frozen=True)
class Finding:
    """A line (1-based) that holds a secret, and what kind of secret it is."""

    line: int
    kind: str


_TOKEN_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(rx)) for kind, rx in (
        ("AWS access key id", r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"),
        ("AWS secret access key",
         r"(?i)aws.{0,20}?(?:secret|key|pwd|pw|password|pass|token).{0,20}?['\"]?[0-9a-zA-Z/+]{40}(?![0-9a-zA-Z/+])"),
        ("GitHub token", r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9_]{36,}"),
        ("GitHub token", r"\bgithub_pat_[A-Za-z0-9_]{22,}"),
        ("GitLab token", r"\bglpat-[A-Za-z0-9_-]{20,}"),
        ("Slack token", r"(?i)\bxox[abposr]-(?:\d+-)+[a-z0-9]+"),
        ("Slack webhook", r"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]+"),
        ("Stripe key", r"\b[rs]k_live_[0-9a-zA-Z]{24,}"),
        ("OpenAI-style API key", r"\bsk-(?:proj-|svcacct-|admin-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{32,}"),
        ("Google API key", r"\bAIza[0-9A-Za-z_-]{35}\b"),
        ("Hugging Face token", r"\bhf_[A-Za-z]{34,}\b"),
        ("npm token", r"\bnpm_[A-Za-z0-9]{36}\b"),
        ("PyPI token", r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"),
        ("SendGrid key", r"\bSG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}\b"),
        ("JSON web token", r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
        ("password in URL", r"\b[a-z][a-z0-9+.-]*://[^\s:/?#@]+:(?![$<{%*])(?!pass(?:word)?@)[^\s@/]{3,}@[^\s/]+"),
    )
)
_KEY_BEGIN = re.compile(r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----")
_KEY_END = re.compile(r"-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----")
# `<name ending in a secret word> = | : | := | => <value>`, the key optionally quoted (JSON, YAML, .env, code)
_ASSIGNMENT = re.compile(
    r"""(?ix)(?:^|[\s{,(;])["']?[A-Za-z0-9_.-]*?
        (?P<word>password|passwd|passphrase|pwd|secret|secret[_-]?key|client[_-]?secret|token|api[_-]?key|apikey
           |access[_-]?key|private[_-]?key|auth[_-]?key|credentials?)
        ["']?\s*(?::=|=>|=|:)\s*
        (?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,;#]+)"""
)
_PLACEHOLDER = re.compile(
    r"(?i)^(?:<.*>|\$\{?.*|%\(?.*|\{\{.*|\*+|x{3,}|\.{3}|…|.*(?:your[_-]|example|placeholder|changeme-|dummy|redacted|"
    r"replace[_-]?me|\bnone\b|\bnull\b).*)$"
)
_TYPE_WORDS = frozenset({"string", "str", "null", "none", "true", "false", "required", "optional", "password",
                         "secret", "token", "bool", "int", "integer", "number", "object", "undefined"})


def _assigned_secret(line: str) -> bool:
    for m in _ASSIGNMENT.finditer(line):
        value = m.group("value")
        quoted = value[:1] in "\"'" and value[-1:] == value[:1] and len(value) >= 2
        v = value[1:-1] if quoted else value
        if not v or _PLACEHOLDER.match(v) or v.lower() in _TYPE_WORDS:
            continue
        if quoted:
            if len(v) >= 4:
                return True
        # unquoted: a literal, not code (a call, an attribute, a type) and not a plain word or number
        elif (len(v) >= 6 and not re.search(r"[()\[\]]", v) and not v.isdigit()
              and re.search(r"[0-9A-Z!@#$%^&*+/=~?-]", v) and not re.fullmatch(r"[A-Za-z_][\w]*\.[\w.]+", v)):
            return True
    return False


def scan(text: str) -> list[Finding]:
    """The lines of `text` that hold secrets, in line order (a private key block: every line of it)."""
    findings: list[Finding] = []
    in_key = False
    for i, line in enumerate(text.split("\n"), start=1):
        if in_key or _KEY_BEGIN.search(line):
            findings.append(Finding(i, "private key"))
            in_key = not _KEY_END.search(line)
            continue
        kind = next((k for k, rx in _TOKEN_PATTERNS if rx.search(line)), None)
        if kind is None and _assigned_secret(line):
            kind = "password or token assignment"
        if kind is not None:
            findings.append(Finding(i, kind))
    return findings


def is_key_file(text: str, findings: list[Finding]) -> bool:
    """Mostly key material (a PEM key, a credentials file): at least KEY_FILE_SHARE of its non-empty lines."""
    if not findings:
        return False
    lines = text.split("\n")
    non_empty = sum(1 for line in lines if line.strip())
    secret = sum(1 for f in findings if lines[f.line - 1].strip())
    return secret >= KEY_FILE_SHARE * max(non_empty, 1)


def redact(text: str, findings: list[Finding]) -> str:
    """`text` with each finding's line replaced by a marker naming its kind; the number of lines is kept."""
    if not findings:
        return text
    lines = text.split("\n")
    for f in findings:
        line = lines[f.line - 1]
        indent = line[: len(line) - len(line.lstrip())]
        lines[f.line - 1] = f"{indent}[redacted: {f.kind}]"
    return "\n".join(lines)
