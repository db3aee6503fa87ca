"""Which paths a walk leaves out, decided as git decides: .gitignore files, .git/info/exclude, .woolocalignore.

Patterns are parsed and matched by `pathspec` (GitIgnoreSpec: git's own wildmatch, negation, directory patterns,
anchoring, with git's edge cases), not by hand. Precedence follows gitignore(5): within one file the last matching
line wins; a file in a deeper folder wins over one in a folder above; `.git/info/exclude` is weakest. A
`.woolocalignore` (same syntax) sits beside each `.gitignore` and wins over it, so a user can leave out (or, with
`!pattern`, take back in) what git treats otherwise. A folder that is ignored is not walked, so nothing below it can be
re-included: exactly git's rule. flows.yaml `exclude` patterns (gitignore syntax too) always win.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pathspec import GitIgnoreSpec

__all__ = ["GITIGNORE", "WOOLOCALIGNORE", "IgnoreRules", "PatternFile", "Rule", "git_top"]

GITIGNORE = ".gitignore"
WOOLOCALIGNORE = ".woolocalignore"


@dataclass(frozen=True)
class Rule:
    """The line that decided a path is left out: where it is written and what it says."""

    origin: str  # ".gitignore", "docs/.gitignore", ".git/info/exclude", ".woolocalignore", "exclude", "include"
    pattern: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.pattern}"


@dataclass(frozen=True)
class PatternFile:
    """The patterns of one ignore file (or of flows.yaml), relative to the folder `base` (posix, '' = the top)."""

    origin: str
    base: str
    spec: GitIgnoreSpec

    @classmethod
    def from_lines(cls, origin: str, base: str, lines: list[str] | tuple[str, ...]) -> PatternFile:
        return cls(origin=origin, base=base, spec=GitIgnoreSpec.from_lines(list(lines)))

    @classmethod
    def read(cls, path: Path, origin: str, base: str) -> PatternFile | None:
        """The file's patterns, or None when it is absent or unreadable (git ignores those too)."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        return cls.from_lines(origin, base, text.splitlines())

    def decide(self, path: str, is_dir: bool) -> tuple[bool | None, str]:
        """(True: ignored, False: re-included by a `!` line, None: no line matches; the deciding line)."""
        if self.base:
            if not path.startswith(self.base + "/"):
                return None, ""
            path = path[len(self.base) + 1 :]
        result = self.spec.check_file(path + "/" if is_dir else path)
        if result.include is None or result.index is None:
            return None, ""
        return bool(result.include), str(getattr(self.spec.patterns[result.index], "pattern", ""))


def git_top(folder: Path) -> Path | None:
    """The top of the git work tree holding `folder` (the folder with `.git`), or None outside one."""
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


def _git_dir(top: Path) -> Path | None:
    """The repository folder of a work tree: `.git` itself, or where a `.git` file (worktree, submodule) points."""
    dot = top / ".git"
    if dot.is_dir():
        return dot
    try:
        line = dot.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not line.startswith("gitdir:"):
        return None
    gitdir = (top / line.removeprefix("gitdir:").strip()).resolve()
    try:  # a linked worktree keeps info/exclude in the main repository ("commondir")
        common = (gitdir / "commondir").read_text(encoding="utf-8").strip()
        return (gitdir / common).resolve()
    except OSError:
        return gitdir


@dataclass(frozen=True)
class IgnoreRules:
    """The rules in force for one folder of the walk; `enter(sub)` gives those of a sub-folder.

    Paths handed to `ignored` are posix paths relative to the project root; `prefix` is the root's own path below the
    git top (so the `.gitignore` files of folders above the project apply as git applies them).
    """

    prefix: str
    files: tuple[PatternFile, ...]  # weakest first
    exclude: PatternFile | None
    use_files: bool

    @classmethod
    def for_root(cls, root: Path, exclude: tuple[str, ...] | list[str] = (), use_files: bool = True) -> IgnoreRules:
        root = Path(root).absolute()
        excl = PatternFile.from_lines("exclude", "", list(exclude)) if exclude else None
        if not use_files:
            return cls(prefix="", files=(), exclude=excl, use_files=False)
        top = git_top(root)
        files: list[PatternFile] = []
        if top is None:
            top, prefix = root, ""
        else:
            prefix = root.relative_to(top).as_posix() if root != top else ""
            gitdir = _git_dir(top)
            if gitdir is not None:
                info = PatternFile.read(gitdir / "info" / "exclude", ".git/info/exclude", "")
                if info is not None:
                    files.append(info)
            # .gitignore files of the folders between the git top and the project root
            parts = PurePosixPath(prefix).parts if prefix else ()
            for depth in range(len(parts)):
                base = "/".join(parts[:depth])
                files += cls._folder_files(top / base if base else top, base, "/".join([".."] * (len(parts) - depth)))
        rules = cls(prefix=prefix, files=tuple(files), exclude=excl, use_files=True)
        return rules.enter(root, "")

    @staticmethod
    def _folder_files(folder: Path, base: str, label: str) -> list[PatternFile]:
        """The ignore files of one folder; `base` is its path below the git top, `label` how the summary names it."""
        out = []
        for name in (GITIGNORE, WOOLOCALIGNORE):
            pf = PatternFile.read(folder / name, f"{label}/{name}" if label else name, base)
            if pf is not None:
                out.append(pf)
        return out

    def enter(self, folder: Path, rel: str) -> IgnoreRules:
        """The rules for the project folder `rel` (at `folder`), adding its own ignore files."""
        if not self.use_files:
            return self
        base = self._full(rel)
        added = self._folder_files(folder, base, rel)
        if not added:
            return self
        return IgnoreRules(prefix=self.prefix, files=self.files + tuple(added), exclude=self.exclude,
                           use_files=True)

    def _full(self, rel: str) -> str:
        if not self.prefix:
            return rel
        return f"{self.prefix}/{rel}" if rel else self.prefix

    def ignored(self, rel: str, is_dir: bool) -> Rule | None:
        """The rule that leaves `rel` out, or None when it stays in."""
        if self.exclude is not None:
            hit, pattern = self.exclude.decide(rel, is_dir)
            if hit:
                return Rule("exclude", pattern)
        full = self._full(rel)
        for pf in reversed(self.files):
            hit, pattern = pf.decide(full, is_dir)
            if hit is not None:
                return Rule(pf.origin, pattern) if hit else None
        return None
