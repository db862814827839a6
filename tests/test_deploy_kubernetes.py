"""The Kubernetes manifests in deploy/kubernetes/, checked without a cluster.

Every manifest is validated offline against the Kubernetes schema (kubernetes-validate,
strict: an unknown or misspelt field fails), and what the manifests say about the proxy
is held against the proxy itself: the environment variables it reads, the admin routes
and how they answer while draining, the ports, the state dir and its size, the image's
user, and the drain deadline against the termination grace period. A change on one side
that the other does not follow fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from apitally_proxy.admin import OPEN_PATHS, build_admin_app, host_allowed
from apitally_proxy.aio import cancel_and_wait
from apitally_proxy.config import (
    Settings,
    env_names,
    environment_warnings,
    load_settings,
)
from apitally_proxy.hub.request_log import MAX_FILE_SIZE, MAX_FILES
from apitally_proxy.hub.transport import LocalTransport, Outcome
from apitally_proxy.otlp.transport import MAX_EXPORT_BYTES
from apitally_proxy.server import EXIT_MARGIN, MAX_FINAL_DELIVERY, Worker

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
SECRET_EXAMPLE = "secret.example.yaml"

# The oldest Kubernetes with native sidecars on by default (beta in 1.29), and the newest
# schema the pinned kubernetes-validate ships.
SCHEMA_VERSIONS = ("1.29.0", "1.37.0")

# Seconds the example app is given to exit after its SIGTERM (its own graceful-shutdown
# timeout); deployment.yaml states the same next to the grace arithmetic.
APP_DRAIN_BUDGET = 10.0


# ---- reading the manifests --------------------------------------------------------------


def documents(name: str) -> list[dict[str, Any]]:
    text = (DEPLOY / name).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def kustomization() -> dict[str, Any]:
    (doc,) = documents("kustomization.yaml")
    return doc


def generated_configmaps() -> list[dict[str, Any]]:
    """The ConfigMaps kustomization.yaml's configMapGenerator makes (without the hash)."""
    maps = []
    for generator in kustomization().get("configMapGenerator", []):
        data = {}
        for entry in generator.get("files", []):
            key, sep, path = entry.partition("=")
            data[key if sep else Path(entry).name] = (DEPLOY / (path if sep else entry)).read_text()
        metadata = {"name": generator["name"]}
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return maps


def resources() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes/` creates."""
    listed = [doc for name in kustomization()["resources"] for doc in documents(name)]
    return listed + generated_configmaps()


def one(kind: str) -> dict[str, Any]:
    (found,) = [r for r in resources() if r["kind"] == kind]
    return found


def pod_spec() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]


def proxy_container() -> dict[str, Any]:
    (found,) = [c for c in pod_spec()["initContainers"] if c["name"] == "apitally-proxy"]
    return found


def app_container() -> dict[str, Any]:
    (found,) = [c for c in pod_spec()["containers"] if c["name"] == "app"]
    return found


def secret_example() -> dict[str, Any]:
    (doc,) = documents(SECRET_EXAMPLE)
    return doc


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return number


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    return {kind: container[kind] for kind in kinds if kind in container}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (100m, 1, 128Mi, 1G) as a plain number."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert m and (not m.group(2) or m.group(2) in units), f"unexpected quantity {value!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def dockerfile_user() -> tuple[int, int]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    (*_, user) = [ln.split(None, 1)[1] for ln in lines if ln.startswith("USER ")]
    uid, _, gid = user.strip().partition(":")
    return int(uid), int(gid or uid)


def dockerfile_env(name: str) -> str:
    m = re.search(rf"\b{name}=(\S+)", (ROOT / "Dockerfile").read_text())
    assert m, f"the Dockerfile sets no {name}"
    return m.group(1)


def mounted_file(container: dict[str, Any], path: str) -> Path:
    """The repository file a container sees at `path` through a generated ConfigMap."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    maps = {m["metadata"]["name"]: m for m in generated_configmaps()}
    generators = {g["name"]: g for g in kustomization()["configMapGenerator"]}
    for mount in container["volumeMounts"]:
        parent = mount["mountPath"].rstrip("/")
        if not path.startswith(parent + "/"):
            continue
        name = volumes[mount["name"]]["configMap"]["name"]
        key = path[len(parent) + 1 :]
        assert key in maps[name]["data"], f"ConfigMap {name} has no key {key}"
        for entry in generators[name]["files"]:
            file_key, sep, file_path = entry.partition("=")
            if (file_key if sep else Path(entry).name) == key:
                return DEPLOY / (file_path if sep else entry)
    raise AssertionError(f"nothing of the container is mounted at {path}")


def settings_from_manifest(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, str] | None = None
) -> Settings:
    """The proxy's settings, loaded by the proxy from the Deployment's environment and the
    ConfigMap's file (the file as it is in the repository)."""
    for key in [k for k in os.environ if k.startswith(("APITALLY_", "OTEL_"))]:
        monkeypatch.delenv(key)
    env = plain_env(proxy_container())
    env["APITALLY_PROXY_CONFIG"] = str(
        mounted_file(proxy_container(), env["APITALLY_PROXY_CONFIG"])
    )
    for name, value in {**env, **(extra or {})}.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def drain_bound(settings: Settings) -> float:
    """Seconds from the proxy's SIGTERM to the end of its drain, at most.

    `Worker.drain_and_stop` sets one deadline, shutdown_grace less EXIT_MARGIN (less
    EXIT_MARGIN x shutdown_grace below one second), and hands `HubSync.stop` the time left
    to it; there the sync in flight at SIGTERM and the final delivery share that one
    deadline, so an export that hangs cannot stretch it. What follows (closing the
    request log and the admin server, the interpreter's exit) comes out of EXIT_MARGIN.
    `test_a_drain_with_every_export_hanging_ends_by_drain_bound` holds the code to it.
    """
    grace = settings.shutdown_grace
    return grace - EXIT_MARGIN * min(1.0, grace)


# ---- the schema ------------------------------------------------------------------------


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    checked = [*resources(), secret_example()]
    assert {r["kind"] for r in checked} >= {"Deployment", "Service", "ConfigMap", "Secret"}
    for resource in checked:
        used = kubernetes_validate.validate(resource, version, strict=True)
        # The schema of that very version, not an older one it fell back to.
        assert used == version.rsplit(".", 1)[0], (resource["kind"], used)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicyy"):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[0], strict=True)


def test_the_kustomization_lists_every_manifest_but_the_secret_placeholder() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    # `kubectl apply -k` must never overwrite the real credentials with the placeholder.
    assert SECRET_EXAMPLE not in listed
    assert listed == on_disk - {SECRET_EXAMPLE}
    for generator in kustomization()["configMapGenerator"]:
        for entry in generator["files"]:
            assert (DEPLOY / (entry.partition("=")[2] or entry)).is_file(), entry
    assert {i["name"] for i in kustomization()["images"]} == {
        proxy_container()["image"].split(":")[0]
    }


# ---- the native sidecar ---------------------------------------------------------------


def test_the_proxy_is_a_native_sidecar() -> None:
    spec = pod_spec()
    assert proxy_container()["restartPolicy"] == "Always"
    assert "apitally-proxy" not in {c["name"] for c in spec["containers"]}
    assert spec.get("restartPolicy", "Always") == "Always"
    # The kubelet starts the app only once this probe has passed.
    assert "startupProbe" in proxy_container()


def test_the_upstream_is_the_app_in_the_same_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    upstream = settings_from_manifest(monkeypatch).upstream_target
    assert upstream.host == "127.0.0.1"
    assert upstream.port == port_number(app_container(), "app")


# ---- the environment ------------------------------------------------------------------


def test_every_environment_variable_is_one_the_proxy_reads() -> None:
    container = proxy_container()
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), "a variable is set twice"
    unknown = set(names) - set(env_names())
    assert not unknown, f"the proxy does not read {sorted(unknown)}"
    environ = {name: "x" for name in names}
    assert environment_warnings(environ) == []


def test_the_environment_and_config_file_are_a_valid_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_from_manifest(monkeypatch)
    # No Secret yet: local mode, traffic flows, nothing is sent.
    assert settings.export_mode == "local"
    assert settings.export_problem is None
    assert settings.workers == 1
    # The ConfigMap's file was loaded (a missing file or an unknown key would have raised),
    # and it holds only what the environment cannot say: the environment would win.
    config = tomllib.loads((DEPLOY / "apitally-proxy.toml").read_text())
    assert config
    for key, value in config.items():
        assert not (Settings.model_fields[key].json_schema_extra or {}).get("env"), key
        assert getattr(settings, key) == value, key


def test_the_secret_keys_are_optional_and_line_up_with_the_example(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refs = secret_refs(proxy_container())
    secret = secret_example()
    assert {"APITALLY_WRITE_TOKEN", "APITALLY_CLIENT_ID"} <= set(refs)
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"]
        # A missing Secret or key must never keep the pod from starting.
        assert ref["optional"] is True
    referenced = {ref["key"] for ref in refs.values()}
    assert set(secret["stringData"]) <= referenced
    # Applied unchanged, the placeholder is refused loudly: local mode, named on /health.
    secrets = {
        name: secret["stringData"][ref["key"]]
        for name, ref in refs.items()
        if ref["key"] in secret["stringData"]
    }
    assert "APITALLY_WRITE_TOKEN" in secrets
    settings = settings_from_manifest(monkeypatch, secrets)
    assert settings.export_mode == "local"
    assert "APITALLY_WRITE_TOKEN" in (settings.export_problem or "")


# ---- ports, Service, probes -----------------------------------------------------------


def test_ports_line_up_with_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_manifest(monkeypatch)
    proxy = proxy_container()
    listen, admin = settings.listen_address, settings.admin_address
    assert admin is not None
    # The Service and the kubelet come to the pod IP, not to loopback.
    assert listen.host == admin.host == "0.0.0.0"
    assert port_number(proxy, "http") == listen.port
    assert port_number(proxy, "admin") == admin.port
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == admin.port


def test_the_service_sends_traffic_to_the_proxy_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_from_manifest(monkeypatch)
    service = one("Service")
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    targets = [p["targetPort"] for p in service["spec"]["ports"]]
    # A number: named ports of native sidecars reach EndpointSlices only from 1.33 on.
    assert targets == [settings.listen_address.port]
    assert settings.admin_address is not None
    assert settings.admin_address.port not in targets
    assert port_number(app_container(), "app") not in targets


@pytest.fixture
async def worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[Worker]:
    """A proxy worker built from the manifests' settings (not started; state in tmp)."""
    settings = settings_from_manifest(
        monkeypatch, {"APITALLY_PROXY_STATE_DIR": str(tmp_path / "state")}
    )
    built = Worker(settings)
    yield built
    await built.proxy.close()
    built.lease.release()


def admin_app(worker: Worker) -> web.Application:
    """The admin app as `Worker.start` builds it: readiness and draining from the worker."""
    return build_admin_app(worker.status, lambda: worker.ready, draining=lambda: worker.draining)


@contextlib.asynccontextmanager
async def hanging_drain(worker: Worker, shutdown_grace: float) -> AsyncIterator[asyncio.Task[None]]:
    """The worker's sync running against a destination that accepts and never answers
    (an export is in flight), then SIGTERM's drain, with a shorter shutdown_grace so the
    test is quick. Yields the running drain; on leaving, it has ended."""
    sends: list[str] = []

    async def never_answers(kind: str, payload: dict[str, Any]) -> Outcome:
        sends.append(kind)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    worker.settings.shutdown_grace = shutdown_grace
    worker.sync.transport.send = never_answers  # type: ignore[method-assign]
    worker.ready = True  # as Worker.start leaves it
    await worker.sync.start()
    for _ in range(200):
        if sends:
            break
        await asyncio.sleep(0.01)
    assert sends, "no export started"
    drain = asyncio.ensure_future(worker.drain_and_stop())
    try:
        await asyncio.sleep(0)
        yield drain
        await asyncio.wait_for(drain, 10)
    finally:
        await cancel_and_wait(drain)


async def test_probes_ask_real_admin_routes_on_the_admin_port(worker: Worker) -> None:
    admin = worker.settings.admin_address
    assert admin is not None
    routes = {r.resource.canonical for r in admin_app(worker).router.routes() if r.resource}
    proxy = proxy_container()
    found = probes(proxy)
    assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in found.items():
        action = probe.get("httpGet") or probe.get("tcpSocket")
        assert action is not None, kind
        assert port_number(proxy, action["port"]) == admin.port, kind
        if "httpGet" in probe:
            assert probe["httpGet"]["path"] in routes, kind
            # They must work with the admin token the Secret may set.
            assert probe["httpGet"]["path"] in OPEN_PATHS, kind
    path = one("Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    assert path in routes
    # The kubelet and Prometheus name the pod by its IP, which the rebinding guard accepts
    # without admin_allowed_hosts.
    assert host_allowed(f"10.244.1.7:{admin.port}", frozenset())
    assert host_allowed(f"[fd00::7]:{admin.port}", frozenset())


async def test_readiness_fails_while_starting_and_draining_and_liveness_does_not(
    worker: Worker, aiohttp_client: Any
) -> None:
    client = await aiohttp_client(admin_app(worker))
    found = probes(proxy_container())
    readiness = {found[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe")}
    liveness = found["livenessProbe"]
    # An HTTP request, not a TCP connect: the kernel completes a connect by itself, so
    # only an answer shows that the event loop runs.
    assert "httpGet" in liveness, "liveness must ask the event loop, not the kernel"
    live_path = liveness["httpGet"]["path"]
    assert live_path not in readiness

    async def answers(path: str) -> tuple[int, str]:
        async with client.get(path) as response:
            return response.status, (await response.json())["status"]

    # Built, not started: starting.
    for path in readiness:
        assert await answers(path) == (503, "starting"), path
    assert await answers(live_path) == (200, "starting")
    worker.ready = True  # as Worker.start leaves it
    for path in [*readiness, live_path]:
        assert await answers(path) == (200, "ok"), path
    # The drain, as SIGTERM runs it, with an export hanging.
    async with hanging_drain(worker, shutdown_grace=2.0) as drain:
        await asyncio.sleep(0.2)
        assert not drain.done()
        for path in readiness:
            assert await answers(path) == (503, "draining"), path
        # A liveness failure now would have the kubelet kill the final delivery.
        assert await answers(live_path) == (200, "draining")


# ---- termination ----------------------------------------------------------------------


def prestop_sleep(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


async def test_a_drain_with_every_export_hanging_ends_by_drain_bound(worker: Worker) -> None:
    """The export in flight at SIGTERM and the final delivery share the one deadline:
    a destination that never answers cannot stretch the drain past `drain_bound`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with hanging_drain(worker, shutdown_grace=1.5):
        pass
    took = loop.time() - started
    bound = drain_bound(worker.settings)
    assert bound < worker.settings.shutdown_grace
    assert took <= bound + 0.2, f"the drain took {took:.2f} s, bound {bound:g} s"
    # Nothing was thrown away: what was not delivered stays spooled for the next start.
    assert worker.sync.queued >= 1


def test_the_grace_period_outlasts_app_drain_and_proxy_drain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_from_manifest(monkeypatch)
    grace = pod_spec()["terminationGracePeriodSeconds"]
    # The proxy's SIGTERM comes when the app has exited: after the app's preStop and its
    # own drain. A preStop on the sidecar would run at t = 0 next to the app's and only
    # blur this; there is none.
    assert "lifecycle" not in proxy_container()
    proxy_sigterm_at = prestop_sleep(app_container()) + APP_DRAIN_BUDGET
    assert prestop_sleep(app_container()) >= 1, "the app needs a moment to leave the endpoints"
    needed = proxy_sigterm_at + drain_bound(settings)
    spare = grace - needed
    # The whole of shutdown_grace (the drain and its EXIT_MARGIN for closing down) fits,
    # with a second to spare; and no more than ten seconds are wasted on every stuck pod.
    assert proxy_sigterm_at + settings.shutdown_grace + 1 <= grace
    assert spare <= 10
    # The delivery keeps its share of the deadline.
    assert min(MAX_FINAL_DELIVERY, settings.shutdown_grace / 3) > 0
    # The deployment's comment tells the same numbers.
    comment = (DEPLOY / "deployment.yaml").read_text()
    assert f"within {APP_DRAIN_BUDGET:.0f} s" in comment
    assert f"{settings.shutdown_grace:g} - {EXIT_MARGIN:g} = {drain_bound(settings):g} s" in comment
    assert (
        f"{prestop_sleep(app_container()):g} + {APP_DRAIN_BUDGET:g} + {drain_bound(settings):g}"
        f" = {needed:g} s <= terminationGracePeriodSeconds {grace} ({spare:g} s spare)"
    ) in comment
    # And so does docs/kubernetes.md.
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f"## Shutdown: why {grace} seconds" in docs
    assert f"{grace} s" in docs and f"({spare:g} s spare)" in docs


# ---- security context and state dir ---------------------------------------------------


def test_the_security_context_matches_the_image() -> None:
    uid, gid = dockerfile_user()
    pod, proxy = pod_spec()["securityContext"], proxy_container()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (proxy["runAsUser"], proxy["runAsGroup"]) == (uid, gid)
    assert pod["fsGroup"] == gid
    assert proxy["allowPrivilegeEscalation"] is False
    assert proxy["capabilities"]["drop"] == ["ALL"]
    assert proxy["readOnlyRootFilesystem"] is True


def test_the_state_dir_is_the_only_writable_mount_and_fits_its_volume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_from_manifest(monkeypatch)
    assert str(settings.state_dir) == dockerfile_env("APITALLY_PROXY_STATE_DIR")
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    writable = [m for m in proxy_container()["volumeMounts"] if not m.get("readOnly")]
    # readOnlyRootFilesystem: everything the proxy writes is under the state dir.
    assert [m["mountPath"] for m in writable] == [str(settings.state_dir)]
    assert all(m["readOnly"] for m in proxy_container()["volumeMounts"] if m not in writable)
    volume = volumes[writable[0]["name"]]
    size_limit = quantity(volume["emptyDir"]["sizeLimit"])
    # Past its sizeLimit the kubelet evicts the pod: what the proxy keeps there, at most.
    local_max = inspect.signature(LocalTransport).parameters["max_bytes"].default
    per_worker = (
        settings.spool_max_bytes
        + 2 * MAX_EXPORT_BYTES  # the spool keeps the newest payload even when over the cap
        + (MAX_FILES + 2) * MAX_FILE_SIZE  # request-log files waiting, plus the open one
        + 2 * local_max  # local mode: the output file and its one rotation
    )
    assert settings.workers * per_worker <= size_limit


def test_resource_requests_are_within_their_limits() -> None:
    for container in [*pod_spec()["initContainers"], *pod_spec()["containers"]]:
        requests = container["resources"]["requests"]
        limits = container["resources"].get("limits", {})
        assert "memory" in limits, container["name"]
        for key, limit in limits.items():
            assert quantity(requests[key]) <= quantity(limit), (container["name"], key)
