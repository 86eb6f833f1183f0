"""Check `python jobs/<job>.py ...` command lines (RayJob entrypoints, docs) against the real jobs.

A command line is good when its script exists, every flag is one the job's own --help lists, and
its values pass the job's own validation: shard.py arguments go through the job's parser and
``config_from_args`` (ShardConfig's checks), train.py's --config and --set go through
``load_job_config`` (so a misspelt override key fails here, not on the cluster).

Paths under /app are the image's copies of jobs/ and configs/ (infra/docker/Dockerfile).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

from tests.infra.k8s_manifests import REPO

APP = "/app"
_SCRIPT = re.compile(r"(^|/)jobs/[a-z_]+\.py$")


@dataclass(frozen=True)
class JobCommand:
    text: str
    script: str  # as written: jobs/train.py or /app/jobs/train.py
    argv: tuple[str, ...]

    @property
    def job(self) -> str:
        return Path(self.script).name


def repo_path(path: str) -> Path:
    """Where a path of a command line lives in the repository (/app/x -> x)."""
    return REPO / (path[len(APP) + 1 :] if path.startswith(APP + "/") else path)


def parse_command(text: str) -> JobCommand | None:
    """The `python jobs/X.py args...` inside a shell command line, or None when there is none."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)  # ";", "&&", "|" become tokens
    lexer.whitespace_split = True
    tokens = list(lexer)
    for i, token in enumerate(tokens[1:], start=1):
        if _SCRIPT.search(token) and Path(tokens[i - 1]).name.startswith("python"):
            end = next((j for j in range(i + 1, len(tokens)) if tokens[j] in (";", "&&", "||", "|")), len(tokens))
            return JobCommand(text, token, tuple(tokens[i + 1 : end]))
    return None


@cache
def load_job(name: str) -> ModuleType:
    """jobs/<name> as a module; sys.path is restored (the jobs put the project root first)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"infra_job_{Path(name).stem}", REPO / "jobs" / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


@cache
def help_flags(name: str) -> frozenset[str]:
    """The --flags that `python jobs/<name> --help` lists (its argparse parser, run in-process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        load_job(name).main(["--help"])
    options = out.getvalue().split("\noptions:\n", 1)[-1]  # not the description's examples
    return frozenset(re.findall(r"^\s+(?:-\w,\s)?(--[a-z][a-z0-9-]*)", options, re.MULTILINE))


def _values(argv: tuple[str, ...], flag: str) -> list[str]:
    found = []
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif token.startswith(flag + "="):
            found.append(token.split("=", 1)[1])
    return found


def _train_problems(cmd: JobCommand) -> list[str]:
    from training.config import load_job_config

    configs = _values(cmd.argv, "--config")
    if len(configs) != 1:
        return [f"{cmd.text}: train.py needs exactly one --config"]
    path = repo_path(configs[0])
    if not path.is_file():
        return [f"{cmd.text}: config {configs[0]} is not in the repository"]
    try:
        load_job_config(path, _values(cmd.argv, "--set"))
    except (ValueError, KeyError, TypeError) as e:
        return [f"{cmd.text}: {e}"]
    return []


def _shard_problems(cmd: JobCommand) -> list[str]:
    job = load_job("shard.py")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = job.build_parser().parse_args(list(cmd.argv))
    except SystemExit:
        return [f"{cmd.text}: shard.py's parser rejects these arguments"]
    if args.config and not repo_path(args.config).is_file():
        return [f"{cmd.text}: config {args.config} is not in the repository"]
    try:
        job.config_from_args(args)
    except (ValueError, KeyError, TypeError) as e:
        return [f"{cmd.text}: {e}"]
    return []


def _evaluate_problems(cmd: JobCommand) -> list[str]:
    models = _values(cmd.argv, "--model")
    if len(models) != 1 or not re.fullmatch(r"models:/[\w.-]+@[\w-]+", models[0]):
        return [f"{cmd.text}: evaluate.py needs one --model models:/NAME@ALIAS"]
    return [] if _values(cmd.argv, "--data") else [f"{cmd.text}: evaluate.py needs --data"]


_CHECKS = {"train.py": _train_problems, "shard.py": _shard_problems, "evaluate.py": _evaluate_problems}


def command_problems(cmd: JobCommand) -> list[str]:
    """Everything wrong with a job command line; empty when the job would accept it."""
    if not repo_path(cmd.script).is_file():
        return [f"{cmd.text}: {cmd.script} is not in the repository"]
    flags = help_flags(cmd.job)
    unknown = sorted({t.split("=")[0] for t in cmd.argv if t.startswith("--")} - flags)
    if unknown:
        return [f"{cmd.text}: {cmd.job} has no flag {', '.join(unknown)}"]
    check = _CHECKS.get(cmd.job)
    return check(cmd) if check else []
