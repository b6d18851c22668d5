"""The package as an operator installs it: every runtime import declared, and the built wheel, installed
WITHOUT extras into a fresh virtualenv, checks and serves the embedded default from any directory."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requests

from tests.support.demo import ORIGIN, demo_ports
from tests.support.processes import REPO_ROOT, running

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
#: What the wheel is built from: the files the Dockerfile copies into its build.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "gateway", "policies", "deploy/nginx")


def _distribution_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def _imported_top_level_modules(package: Path) -> set[str]:
    modules = set()
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"gateway", "__future__"}


def test_every_third_party_module_the_package_imports_is_a_declared_dependency() -> None:
    declared = {_distribution_name(r) for r in PYPROJECT["project"]["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: providers.get(module)
        for module in sorted(_imported_top_level_modules(REPO_ROOT / "gateway"))
        if not declared & {_distribution_name(d) for d in providers.get(module, [module])}
    }
    assert undeclared == {}, "imported by gateway/ but not in [project] dependencies of pyproject.toml"


def _run(
    argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout
    )


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    source = tmp_path / "source"
    for name in SOURCES:
        origin, copy = REPO_ROOT / name, source / name
        if origin.is_dir():
            # No compiled catalog comes from the checkout: the build itself must compile them (setup.py).
            ignore = shutil.ignore_patterns("__pycache__", "*.mo")
            shutil.copytree(origin, copy, symlinks=True, ignore=ignore)
        else:
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin, copy)
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
        tmp_path,
        env,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("cps_gateway-*.whl")
    return wheel


@pytest.mark.timeout(600)  # a wheel build and a fresh virtualenv with every dependency: about a minute
def test_the_wheel_installed_without_extras_checks_and_serves_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "SOFTHSM2_CONF")}
    wheel = _build_wheel(tmp_path, env)
    venv = tmp_path / "venv"
    created = _run([sys._base_executable, "-m", "venv", str(venv)], tmp_path, env)  # type: ignore[attr-defined]
    assert created.returncode == 0, created.stderr
    installed = _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], tmp_path, env)
    assert installed.returncode == 0, installed.stderr
    gateway = str(venv / "bin" / "gateway")
    work = tmp_path / "work"  # any directory: nothing of the source checkout is reachable from here
    work.mkdir()

    before_init = _run([gateway, "check"], work, env)
    assert before_init.returncode == 2, before_init.stderr
    assert "Traceback" not in before_init.stderr and "dev init" in before_init.stderr
    initialised = _run([gateway, "dev", "init"], work, env)
    assert initialised.returncode == 0, initialised.stdout + initialised.stderr
    assert (work / "policies" / "portal.yaml").is_file()
    checked = _run([gateway, "check"], work, env)
    assert checked.returncode == 0 and checked.stdout.startswith("OK:"), checked.stdout + checked.stderr

    with (
        demo_ports(),
        running([gateway, "dev", "portal"], 8081, cwd=work, env=env, log=tmp_path / "portal.log"),
        running([gateway, "serve"], 8080, cwd=work, env=env, log=tmp_path / "gateway.log", timeout=30),
    ):
        assert requests.get(f"{ORIGIN}/.gateway/healthz", timeout=5).status_code == 200
        home = requests.get(f"{ORIGIN}/", timeout=5)
        assert home.status_code == 200 and "Portail démo" in home.text
        record = requests.get(
            f"{ORIGIN}/patients/180017512345678", timeout=5, headers={"Accept": "text/html"}
        )
        assert record.status_code == 401
        assert "<h1>Identification requise</h1>" in record.text  # the wording, from the wheel's catalogs
    assert '"rule":"patient-records"' in (work / "var" / "audit.log").read_text()  # the working directory's
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()
