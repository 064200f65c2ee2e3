"""docker-compose.yml checked offline (no Docker engine here): the compose-spec schema, the services,
GPU reservations, healthchecks, loopback-only ports, one mount layout, and the executor's
`docker compose run` command against it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftpipe.core.config import RuntimeConfig
from ftpipe.core.executor import ENVIRONMENTS, compose_command

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
FTPIPE_SERVICES = {"sft", "awq-runner", "llama-cpp", "vllm-server", "tensorboard"}
GPU_SERVICES = {"sft", "awq-runner", "vllm-server"}
ROOT = RuntimeConfig().container_root  # "/workspace"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_spec_schema():
    result = _schema_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_file(tmp_path):
    # The validator really validates: an unknown service key fails.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    ipc: host  # vLLM", "    ipc_mode: host  # vLLM", 1))
    result = _schema_check(broken)
    assert result.returncode == 1 and "ipc_mode" in result.stdout + result.stderr


def test_services(services):
    assert set(services) == {"sft", "awq-runner", "llama-cpp", "vllm-server", "open-webui", "dozzle", "tensorboard", "ollama"}
    assert services["ollama"]["profiles"] == ["ollama"]
    # Jobs run on demand (`docker compose run`); `docker compose up` starts the serving stack only.
    assert {name for name, s in services.items() if s.get("profiles") == ["jobs"]} == {"sft", "awq-runner", "llama-cpp"}
    assert services["sft"]["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert services["awq-runner"]["build"] == {"context": ".", "dockerfile": "Dockerfile.awq-runner"}
    assert services["llama-cpp"]["build"]["dockerfile"] == "Dockerfile.llama-cpp"
    assert services["vllm-server"]["build"] == {"context": ".", "dockerfile": "Dockerfile.vllm-server"}


def test_images_are_pinned(services):
    # Built images pin every package through a lock file: tests/serve/test_dockerfiles.py.
    assert re.search(r"^vllm==\d+\.\d+\.\d+$", (REPO / "requirements/cuda/serve.lock").read_text(), re.M)
    for name in ("open-webui", "dozzle", "ollama"):
        tag = services[name]["image"].rsplit(":", 1)[1]
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), (name, tag)


def test_gpu_reservations(services):
    for name in GPU_SERVICES:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}], name
    assert services["vllm-server"]["ipc"] == "host"


def test_healthchecks(services):
    vllm = services["vllm-server"]["healthcheck"]
    assert "http://127.0.0.1:8000/health" in " ".join(vllm["test"])
    assert vllm["start_period"] == "600s"
    for name in ("vllm-server", "open-webui", "dozzle", "tensorboard", "ollama"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert services["open-webui"]["depends_on"] == {"vllm-server": {"condition": "service_healthy"}}


def test_every_published_port_is_bound_to_loopback(services):
    published = [(name, port) for name, s in services.items() for port in s.get("ports", [])]
    assert {name for name, _ in published} == {"vllm-server", "open-webui", "dozzle", "tensorboard", "ollama"}
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
    assert services["vllm-server"]["ports"] == ["127.0.0.1:${FTPIPE_VLLM_PORT:-8000}:8000"]


def test_one_mount_layout_and_the_host_user(services):
    for name in FTPIPE_SERVICES:
        s = services[name]
        assert s["volumes"] == [f".:{ROOT}"], name
        assert s["working_dir"] == ROOT, name
        assert s["user"] == "${FTPIPE_UID:-1000}:${FTPIPE_GID:-1000}", name
        assert s["environment"]["HF_HOME"] == f"{ROOT}/.cache/huggingface", name  # HF cache inside the project


def test_no_path_is_mounted_in_two_places(compose, services):
    target_of: dict[str, set[str]] = {}
    source_of: dict[str, set[str]] = {}
    for s in services.values():
        for volume in s.get("volumes", []):
            source, target = volume.split(":")[:2]
            target_of.setdefault(source, set()).add(target)
            source_of.setdefault(target, set()).add(source)
    assert {k: v for k, v in target_of.items() if len(v) > 1} == {}
    assert {k: v for k, v in source_of.items() if len(v) > 1} == {}
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(("/", "."))}
    assert named == set(compose["volumes"])


def test_served_model_comes_from_the_run(services):
    command = services["vllm-server"]["command"]
    assert command[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    model = command[command.index("--model") + 1]
    assert model.startswith(f"{ROOT}/${{FTPIPE_SERVED_MODEL")
    assert command[command.index("--served-model-name") + 1] == "${FTPIPE_SERVED_NAME:-ftpipe}"
    assert "--api-key" not in command  # the key comes from VLLM_API_KEY, never argv
    assert services["vllm-server"]["environment"]["VLLM_API_KEY"] == "${VLLM_API_KEY:-}"


def test_open_webui_and_dozzle(services):
    env = services["open-webui"]["environment"]
    assert env["OPENAI_API_BASE_URL"] == "http://vllm-server:8000/v1"
    assert env["ENABLE_OLLAMA_API"] == "false" and env["ENABLE_PERSISTENT_CONFIG"] == "false"
    label_filter = services["dozzle"]["environment"]["DOZZLE_FILTER"]
    key, value = label_filter.removeprefix("label=").split("=")
    assert services["dozzle"]["volumes"] == ["/var/run/docker.sock:/var/run/docker.sock:ro"]
    labelled = {name for name, s in services.items() if s.get("labels", {}).get(key) == value}
    assert labelled == FTPIPE_SERVICES | {"open-webui", "ollama"}


def test_env_example_lists_every_variable(compose):
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    example = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used - example == set()


@pytest.mark.parametrize("env_name", sorted(ENVIRONMENTS))
def test_executor_compose_command_matches_the_compose_file(services, env_name):
    env = ENVIRONMENTS[env_name]
    argv = compose_command(REPO, env, ["smoke-test", "--run", "r1"], uid=1234, gid=5678)
    assert argv[:4] == ["docker", "compose", "-f", str(COMPOSE)]
    service = argv[argv.index(env.service)]
    assert service in services and service in FTPIPE_SERVICES
    assert argv[argv.index(service) + 1:] == ["ftpipe", "smoke-test", "--run", "r1"]
    assert argv[argv.index("--user") + 1] == "1234:5678"
    spec = services[service]
    # The project is at the same place as runtime.container_root, so relative paths line up.
    assert spec["volumes"] == [f".:{ROOT}"] and spec["working_dir"] == ROOT
    # `ftpipe ...` replaces the command: no entrypoint may swallow it.
    assert "entrypoint" not in spec
    dockerfile = REPO / spec["build"]["dockerfile"]
    assert dockerfile.is_file(), f"{dockerfile.name} (service {service}) is missing"
    text = dockerfile.read_text()
    assert "ENTRYPOINT []" in text and "PYTHONPATH=/workspace/src" in text, dockerfile
    assert not re.search(r"^COPY \. ", text, re.M), f"{dockerfile}: COPY of the source under the mount"
