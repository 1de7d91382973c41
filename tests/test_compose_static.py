"""The Compose deployments (compose/gpu.yml, compose/cpu.yml, the DeepSeek-V4 override), checked
without a Docker engine: each file validates against the Compose Specification JSON schema, and
its wiring holds — images and Dockerfiles exist, every `dspark` command parses with the real CLI,
every DSPARK_* variable is a setting of that command, ports, healthchecks, depends_on, restart
policies, OpenTelemetry and Prometheus all point at what exists, and the replicated services can
be scaled (no fixed names or host ports)."""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from dspark_common import cli
from dspark_common.settings import (
    DrafterSettings,
    GenerateSettings,
    RouterSettings,
    Settings,
    UpSettings,
    VerifierSettings,
)
from tests import compose_files as cf

FILES = {"gpu": ("gpu.yml",), "cpu": ("cpu.yml",), "gpu-deepseek-v4": ("gpu.yml", "gpu.deepseek-v4.yml")}
COMMAND_SETTINGS: dict[str, type[Settings]] = {
    "verifier": VerifierSettings, "drafter": DrafterSettings, "router": RouterSettings,
    "generate": GenerateSettings, "up": UpSettings,
}
GRPC_SERVICE = {"verifier": "dspark.v1.Verifier", "drafter": "dspark.v1.Drafter"}
SCALED = ("verifier", "drafter")
# Settings the compose files set ahead of the servers: verifiers and drafters registering their own
# address in Redis is what makes `--scale` work, and `dspark verifier`/`dspark drafter` do not read
# DSPARK_REDIS_URL yet. While a pair here is still unknown to its settings class, the strict check
# below lets it through and test_settings_awaited_from_the_servers reports it as an expected
# failure; once the servers have it, both pass with no change here.
AWAITED = {("verifier", "DSPARK_REDIS_URL"), ("drafter", "DSPARK_REDIS_URL")}
OTEL_ENDPOINT = "http://otel-collector:4317"
# Variables a dspark container may set besides its DSPARK_* settings.
OTHER_ENV = re.compile(r"^(OTEL_[A-Z_]+|HF_HOME|HF_TOKEN|HF_HUB_OFFLINE)$")


@pytest.fixture(scope="module", params=sorted(FILES))
def deployment(request) -> tuple[str, dict]:
    return request.param, cf.load(*FILES[request.param])


def runs_dspark_image(svc: dict) -> bool:
    """Built from this project's Dockerfiles (compose/Dockerfile.cpu or .gpu)."""
    build = svc.get("build")
    return isinstance(build, dict) and build.get("dockerfile", "") in ("compose/Dockerfile.cpu",
                                                                       "compose/Dockerfile.gpu")


def dspark_services(doc: dict) -> dict[str, tuple[str, list[str], dict]]:
    """name -> (subcommand, args after it, service) for every service running `dspark ...`."""
    out = {}
    for name, svc in cf.services(doc).items():
        argv = cf.argv(svc.get("command"))
        if argv[:1] == ["dspark"]:
            out[name] = (argv[1], argv[2:], svc)
    return out


def parse_dspark(argv: list[str]) -> argparse.Namespace:
    """Parse `dspark ARGV` with the CLI's own parser (cli.COMMANDS and each module's
    add_arguments); an unknown subcommand or flag fails the test."""
    assert argv and argv[0] in cli.COMMANDS, f"`dspark {' '.join(argv)}`: no such subcommand ({sorted(cli.COMMANDS)})"
    full = argparse.ArgumentParser(prog="dspark")
    full.add_argument("--log-level", default="INFO")
    sub = full.add_subparsers(dest="command", required=True)
    for name, (module, _) in cli.COMMANDS.items():
        p = sub.add_parser(name)
        if name == argv[0]:
            importlib.import_module(module).add_arguments(p)
    try:
        args, extra = full.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"`dspark {' '.join(argv)}` is rejected by its argparse parser")
    assert not extra, f"`dspark {' '.join(argv)}`: unknown arguments {extra}"
    return args


# ---------------------------------------------------------------------------- schema


@pytest.mark.parametrize("name", ["gpu.yml", "cpu.yml", "gpu.deepseek-v4.yml"])
def test_each_file_validates_against_the_compose_spec(name):
    assert cf.schema_errors(cf.load(name)) == []


def test_merged_deployments_validate(deployment):
    _, doc = deployment
    assert cf.schema_errors(doc) == []


def test_the_schema_catches_mistakes():
    """The validator is live: typos and wrong types in a service are reported."""
    doc = cf.load("cpu.yml")
    doc["services"]["verifier"]["healthcheck"]["intervall"] = "5s"
    doc["services"]["drafter"]["restart"] = 3
    doc["services"]["router"]["depends_on"]["redis"]["condition"] = "healthy"
    errors = "\n".join(cf.schema_errors(doc))
    assert "intervall" in errors and "restart" in errors and "depends_on" in errors


def test_interpolation_follows_compose_rules():
    assert cf.interpolate("${A:-x}-${B-y}-$$C-${D}", {"B": ""}) == "x--$C-"
    assert cf.interpolate("${A:-x}/${A:+set}", {"A": "a"}) == "a/set"
    with pytest.raises(ValueError):
        cf.interpolate("${A:?needed}", {})


# ---------------------------------------------------------------------------- images and builds


def test_builds_and_images_exist(deployment):
    _, doc = deployment
    for name, svc in cf.services(doc).items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            context = (cf.COMPOSE_DIR / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} is missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        else:  # third-party images: pinned, never :latest
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of compose/NAME, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (cf.COMPOSE_DIR / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _args(steps: list[tuple[str, str]]) -> dict[str, str]:
    return {m.group(1): m.group(2) for op, rest in steps if op == "ARG"
            for m in [re.match(r"(\w+)=(\S+)", rest)] if m}


@pytest.mark.parametrize("dockerfile,base", [
    ("Dockerfile.gpu", r"^pytorch/pytorch:[\w.]+-cuda[\w.]+-cudnn\d+-runtime$"),
    ("Dockerfile.cpu", r"^python:3\.11-slim$"),
])
def test_dspark_images(dockerfile, base):
    steps = _dockerfile(dockerfile)
    args = _args(steps)
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest) for op, rest in steps if op == "FROM"]
    assert len(froms) == 1 and re.match(base, froms[0]), froms
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert "python -m dspark_common.protogen" in runs, "protobuf stubs are generated at build"
    users = [rest for op, rest in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    copies = [rest for op, rest in steps if op in ("COPY", "ADD")]
    assert not any(re.search(r"\bmodels\b|\.safetensors|\.gguf|\.bin\b", c) for c in copies), copies
    assert "hf download" not in runs and "from_pretrained" not in runs, "no model weights are baked in"
    if dockerfile == "Dockerfile.cpu":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert re.search(r"pip install --index-url \"\$\{TORCH_INDEX_URL\}\" \"torch==\$\{TORCH_VERSION\}\"", runs)
    for c in copies:  # every source the image copies is inside the build context .dockerignore leaves
        for src in c.split()[:-1]:
            if not src.startswith("--"):
                assert not _docker_ignored(src), f"{dockerfile} copies {src}, which .dockerignore excludes"


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `**` any folders, `*` and `?` within one name."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _docker_ignored(path: str) -> bool:
    """Whether the root .dockerignore leaves `path` out of the build context: the last rule that
    matches the path or one of its parent folders wins, `!` rules put it back."""
    rules = [r.strip() for r in (cf.REPO / ".dockerignore").read_text().splitlines()
             if r.strip() and not r.strip().startswith("#")]
    parts = Path(path.rstrip("/")).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.lstrip("!").strip("/")
        if any(_ignore_regex(pattern).match(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_weights_and_local_state_out():
    for path in ["models/dspark-smollm2-135m/model.safetensors", "runs/smollm2/fit/x.pt", ".venv/bin/python",
                 "dspark_common/_proto/dspark/v1/common_pb2.py", "drafter_svc/__pycache__/x.pyc", ".git/HEAD",
                 "docs/TRAINING.md", "router/weights.safetensors"]:
        assert _docker_ignored(path), path
    for path in ["pyproject.toml", "protos/dspark/v1/common.proto", "dspark_common/settings.py", "router/server.py",
                 "verifier_svc/server.py", "drafter_svc/server.py", "bench/gpu_check.py"]:
        assert not _docker_ignored(path), path


def test_otel_collector_image():
    steps = _dockerfile("Dockerfile.otel-collector")
    args = _args(steps)
    assert re.match(r"^otel/opentelemetry-collector-contrib:\d+\.\d+\.\d+$", args["OTELCOL_IMAGE"])
    assert [rest for op, rest in steps if op == "USER"][-1] not in ("root", "0")


# ---------------------------------------------------------------------------- commands and settings


def test_dspark_commands_parse_and_set_known_settings(deployment):
    label, doc = deployment
    services = dspark_services(doc)
    assert {"drafter", "verifier", "router"} <= set(services), sorted(services)
    for name, (command, rest, svc) in services.items():
        args = parse_dspark([command, *rest])
        settings_cls = COMMAND_SETTINGS[command]
        # The mapping is right: the command's parser has one option per field of the class.
        assert set(settings_cls.model_fields) <= set(vars(args)), (command, settings_cls.__name__)
        env = cf.environment(svc)
        dspark_env = {k: v for k, v in env.items() if k.startswith("DSPARK_")}
        unknown = sorted(set(dspark_env) - settings_cls.known_env_vars() - {v for c, v in AWAITED if c == command})
        assert not unknown, f"{label}/{name}: `dspark {command}` has no setting for {unknown}"
        others = sorted(k for k in env if not k.startswith("DSPARK_") and not _other_env_ok(k))
        assert not others, f"{label}/{name}: unexpected variables {others}"
        # The values validate as the service would read them (flags beat the environment).
        settings_cls.from_sources(args, env=dspark_env)


def test_settings_awaited_from_the_servers():
    missing = sorted(f"`dspark {c}` {v}" for c, v in AWAITED if v not in COMMAND_SETTINGS[c].known_env_vars())
    if missing:
        pytest.xfail("the compose files set settings the servers do not read yet: " + ", ".join(missing))


def _other_env_ok(key: str) -> bool:
    return bool(OTHER_ENV.match(key))


def test_other_commands_exist():
    """Services that run something else than dspark: the hub CLI's download, whose options exist."""
    hf = Path(sys.executable).with_name("hf")
    helptext = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True, timeout=120,
                              check=True).stdout
    for label, files in FILES.items():
        for name, svc in cf.services(cf.load(*files)).items():
            argv = cf.argv(svc.get("command"))
            if not runs_dspark_image(svc) or argv[:1] == ["dspark"]:
                continue
            assert argv[:2] == ["hf", "download"], f"{label}/{name}: {argv}"
            for opt in (a for a in argv if a.startswith("--")):
                assert opt in helptext, f"{label}/{name}: `hf download` has no {opt}"


def test_models_and_devices():
    gpu, cpu, v4 = (cf.load(*FILES[k]) for k in ("gpu", "cpu", "gpu-deepseek-v4"))
    g = {n: cf.environment(s) for n, s in cf.services(gpu).items()}
    assert g["verifier"]["DSPARK_MODEL"] == g["router"]["DSPARK_MODEL"] == "Qwen/Qwen3-4B"
    assert g["drafter"]["DSPARK_CHECKPOINT"].endswith("/deepseek-ai/dspark_qwen3_4b_block7")
    fetch = {n: cf.argv(s["command"]) for n, s in cf.services(gpu).items() if n.startswith("fetch-")}
    assert fetch["fetch-target"][2] == "Qwen/Qwen3-4B"
    assert fetch["fetch-drafter"][2] == "deepseek-ai/dspark_qwen3_4b_block7"
    assert fetch["fetch-drafter"][fetch["fetch-drafter"].index("--local-dir") + 1] == g["drafter"]["DSPARK_CHECKPOINT"]
    for role in SCALED:
        assert g[role]["DSPARK_DEVICE"] == "cuda" and g[role]["DSPARK_DTYPE"] == "bfloat16"
        devices = cf.services(gpu)[role]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    overridden = cf.environment(cf.services(v4)["verifier"])
    assert overridden["DSPARK_MODEL"] == "deepseek-ai/DeepSeek-V4-Flash"
    assert cf.services(v4)["verifier"]["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert cf.environment(cf.services(v4)["drafter"])["DSPARK_CHECKPOINT"].endswith("/DeepSeek-V4-Flash-DSpark")
    for role in SCALED:
        env = cf.environment(cf.services(cpu)[role])
        assert env["DSPARK_DEVICE"] == "cpu" and "deploy" not in cf.services(cpu)[role]
    assert cf.environment(cf.services(cpu)["verifier"])["DSPARK_MODEL"] == "smollm2"
    assert cf.environment(cf.services(cpu)["drafter"])["DSPARK_CHECKPOINT"] == "default"
    # the committed drafter is mounted where DEFAULT_DRAFTER_DIR resolves inside the image (/app)
    assert "../models:/app/models:ro" in cf.services(cpu)["drafter"]["volumes"]


def test_hub_downloads_land_in_a_named_volume(deployment):
    _, doc = deployment
    named = set(doc.get("volumes") or {})
    for name, svc in cf.services(doc).items():
        hf_home = cf.environment(svc).get("HF_HOME")
        if not runs_dspark_image(svc):
            continue
        assert hf_home, f"{name}: set HF_HOME"
        mounts = [v.split(":") for v in svc.get("volumes") or []]
        assert any(src in named and hf_home.startswith(dst.rstrip("/") + "/") for src, dst, *_ in mounts), \
            f"{name}: HF_HOME {hf_home} is not on a named volume"


# ---------------------------------------------------------------------------- ports, health, order


def _healthcheck_code(svc: dict) -> str | None:
    test = svc.get("healthcheck", {}).get("test")
    if isinstance(test, list) and test[:3] == ["CMD", "python", "-c"]:
        return test[3]
    return None


def test_ports_and_healthchecks(deployment):
    label, doc = deployment
    for name, (command, _, svc) in dspark_services(doc).items():
        env = cf.environment(svc)
        if command not in ("verifier", "drafter", "router"):
            continue
        assert env["DSPARK_HOST"] == "0.0.0.0", f"{name} listens on every interface of its container"
        port = int(env["DSPARK_PORT"])
        assert port in cf.container_ports(svc), f"{label}/{name}: port {port} is not exposed"
        code = _healthcheck_code(svc)
        assert code is not None, f"{label}/{name}: healthcheck must be a python -c check"
        ast.parse(code)  # it is Python
        assert "os.environ['DSPARK_PORT']" in code, "the check probes the port the service listens on"
        if command in GRPC_SERVICE:  # a real gRPC health check of the service itself
            assert "HealthStub" in code and f"service='{GRPC_SERVICE[command]}'" in code
            module = importlib.import_module(cli.COMMANDS[command][0])
            assert module.SERVICE_NAME == GRPC_SERVICE[command]
            assert "SERVING" in code
        else:
            assert "/healthz" in code and "status != 200" in code
            published = cf.published_ports(svc)
            assert port in published and int(env["DSPARK_GRPC_PORT"]) in published, \
                f"{label}/router publishes HTTP and gRPC"
    for name, svc in cf.services(doc).items():
        if cf.is_one_shot(svc):
            assert "healthcheck" not in svc, f"{name}: a one-shot job is waited for by completion"
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{label}/{name}: needs a healthcheck"
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), name
        assert str(svc.get("restart")) in ("unless-stopped", "always", "on-failure"), f"{name}: restart policy"


def test_depends_on_waits_for_health(deployment):
    label, doc = deployment
    svcs = cf.services(doc)
    cf.start_order(doc)  # no cycles
    for name, svc in svcs.items():
        for dep, condition in cf.depends_on(svc).items():
            assert dep in svcs, f"{name} depends on unknown {dep}"
            if cf.is_one_shot(svcs[dep]):
                assert condition == "service_completed_successfully", f"{name} -> {dep}"
            else:
                assert condition == "service_healthy", f"{label}: {name} -> {dep} must wait for service_healthy"
                assert "healthcheck" in svcs[dep], dep
        redis_url = cf.environment(svc).get("DSPARK_REDIS_URL")
        if redis_url:
            host = urlparse(redis_url).hostname
            assert host in svcs and "6379" in redis_url, f"{name}: {redis_url}"
            assert cf.depends_on(svc).get(host) == "service_healthy", f"{name} must wait for healthy {host}"
    # the data path starts in order: drafters before verifiers before the router
    assert cf.depends_on(svcs["verifier"]).get("drafter") == "service_healthy"
    assert cf.depends_on(svcs["router"]).get("verifier") == "service_healthy"


def test_replicas_register_in_redis_and_scale(deployment):
    """`--scale drafter=3 --scale verifier=2` works: replicas have no fixed container name or host
    port, and each finds the others through Redis rather than by a fixed address."""
    label, doc = deployment
    svcs = cf.services(doc)
    for role in SCALED:
        svc = svcs[role]
        assert "container_name" not in svc and not svc.get("ports"), f"{label}/{role} cannot be scaled"
        assert "hostname" not in svc, f"{label}/{role}: a fixed hostname would be shared by every replica"
        env = cf.environment(svc)
        assert env.get("DSPARK_REDIS_URL"), f"{label}/{role} registers itself in Redis"
    assert not cf.environment(svcs["verifier"]).get("DSPARK_DRAFTER"), "verifiers find drafters in Redis"
    assert not cf.environment(svcs["router"]).get("DSPARK_VERIFIER"), "the router finds verifiers in Redis"
    assert cf.environment(svcs["router"])["DSPARK_REDIS_URL"] == cf.environment(svcs["verifier"])["DSPARK_REDIS_URL"]


# ---------------------------------------------------------------------------- traces and metrics


def test_every_service_sends_traces_to_the_collector(deployment):
    label, doc = deployment
    svcs = cf.services(doc)
    names = set()
    for name, (command, _, svc) in dspark_services(doc).items():
        if cf.is_one_shot(svc):
            continue
        env = cf.environment(svc)
        assert env.get("OTEL_TRACES_EXPORTER") == "otlp", name
        assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == OTEL_ENDPOINT, name
        assert env.get("OTEL_SERVICE_NAME", "").startswith("dspark-"), name
        names.add(env["OTEL_SERVICE_NAME"])
        assert cf.depends_on(svc).get("otel-collector") == "service_healthy", name
    assert len(names) == len([n for n, (_, _, s) in dspark_services(doc).items() if not cf.is_one_shot(s)])
    collector = svcs["otel-collector"]
    assert 4317 in cf.container_ports(collector)
    mount = next(v for v in collector["volumes"] if v.startswith("./otel-collector.yml:"))
    config_path = mount.split(":")[1]
    assert f"--config={config_path}" in cf.argv(collector["command"])
    config = yaml.safe_load((cf.COMPOSE_DIR / "otel-collector.yml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    for exporter in traces["exporters"]:
        host, port = config["exporters"][exporter]["endpoint"].rsplit(":", 1)
        assert host in svcs and int(port) in cf.container_ports(svcs[host]), exporter
    assert "jaeger" in svcs and 16686 in cf.published_ports(svcs["jaeger"])
    health = config["extensions"]["health_check"]["endpoint"]
    assert health.rsplit(":", 1)[1] in " ".join(collector["healthcheck"]["test"])
    assert "health_check" in config["service"]["extensions"]


def test_prometheus_scrapes_every_metrics_endpoint(deployment):
    label, doc = deployment
    svcs = cf.services(doc)
    prom = svcs["prometheus"]
    assert any(v.startswith("./prometheus.yml:") for v in prom["volumes"])
    assert 9090 in cf.published_ports(prom)
    config = yaml.safe_load((cf.COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for target in targets:
        host, port = target.rsplit(":", 1)
        if host == "localhost":
            continue
        assert host in svcs and int(port) in cf.container_ports(svcs[host]), f"{label}: scrape target {target}"
    # every dspark service with a /metrics endpoint is scraped: the router's HTTP port
    for name, (command, _, svc) in dspark_services(doc).items():
        if command == "router":
            assert f"{name}:{cf.environment(svc)['DSPARK_PORT']}" in targets
    collector = yaml.safe_load((cf.COMPOSE_DIR / "otel-collector.yml").read_text())
    port = collector["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]["port"]
    assert f"otel-collector:{port}" in targets


# ---------------------------------------------------------------------------- docs


def test_deploy_doc_covers_the_commands():
    text = (cf.REPO / "docs" / "DEPLOY.md").read_text()
    assert text.startswith("# Deploy with Docker Compose")
    for needle in ["docker compose -f compose/gpu.yml up", "--scale drafter=3 --scale verifier=2",
                   "compose/cpu.yml", "compose/gpu.deepseek-v4.yml", "16686", "9090", "TARGET_MODEL",
                   "DRAFTER_REPO", "Qwen/Qwen3-4B", "deepseek-ai/dspark_qwen3_4b_block7", "compose/gpu_check.sh"]:
        assert needle in text, needle
