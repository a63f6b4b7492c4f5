"""compose.yaml: valid per the Compose Specification, and wired the way clipmesh needs.

The schema is the copy vendored inside check-jsonschema, so this runs offline.
"""

import json
import shlex
import re
import socket
import subprocess
import sys
from concurrent import futures
from importlib import resources
from pathlib import Path

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    # safe_load resolves the `<<: *anchor` merge keys, as Compose itself does.
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _command(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def _flag(service: dict, name: str) -> str:
    argv = _command(service)
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} missing from command {argv}")


def _role(service: dict) -> str | None:
    argv = _command(service)
    return argv[1] if len(argv) > 1 and argv[0] == "clipmesh" else None


@pytest.fixture(scope="module")
def coordinator_name(services) -> str:
    names = [n for n, s in services.items() if _role(s) == "coordinator"]
    assert len(names) == 1, f"expected exactly one coordinator service, got {names}"
    return names[0]


@pytest.fixture(scope="module")
def workers(services) -> dict:
    found = {n: s for n, s in services.items() if _role(s) == "worker"}
    assert found, "no `clipmesh worker` services in compose.yaml"
    return found


def _mounts(service: dict) -> dict[str, str]:
    """Mount target -> named-volume source (short or long volume syntax)."""
    out = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
        else:
            source, target = vol.get("source", ""), vol["target"]
        out[target] = source
    return out


def test_matches_compose_spec_schema(compose):
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator_cls = jsonschema.validators.validator_for(schema)   # the draft the schema declares
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "compose.yaml violates the Compose Specification:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_coordinator_has_healthcheck_and_data_volume(compose, services, coordinator_name):
    coord = services[coordinator_name]
    check = coord.get("healthcheck")
    assert check and not check.get("disable"), "coordinator needs a healthcheck (workers wait on it)"
    assert check.get("test") and check["test"] != ["NONE"]
    data = _flag(coord, "--data")
    source = _mounts(coord).get(data)
    assert source, f"--data {data} is not backed by a volume; job data would die with the container"
    assert source in (compose.get("volumes") or {}), f"volume {source!r} is not declared at top level"
    port = _flag(coord, "--listen").rsplit(":", 1)[1]
    assert any(str(p).split(":")[-1] == port for p in coord.get("ports", [])), \
        f"coordinator port {port} is not published for clients"


def test_workers_reserve_an_nvidia_gpu_each(workers):
    claimed = []
    for name, svc in workers.items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
        assert gpus, f"{name} reserves no nvidia GPU"
        for d in gpus:
            assert d.get("count") or d.get("device_ids"), f"{name}: GPU reservation names no count/device_ids"
            claimed += d.get("device_ids", [])
        # The container sees only its reserved GPU, which is therefore always cuda:0.
        assert _flag(svc, "--device") == "cuda:0", name
    assert len(claimed) == len(set(claimed)), f"two workers reserve the same GPU: {claimed}"


def test_workers_wait_for_healthy_coordinator_and_dial_it(services, workers, coordinator_name):
    coord_port = _flag(services[coordinator_name], "--listen").rsplit(":", 1)[1]
    for name, svc in workers.items():
        depends = svc.get("depends_on")
        assert isinstance(depends, dict) and coordinator_name in depends, \
            f"{name} must depend_on {coordinator_name} (long form, with a condition)"
        assert depends[coordinator_name].get("condition") == "service_healthy", name
        assert _flag(svc, "--coordinator") == f"{coordinator_name}:{coord_port}", name


def test_workers_advertise_their_own_service_name(workers):
    # Peers dial each other (TCPStore, NCCL) by this name on the compose network.
    for name, svc in workers.items():
        assert _flag(svc, "--advertise-host") == name
        assert _flag(svc, "--model")


def test_workers_share_model_cache_and_shm(compose, workers):
    caches = {frozenset(s for s in _mounts(svc).values() if s) for svc in workers.values()}
    shared = frozenset.intersection(*caches)
    assert shared, "workers share no named volume (model cache)"
    assert shared <= set(compose.get("volumes") or {})
    for name, svc in workers.items():
        assert svc.get("ipc") == "host" or svc.get("shm_size"), f"{name}: default 64 MiB /dev/shm is too small for NCCL"
        assert svc.get("restart") == "unless-stopped", name


def test_services_build_from_the_dockerfile(services):
    for name, svc in services.items():
        build = svc.get("build")
        assert build, f"{name} has no build"
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / context / dockerfile).is_file(), f"{name}: {context}/{dockerfile} not found"
        # the coordinator's image is the torch-free target, a worker's the renderer
        stages = re.findall(r"^FROM \S+ AS (\S+)", (ROOT / context / dockerfile).read_text(), re.MULTILINE)
        assert build["target"] in stages and build["target"] == ("worker" if "worker" in name else "coordinator"), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_command_reflects_serving_status(services, coordinator_name):
    """Run the healthcheck one-liner against a real grpc.health.v1 server."""
    coord = services[coordinator_name]
    argv = coord["healthcheck"]["test"]
    assert argv[:3] == ["CMD", "python", "-c"], argv
    listen_port = _flag(coord, "--listen").rsplit(":", 1)[1]
    assert f":{listen_port}" in argv[3], "healthcheck probes a different port than --listen"
    port = _free_port()
    code = argv[3].replace(f":{listen_port}", f":{port}")

    def probe() -> int:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() != 0
    finally:
        server.stop(None)
    assert probe() != 0, "healthcheck passes with nothing listening"
