"""A small Dockerfile and .dockerignore reader: the tests check and replay the image build with it, and
``devcluster.image`` takes its build context and its image config (user, entry point, environment, labels)
from the same files, so the image built here without Docker cannot drift from the Dockerfile.

Only what this project's Dockerfile uses is understood: comments, line continuations, global ``ARG``
defaults, stages (``FROM image AS name``), ``ENV`` in its ``KEY=VALUE`` form, exec-form JSON arrays,
and .dockerignore patterns with Docker's rules (``*``, ``?``, ``**``, ``!`` exceptions, last match
wins, a pattern matching a directory excludes what is under it).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from devcluster.build import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ...
    args: str  # the rest of the instruction, continuations joined
    line: int  # where it starts in the file, for messages

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (``["a", "b"]``), else ``None``."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"line {self.line}: {self.keyword} is not a JSON array of strings: {text}")
        return value

    def words(self) -> list[str]:
        return shlex.split(self.args)

    def flags(self) -> dict[str, str]:
        """``--name=value`` options at the start (``COPY --from=builder``, ``HEALTHCHECK --interval=30s``)."""
        found: dict[str, str] = {}
        for word in self.words():
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            found[name] = value
        return found

    def operands(self) -> list[str]:
        words = self.words()
        while words and words[0].startswith("--"):
            words.pop(0)
        return words


@dataclass
class Stage:
    base: str  # the image, with ARG defaults substituted
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}")

    @cached_property
    def instructions(self) -> list[Instruction]:
        return [i for s in self.stages for i in s.instructions]


def expand(text: str, variables: Mapping[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` from ``variables`` (unknown names expand to nothing, as in Docker)."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), ""),
        text,
    )


def parse_env(instruction: Instruction, variables: Mapping[str, str]) -> dict[str, str]:
    """``ENV A=1 B=$A:x`` -> ``{"A": "1", "B": "1:x"}`` (each value sees the ones set before it)."""
    scope = dict(variables)
    result: dict[str, str] = {}
    for word in shlex.split(instruction.args):
        if "=" not in word:
            raise ValueError(f"line {instruction.line}: use ENV KEY=VALUE, got {word!r}")
        key, value = word.split("=", 1)
        scope[key] = result[key] = expand(value, scope)
    return result


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each instruction: comments dropped, continuations joined."""
    result: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comment lines, even inside a continuation, are removed by Docker
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        result.append((start, " ".join(p for p in pending if p)))
        pending = []
    if pending:
        raise ValueError(f"line {start}: the Dockerfile ends inside a line continuation")
    return result


def parse(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, content in logical_lines(text):
        keyword, _, args = content.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), line)
        if instruction.keyword == "FROM":
            words = instruction.operands()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=expand(words[0], global_args), name=name, line=line))
        elif not stages:
            if instruction.keyword != "ARG":
                raise ValueError(f"line {line}: only ARG may come before the first FROM, got {keyword}")
            key, _, value = args.strip().partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(instruction)
    if not stages:
        raise ValueError("the Dockerfile has no FROM")
    return Dockerfile(global_args=global_args, stages=stages)


def load(path: pathlib.Path = DOCKERFILE) -> Dockerfile:
    return parse(path.read_text())


# -- .dockerignore ------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


@dataclass(frozen=True)
class DockerIgnore:
    patterns: tuple[tuple[bool, re.Pattern[str]], ...]  # (is an exception "!", regex)
    exceptions: tuple[str, ...] = ()  # the "!" patterns as written (cleaned), to prune a walk safely

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        patterns = []
        exceptions = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            line = line[1:].strip() if exception else line
            line = str(pathlib.PurePosixPath(line)).lstrip("/")  # Docker cleans patterns (drops a trailing /)
            patterns.append((exception, _pattern_regex(line)))
            if exception:
                exceptions.append(line)
        return cls(tuple(patterns), tuple(exceptions))

    @classmethod
    def load(cls, path: pathlib.Path = DOCKERIGNORE) -> DockerIgnore:
        return cls.parse(path.read_text()) if path.exists() else cls(())

    def ignored(self, relative_path: str) -> bool:
        """Whether the build context leaves out this path (relative to the context, ``/``-separated)."""
        parts = relative_path.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for exception, regex in self.patterns:
            if any(regex.match(candidate) for candidate in candidates):
                result = not exception
        return result

    def may_include_below(self, relative_dir: str) -> bool:
        """Whether an exception pattern could bring back something under an ignored directory."""
        prefix = relative_dir.strip("/") + "/"
        return any(e.startswith(prefix) or not e[:1].isalnum() or "*" in e.split("/")[0] for e in self.exceptions)

    def files(self, root: pathlib.Path = ROOT) -> list[pathlib.Path]:
        """The build context: every file under ``root`` that Docker would send (sorted, relative)."""
        found: list[pathlib.Path] = []
        for directory, subdirs, names in os.walk(root):
            here = pathlib.Path(directory).relative_to(root)
            kept = []
            for name in sorted(subdirs):
                directory_path = (here / name).as_posix()
                if not self.ignored(directory_path) or self.may_include_below(directory_path):
                    kept.append(name)
            subdirs[:] = kept
            for name in sorted(names):
                file_path = here / name
                if not self.ignored(file_path.as_posix()) and (root / file_path).is_file():
                    found.append(file_path)
        return sorted(found)
