"""compose/cpu.yml run end to end without Docker: its services start as plain local processes —
the same commands, the same environment — with two drafters and two verifiers, and a request
goes through the router over HTTP.

What is substituted, and why (everything else comes from the compose file as it is):
- DSPARK_HOST 0.0.0.0 -> 127.0.0.1, and DSPARK_PORT / DSPARK_GRPC_PORT / DSPARK_METRICS_PORT -> free ports: replicas
  share this machine's network instead of having a container each;
- DSPARK_REDIS_URL redis://redis:6379/0 -> this machine's Redis, database 11 (emptied before
  and after), in place of the `redis` service;
- OTEL_TRACES_EXPORTER -> none and no OTEL_EXPORTER_OTLP_ENDPOINT: the collector and Jaeger (and
  Prometheus) are containers only;
- HF_HOME dropped (the container's cache volume path) and DSPARK_THREADS -> 1 (a shared 2-core
  machine).
The models are the file's real defaults (the packaged SmolLM2 target and the committed drafter):
the servers have no tiny-model switch, so requests generate few tokens. The one-shot `models` job
runs first, and each long-running service is waited for with the file's own healthcheck command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from dspark_common.settings import DrafterSettings, VerifierSettings
from tests import compose_files as cf

REDIS_DB = 11
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
REPLICAS = {"drafter": 2, "verifier": 2}
START_TIMEOUT_S = 600.0
BIN = Path(sys.executable).parent


def _missing() -> str | None:
    """Why the stack cannot run here yet (None when it can)."""
    if not (cf.REPO / "router" / "server.py").is_file():
        return "the router (router/server.py) is not there yet"
    help_run = subprocess.run([str(BIN / "dspark"), "router", "--help"], capture_output=True, text=True, timeout=120)
    if help_run.returncode != 0:
        return f"`dspark router --help` fails: {help_run.stderr.strip()[-300:]}"
    lacking = [c.__name__ for c in (VerifierSettings, DrafterSettings) if "redis_url" not in c.model_fields]
    if lacking:
        return (f"verifiers and drafters do not register themselves in Redis yet ({', '.join(lacking)} "
                "have no redis_url / DSPARK_REDIS_URL), so the router cannot find scaled replicas")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as e:
        return f"no Redis on 127.0.0.1:6379 ({e})"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_env(service: dict, ports: dict[str, int]) -> dict[str, str]:
    """The service's compose environment with this machine's substitutions (module docstring)."""
    env = cf.environment(service)
    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "HF_HOME"):
        env.pop(key, None)
    if "OTEL_TRACES_EXPORTER" in env:
        env["OTEL_TRACES_EXPORTER"] = "none"
    if "DSPARK_HOST" in env:
        env["DSPARK_HOST"] = "127.0.0.1"
    if "DSPARK_REDIS_URL" in env:
        env["DSPARK_REDIS_URL"] = REDIS_URL
    if "DSPARK_THREADS" in env or env.get("DSPARK_DEVICE") == "cpu":
        env["DSPARK_THREADS"] = "1"
    for key, port in ports.items():
        assert key in env, f"the compose file sets no {key}"
        env[key] = str(port)
    return env


def process_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DSPARK_", "OTEL_"))}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}


def local_argv(argv: list[str]) -> list[str]:
    """`dspark ...` / `python ...` from the compose file, run with this virtualenv's programs."""
    head = {"dspark": str(BIN / "dspark"), "python": sys.executable}.get(argv[0])
    assert head is not None, f"no local equivalent of {argv[0]}"
    return [head, *argv[1:]]


@dataclass
class Proc:
    name: str
    service: str
    popen: subprocess.Popen
    env: dict[str, str]
    log: Path

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(lines[-n:])


class LocalStack:
    def __init__(self, doc: dict, logs: Path) -> None:
        self.doc = doc
        self.services = cf.services(doc)
        self.logs = logs
        self.procs: list[Proc] = []

    def _spawn(self, name: str, service: str, env: dict[str, str]) -> Proc:
        log = self.logs / f"{name}.log"
        with log.open("w") as out:
            popen = subprocess.Popen(local_argv(cf.argv(self.services[service]["command"])), cwd=cf.REPO,
                                     env=process_env(env), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = Proc(name, service, popen, env, log)
        self.procs.append(proc)
        return proc

    def run_job(self, name: str, timeout_s: float) -> None:
        """A one-shot service: run it to completion (service_completed_successfully)."""
        proc = self._spawn(name, name, local_env(self.services[name], {}))
        try:
            code = proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"job {name} did not finish in {timeout_s:.0f} s\n{proc.tail()}")
        assert code == 0, f"job {name} exited with {code}\n{proc.tail()}"

    def start(self, name: str, replica: int, ports: dict[str, int]) -> Proc:
        return self._spawn(f"{name}.{replica}", name, local_env(self.services[name], ports))

    def healthy(self, proc: Proc) -> bool:
        """The compose healthcheck of the process's service, run with its environment."""
        test = self.services[proc.service]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        run = subprocess.run(local_argv(test[1:]), env=process_env(proc.env), capture_output=True, timeout=30)
        return run.returncode == 0

    def wait_healthy(self, procs: list[Proc], timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        pending = list(procs)
        while pending:
            for p in list(pending):
                if p.popen.poll() is not None:
                    pytest.fail(f"{p.name} exited with {p.popen.returncode} before it was healthy\n{p.tail()}")
                if self.healthy(p):
                    pending.remove(p)
            if pending and time.monotonic() > end:
                pytest.fail(f"not healthy within {timeout_s:.0f} s: {[p.name for p in pending]}\n"
                            + "\n".join(p.tail() for p in pending))
            if pending:
                time.sleep(1.0)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        for p in reversed(self.procs):
            try:
                p.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(10)


def http(method: str, url: str, body: dict | None = None, timeout: float = 300.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


async def verifier_stats(address: str):
    from dspark_common.proto import verifier_pb2, verifier_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        return await verifier_pb2_grpc.VerifierStub(channel).Stats(verifier_pb2.VerifierStatsRequest(), timeout=10)


def poll(predicate, timeout_s: float = 30.0) -> bool:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture
def redis_db():
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    r.flushdb()
    yield r
    r.flushdb()
    r.close()


def test_cpu_stack_with_two_drafters_and_two_verifiers(tmp_path, redis_db):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    doc = cf.load("cpu.yml")
    order = cf.start_order(doc)
    stack = LocalStack(doc, tmp_path)
    local_only = {"redis", "otel-collector", "jaeger", "prometheus"}  # this machine's Redis; no containers
    addresses: dict[str, list[str]] = {"drafter": [], "verifier": []}
    router_url = ""
    try:
        for name in order:
            svc = stack.services[name]
            if name in local_only:
                continue
            if cf.is_one_shot(svc):
                stack.run_job(name, START_TIMEOUT_S)
                continue
            replicas = []
            for i in range(REPLICAS.get(name, 1)):
                env = cf.environment(svc)
                ports = {k: free_port() for k in ("DSPARK_PORT", "DSPARK_GRPC_PORT", "DSPARK_METRICS_PORT") if k in env}
                replicas.append(stack.start(name, i, ports))
                if name in addresses:
                    addresses[name].append(f"127.0.0.1:{ports['DSPARK_PORT']}")
                else:
                    router_url = f"http://127.0.0.1:{ports['DSPARK_PORT']}"
            stack.wait_healthy(replicas, START_TIMEOUT_S)

        # Every replica registered itself, and the router sees both verifiers live (registration
        # heartbeats and router probes run every second: allow a few).
        def registered(role: str) -> list[str]:
            prefix = f"dspark:replica:{role}:"
            return sorted(k.removeprefix(prefix) for k in redis_db.keys(prefix + "*"))

        def live_verifiers() -> list[str]:
            status, health = http("GET", router_url + "/healthz")
            return sorted(v["address"] for v in health.get("verifiers", []) if v["live"]) if status == 200 else []

        for role, want in addresses.items():
            assert poll(lambda: registered(role) == sorted(want)), (role, registered(role), want)
        assert poll(lambda: live_verifiers() == sorted(addresses["verifier"])), live_verifiers()
        status, models = http("GET", router_url + "/v1/models")
        model = models["data"][0]["id"]

        def chat(draft_length, content="Count from one to ten."):
            return http("POST", router_url + "/v1/chat/completions", {
                "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                "temperature": 0, "speculative": {"draft_length": draft_length}})

        status, spec = chat(4)
        assert status == 200, spec
        assert spec["choices"][0]["message"]["content"] and spec["usage"]["completion_tokens"] > 0
        assert spec["speculative"]["draft_tokens"] > 0, spec["speculative"]  # a drafter was used
        status, plain = chat(0)
        assert status == 200 and plain["choices"][0]["message"]["content"] == spec["choices"][0]["message"]["content"]

        # Concurrent requests spread over both verifiers; every verifier drafts with the drafters.
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: chat("auto", f"Say a word about the number {i}."), range(4)))
        assert all(s == 200 for s, _ in results), results
        stats = [asyncio.run(verifier_stats(a)) for a in addresses["verifier"]]
        assert all(s.rounds > 0 for s in stats), [(a, s.rounds) for a, s in zip(addresses["verifier"], stats)]
        linked = {link.address for s in stats for link in s.drafters if link.ready}
        assert linked == set(addresses["drafter"]), (linked, addresses["drafter"])
    except BaseException:
        print("\n".join(p.tail() for p in stack.procs), file=sys.stderr)
        raise
    finally:
        stack.stop()
