"""The Dockerfile, checked statically (no container engine on these machines): it installs the
package with the same pins as CI, runs as a non-root user, bakes in no secrets, its build context
holds only what it copies, and it provides what KFP and the chart call. The build script is run
for real in --dry-run mode to check the tags it derives."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import lesionflow
from lesionflow import cli
from pipelines.lesionflow_pipeline import COMPILED
from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def arg_defaults() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest)


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[canonicalize_name(name)] = version
    return pins


def project_install_command() -> str:
    runs = [rest for word, rest in stages()[0] if word == "RUN" and "pip install" in rest]
    [command] = [r for r in runs if "-c constraints.txt" in r]
    return command


def test_multi_stage_with_a_non_root_final_user():
    build, runtime = stages()
    assert build[0][1].endswith("AS build") and runtime[0][1].endswith("AS runtime")
    users = [rest for word, rest in runtime if word == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0), users
    # the venv the build stage filled is what the runtime stage ships
    assert ("COPY", "--from=build /opt/lesionflow /opt/lesionflow") in runtime


def test_base_image_python_satisfies_requires_python():
    base = arg_defaults()["BASE_IMAGE"]
    assert all(rest.startswith("${BASE_IMAGE}") for word, rest in instructions() if word == "FROM")
    version = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-\w+", base)
    assert version, f"pin the base image to a full Python version, got {base}"
    assert version[1] in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_installs_the_projects_dependencies_with_the_ci_pins():
    pins = constraint_pins()
    command = project_install_command()
    target = shlex.split(command)[-1]
    extras = re.fullmatch(r"\.\[([\w,]+)\]", target)
    assert extras, f"the image must install the project itself (pyproject.toml), got {target}"
    optional = PYPROJECT["project"]["optional-dependencies"]
    requirements = list(PYPROJECT["project"]["dependencies"])
    for extra in extras[1].split(","):
        requirements += optional[extra]
    for req in map(Requirement, requirements):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is installed in the image but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {req.name}=={pins[name]} outside {req}"
    # torch comes first from its CPU index (else PyPI's CUDA build), at the pinned version
    args = arg_defaults()
    assert args["TORCH_VERSION"] == pins["torch"] and args["TORCH_VARIANT"] == "cpu"
    torch_run = next(rest for word, rest in stages()[0] if word == "RUN" and '"torch==' in rest)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in torch_run


def test_build_context_is_an_allowlist_holding_exactly_what_is_copied():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "deny everything first so .git, .venv, .lesionflow, mlflow.db never ship"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            copied.update(p.rstrip("/") for p in rest.split()[:-1])
    assert copied == allowed
    assert all((REPO / path).exists() for path in copied), copied
    # what setuptools packages and the readme pyproject.toml names are in the context
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {PYPROJECT["project"]["readme"], "pyproject.toml", "constraints.txt"} <= copied


def test_no_secret_is_baked_in():
    secret_like = re.compile(r"(?i)key|secret|password|token|credential")
    for word, rest in instructions():
        if word in ("ARG", "ENV"):
            names = re.findall(r"(\w+)=", rest) or [rest.split("=")[0]]
            assert not any(secret_like.search(n) for n in names), (word, rest)


def test_entrypoint_and_default_command_are_real_cli_calls():
    runtime = stages()[-1]
    entrypoint = json.loads(next(rest for word, rest in runtime if word == "ENTRYPOINT"))
    cmd = json.loads(next(rest for word, rest in runtime if word == "CMD"))
    assert entrypoint == ["lesionflow"] and "lesionflow" in PYPROJECT["project"]["scripts"]
    args = cli.build_parser().parse_args(cmd)
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8080)
    assert "EXPOSE 8080" in [f"{w} {r}" for w, r in runtime]


def test_kfp_executor_finds_the_venv_python():
    """KFP replaces the entrypoint with `sh -c '… python3 -m kfp.dsl.executor_main …'`: the
    runtime PATH must put the venv (which holds kfp and lesionflow) first."""
    executors = next(yaml.safe_load_all(COMPILED.read_text()))["deploymentSpec"]["executors"].values()
    for executor in executors:
        container = executor["container"]
        assert container["command"][0] == "sh"
        assert "python3 -m kfp.dsl.executor_main" in " ".join(container["command"] + container.get("args", []))
    env = next(rest for word, rest in stages()[-1] if word == "ENV" and "PATH=" in rest)
    assert re.search(r"\bPATH=/opt/lesionflow/bin:\$PATH\b", env)
    assert ("RUN", "python3 -m venv /opt/lesionflow") in stages()[0]


@pytest.mark.parametrize("repository", [None, "registry.example.com/ml/lesionflow"])
def test_build_script_tags_the_version_and_the_git_sha(repository, monkeypatch):
    if repository:
        monkeypatch.setenv("IMAGE_REPOSITORY", repository)
    proc = subprocess.run([str(REPO / "scripts" / "build_image.sh"), "--dry-run", "--allow-dirty", "--push"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    sha = subprocess.run(["git", "rev-parse", "HEAD"], check=True, cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    repo = repository or lesionflow.IMAGE_REPOSITORY
    version_tag, sha_tag = f"{repo}:{lesionflow.__version__}", f"{repo}:{lesionflow.__version__}-{sha[:12]}"
    build, push1, push2 = proc.stdout.splitlines()[:3]
    assert f"-t {version_tag} -t {sha_tag}" in build and f"GIT_SHA={sha}" in build
    assert (push1, push2) == (f"docker push {version_tag}", f"docker push {sha_tag}")
    if repository is None:  # the version tag is the one the checked-in pipeline and the chart use
        assert version_tag == lesionflow.IMAGE
