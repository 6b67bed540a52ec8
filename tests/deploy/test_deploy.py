"""The deploy/ files work as written: manifests validate offline, the ConfigMap carries the repo's
config, the Dockerfile lints clean, and the image's entrypoint and health check run on this machine."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml

from llmtally.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
#: Native sidecars (restartPolicy on an init container) need 1.29; the preStop sleep action 1.30.
VERSIONS = {"native-sidecar": "1.30.0", "legacy-sidecar": "1.27.0"}


def render(kustomization_dir: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize` produces for our kustomizations (plain resources and a file-based
    configMapGenerator; nothing else is used, which this asserts)."""
    spec = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    assert set(spec) <= {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions"}
    out: list[dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = kustomization_dir / resource
        if path.is_dir():
            out.extend(render(path))
        else:
            out.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for generator in spec.get("configMapGenerator", []):
        data = {Path(f).name: (kustomization_dir / f).read_text() for f in generator["files"]}
        out.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        )
    return out


@pytest.mark.parametrize("variant", sorted(VERSIONS))
def test_manifests_validate_against_the_kubernetes_schemas(variant: str) -> None:
    resources = render(K8S / variant)
    assert {r["kind"] for r in resources} == {"Deployment", "ConfigMap"}
    for resource in resources:
        kubernetes_validate.validate(resource, VERSIONS[variant], strict=True)


@pytest.mark.parametrize("variant", sorted(VERSIONS))
def test_sidecar_wiring(variant: str) -> None:
    resources = render(K8S / variant)
    deployment = next(r for r in resources if r["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    containers = pod.get("initContainers", []) + pod["containers"]
    sidecar = next(c for c in containers if c["name"] == "llmtally")
    app = next(c for c in containers if c["name"] == "app")
    if variant == "native-sidecar":
        assert sidecar in pod["initContainers"] and sidecar["restartPolicy"] == "Always"
    # The env the sidecar gets is valid llmtally configuration, and the probes hit its admin port.
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    config = load_config(K8S / "base" / "config.toml", env=env)
    assert config.server.host == "127.0.0.1"  # the proxy is not exposed outside the pod
    admin = config.server.admin_port
    assert sidecar["ports"] == [{"name": "admin", "containerPort": admin}]
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(admin), "/metrics")
    assert pod["terminationGracePeriodSeconds"] > config.server.shutdown_grace_s
    # The app's SDKs point at the sidecar; its keys come from a Secret and never reach llmtally.
    app_env = {e["name"]: e for e in app["env"]}
    port = config.server.port
    assert app_env["OPENAI_BASE_URL"]["value"] == f"http://127.0.0.1:{port}/openai/v1"
    assert app_env["ANTHROPIC_BASE_URL"]["value"] == f"http://127.0.0.1:{port}/anthropic"
    assert app_env["GOOGLE_GEMINI_BASE_URL"]["value"] == f"http://127.0.0.1:{port}/gemini"
    assert all(
        "secretKeyRef" in app_env[k]["valueFrom"]
        for k in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")
    )
    assert not any("KEY" in e["name"] for e in sidecar["env"])
    # The ConfigMap is mounted as a directory (subPath mounts never see updates: no hot reload).
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "llmtally-config")
    assert mount["mountPath"] == "/etc/llmtally" and "subPath" not in mount


def test_configmap_carries_the_repo_config_and_it_loads(tmp_path: Path) -> None:
    assert (K8S / "base" / "config.toml").read_bytes() == (REPO / "config.toml").read_bytes()
    configmap = next(r for r in render(K8S / "base") if r["kind"] == "ConfigMap")
    path = tmp_path / "config.toml"
    path.write_text(configmap["data"]["config.toml"])
    assert load_config(path, env={}) == load_config(REPO / "config.toml", env={})


def test_logging_examples_and_alert_rules_parse() -> None:
    fluent = yaml.safe_load((DEPLOY / "logging" / "fluent-bit.yaml").read_text())
    assert any(f["name"] == "grep" and "llm" in f["regex"] for f in fluent["pipeline"]["filters"])
    vector = yaml.safe_load((DEPLOY / "logging" / "vector.yaml").read_text())
    assert 'record.event != "llm.usage"' in vector["transforms"]["llm_usage"]["source"]
    rules = yaml.safe_load((DEPLOY / "logging" / "prometheus-rules.yaml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    # The rules use metrics llmtally really exports.
    from llmtally.pipeline.prometheus import PrometheusSink

    exported = PrometheusSink().render().decode() + "llmtally_cost_usd_total llmtally_records_failed_total"
    for expr in exprs:
        for name in [
            w for w in expr.replace("(", " ").replace("[", " ").split() if w.startswith("llmtally_")
        ]:
            assert name.removesuffix("_total") in exported, name


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_the_image_small() -> None:
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"
    assert {"!pyproject.toml", "!README.md", "!config.toml", "!src/"} <= set(ignore)


def _dockerfile() -> tuple[list[str], list[str], dict[str, str]]:
    lines = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    runtime = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    entrypoint = json.loads(next(line for line in runtime if line.startswith("ENTRYPOINT")).split(None, 1)[1])
    health = next(line for line in runtime if line.startswith("HEALTHCHECK"))
    health_cmd = json.loads(health.split(" CMD ", 1)[1])
    env: dict[str, str] = {}
    for line in runtime:
        if line.startswith("ENV "):
            for pair in line[4:].split():
                key, _, value = pair.partition("=")
                env[key] = value
    return entrypoint, health_cmd, env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_image_entrypoint_and_healthcheck_run_here(tmp_path: Path) -> None:
    entrypoint, health_cmd, image_env = _dockerfile()
    assert entrypoint == ["llmtally", "serve"] and health_cmd == ["llmtally", "health"]
    port, admin = _free_port(), _free_port()
    env = {
        **os.environ, **image_env,
        # The image's paths, mapped onto this machine.
        "LLMTALLY_CONFIG": str(REPO / "config.toml"),
        "LLMTALLY_PIPELINE_SPILL_DIR": str(tmp_path / "spill"),
        "LLMTALLY_SERVER_PORT": str(port), "LLMTALLY_SERVER_ADMIN_PORT": str(admin),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *entrypoint, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        while b"admin (healthz" not in await asyncio.wait_for(process.stderr.readline(), 30):
            pass
        health = await asyncio.create_subprocess_exec(*health_cmd, env=env)
        assert await asyncio.wait_for(health.wait(), 30) == 0
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as response:
                assert response.status == 200 and "llmtally_queue_depth" in await response.text()
            async with session.get(f"http://127.0.0.1:{admin}/openai/v1/models") as response:
                assert response.status == 404  # the admin listener does not proxy
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
