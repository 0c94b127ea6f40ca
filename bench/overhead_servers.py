"""The servers bench/server_overhead.py measures, each in its own process: impasto, Cog 0.23.1
(its HTTP server as its container starts it, from a venv of its own) and the cog-like fallback;
which of the two baselines part A gets (`choose_baseline`), and all of them up at once
(`running`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

from bench.harness import (
    BENCH_DIR,
    REPO_ROOT,
    ServerProcess,
    clean_env,
    free_port,
    impasto_serve,
    logger,
)

log = logger("server_overhead")
DEFAULT_COG_VENV = BENCH_DIR / ".venv-cog"
COG_VERSION = "0.23.1"
# The operator's own settings, kept from every server.
OPERATOR_SETTINGS = ("IMPASTO_", "COG_")

COG_YAML = """\
# What `cog build` would read; the server itself only needs COG_PREDICT_TYPE_STUB.
build:
  python_version: "{python}"
  python_packages:
    - "pillow=={pillow}"
predict: "predict.py:SolidPredictor"
"""
# What `cog build` writes to .cog/openapi_schema.json for the predictor: coglet then validates
# every input against it, as in a built image.
COG_SCHEMA = {
    "openapi": "3.0.2",
    "info": {"title": "Cog", "version": "0.1.0"},
    "paths": {},
    "components": {
        "schemas": {
            "Input": {
                "type": "object",
                "title": "Input",
                "properties": {
                    "prompt": {
                        "type": "string",
                        "title": "Prompt",
                        "default": "",
                        "description": "ignored",
                        "x-order": 0,
                    }
                },
            },
            "Output": {"type": "string", "format": "uri", "title": "Output"},
        }
    },
}


@contextlib.contextmanager
def running(
    servers: list[ServerProcess], timeout_s: float, meanwhile: Callable[[], None] | None = None
) -> Iterator[None]:
    """All servers started at once (their start-up overlaps, and `meanwhile` runs beside it),
    ready before anything is measured, stopped at the end."""
    try:
        for server in servers:
            server.launch()
        if meanwhile is not None:
            meanwhile()
        for server in servers:
            server.wait_ready(timeout_s)
            elapsed = time.perf_counter() - server.started_at
            log(f"{server.name} ({server.log_path.parent.name}) up in {elapsed:.1f} s")
        yield
    except Exception:
        for server in servers:
            log(f"{server.name} log (last lines):\n{server.log_tail()}")
        raise
    finally:
        for server in servers:
            server.stop()


def impasto_server(root: Path, name: str, models_toml: str, env: dict[str, str]) -> ServerProcess:
    root.mkdir(parents=True, exist_ok=True)
    (root / "models.toml").write_text(models_toml)
    environment = clean_env(*OPERATOR_SETTINGS)
    # The no-model backend is imported by the server as bench.nomodel_backend.
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), environment.get("PYTHONPATH", "")) if p
    )
    environment.update(IMPASTO_LOG_LEVEL="warning", IMPASTO_OFFLINE="true", **env)
    return impasto_serve(root, environment, name)


def cog_server(root: Path, venv: Path) -> ServerProcess:
    """Cog's HTTP server as its container starts it: in the model's directory (/src there),
    COG_PREDICT_TYPE_STUB naming the predictor, `python -m cog.server.http`."""
    workdir = root / "src"
    (workdir / ".cog").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BENCH_DIR / "cog_predictor.py", workdir / "predict.py")
    pillow = _venv_pillow(venv) or version("pillow")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (workdir / "cog.yaml").write_text(COG_YAML.format(python=python, pillow=pillow))
    (workdir / ".cog" / "openapi_schema.json").write_text(json.dumps(COG_SCHEMA, indent=2))
    (root / "tmp").mkdir(exist_ok=True)
    port = free_port()
    env = clean_env(*OPERATOR_SETTINGS)
    env.update(
        # coglet starts its predictor worker with the `python` on PATH: the venv's.
        PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]),
        VIRTUAL_ENV=str(venv),
        PORT=str(port),
        COG_PREDICT_TYPE_STUB="predict.py:SolidPredictor",
        COG_LOG_LEVEL="warn",  # as impasto runs at warning: no log line per prediction
        TMPDIR=str(root / "tmp"),  # the predictor's output files go away with the run
    )
    env.pop("PYTHONPATH", None)
    return ServerProcess(
        name=f"cog {COG_VERSION}",
        command=[str(venv / "bin" / "python"), "-m", "cog.server.http", "--host", "127.0.0.1"],
        env=env,
        cwd=workdir,
        log_path=root / "cog.log",
        port=port,
        health_path="/health-check",
        ready=lambda response: (
            response.status_code == 200 and response.json().get("status") == "READY"
        ),
    )


def coglike_server(root: Path) -> ServerProcess:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return ServerProcess(
        name="cog-like",
        command=[sys.executable, str(BENCH_DIR / "coglike_server.py"), "--port", str(port)],
        env=clean_env(*OPERATOR_SETTINGS),
        cwd=root,
        log_path=root / "coglike.log",
        port=port,
        health_path="/health-check",
        ready=lambda response: response.status_code == 200,
    )


def _venv_pillow(venv: Path) -> str | None:
    completed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import PIL; print(PIL.__version__)"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return completed.stdout.strip() if completed.returncode == 0 else None


def cog_installed(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not python.exists():
        return False
    check = (
        "import importlib.metadata as m, cog, coglet, PIL; "
        f"assert m.version('cog') == m.version('coglet') == {COG_VERSION!r}"
    )
    completed = subprocess.run(
        [str(python), "-c", check], capture_output=True, check=False, timeout=120
    )
    return completed.returncode == 0


def install_cog(venv: Path) -> str | None:
    """Make `venv` with Cog and this venv's Pillow (the same libjpeg-turbo encodes on both
    sides) from PyPI; None when done, else why not."""
    log(f"installing cog=={COG_VERSION} into {venv} ...")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"cog=={COG_VERSION}",
            f"pillow=={version('pillow')}",
        ],
    ]
    for command in steps:
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, check=False, timeout=900
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(command[:4])}: {exc}"
        if completed.returncode != 0:
            return f"{' '.join(command[:4])} failed: {completed.stderr.strip()[-500:]}"
    return None if cog_installed(venv) else "cog does not import after installation"


def choose_baseline(args: argparse.Namespace) -> tuple[str, str]:
    """('cog' | 'cog-like', why): real Cog unless it cannot be had."""
    if args.baseline == "cog-like":
        return "cog-like", "--baseline cog-like"
    venv: Path = args.cog_venv
    if cog_installed(venv):
        return "cog", f"cog {COG_VERSION} from {venv}"
    if args.baseline == "auto" and args.short:
        return "cog-like", f"--short and no cog {COG_VERSION} in {venv} (a full run installs it)"
    problem = install_cog(venv)
    if problem is None:
        return "cog", f"cog {COG_VERSION} installed into {venv}"
    if args.baseline == "cog":
        raise SystemExit(f"--baseline cog: cannot install cog {COG_VERSION}: {problem}")
    log(f"cog unavailable, falling back to the cog-like baseline: {problem}")
    return "cog-like", f"cog {COG_VERSION} could not be installed: {problem}"
