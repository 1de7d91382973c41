"""`dspark up`: the real stack (tiny models) starts as child processes whose command lines name
their role, prints the URL, serves the target's greedy output and stops on SIGTERM; and the
supervisor (with stand-in children, so it runs fast) restarts a child that dies, with backoff,
while the others keep running, and stops router, verifiers, drafters in that order."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from drafter_svc.checkpoint import save_checkpoint
from dspark_common.settings import UpSettings
from router.up import Supervisor
from tests.router_stack import (
    MODEL_NAME,
    child_env,
    dspark_cmd,
    free_port,
    models,
    router_tokenizer,
    save_model_dir,
    target_only,
)
from tests.service_stack import wait_for

FAKE = [sys.executable, str(Path(__file__).with_name("fake_dspark.py"))]


def children_of(pid: int) -> dict[int, str]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                out[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except FileNotFoundError:
                pass
    return out


async def complete(url: str, prompt: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12,
                                                              "temperature": 0}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["choices"][0]["text"]


async def test_up_real_stack(tmp_path):
    target, drafter = models()
    model_dir = save_model_dir(target, tmp_path / MODEL_NAME)
    save_checkpoint(drafter, drafter.config, tmp_path / "drafter", include_frozen=True)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *dspark_cmd("up", "--port", str(port), "--grpc-port", "-1", "--model", str(model_dir), "--checkpoint",
                    str(tmp_path / "drafter")),
        env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    lines: list[str] = []
    serving = asyncio.Event()

    async def read():
        while line := await proc.stdout.readline():
            lines.append(line.decode().rstrip())
            if "dspark up: serving" in lines[-1]:
                serving.set()

    reader = asyncio.ensure_future(read())
    try:
        await asyncio.wait_for(serving.wait(), 150)
        url = f"http://127.0.0.1:{port}"
        assert any(url in line for line in lines)
        tok = router_tokenizer()
        assert await complete(url, "hello up") == tok.decode(target_only(target, tok.encode("hello up"), 12))
        kids = children_of(proc.pid)
        roles = {role: pid for pid, cmd in kids.items() for role in ("drafter", "verifier", "router")
                 if f"dspark {role} " in cmd}
        assert set(roles) == {"drafter", "verifier", "router"}, kids
        assert all("--threads 1" in kids[roles[r]] for r in ("drafter", "verifier"))  # a small machine
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 40) == 0
        for pid in kids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert any("dspark up: stopped" in line for line in lines)
    finally:
        if proc.returncode is None:
            for pid in children_of(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            await proc.wait()
        reader.cancel()


async def test_supervisor_restarts_and_stops_in_order(tmp_path, monkeypatch):
    log = tmp_path / "stops.log"
    monkeypatch.setenv("FAKE_DSPARK_LOG", str(log))
    settings = UpSettings.from_sources(None, env={}, port=free_port(), grpc_port=-1, verifiers=2, drafters=1,
                                       model="some-dir", max_backoff_s=2.0, startup_timeout_s=30)
    out = io.StringIO()
    sup = Supervisor(settings, command=FAKE, out=out)
    assert not sup.staged  # not a GGUF: everything starts at once
    await sup.start()
    try:
        assert "dspark up: serving http://127.0.0.1:" in out.getvalue()
        assert "threads=1 omp=1" in out.getvalue()
        by_name = {c.name: c for c in sup.children}
        assert set(by_name) == {"drafter-0", "verifier-0", "verifier-1", "router"}
        v0 = by_name["verifier-0"]
        assert v0.args[v0.args.index("--drafter") + 1] == by_name["drafter-0"].address
        others = {n: c.proc.pid for n, c in by_name.items() if n != "verifier-0"}
        for round_ in (1, 2):
            old = v0.proc.pid
            v0.proc.kill()
            await wait_for(lambda: _restarted(v0, old), timeout=15)
            await wait_for(lambda: sup.healthy(v0), timeout=15)
            assert v0.restarts == round_
        assert "verifier-0 exited with code -9; restarting in 1.0 s" in out.getvalue()
        assert "restarting in 2.0 s" in out.getvalue()  # backoff doubled
        assert "--drafter-wait-s" not in v0.args  # restarts use the verifier's default wait
        assert {n: c.proc.pid for n, c in by_name.items() if n != "verifier-0"} == others  # untouched
    finally:
        await sup.stop()
    assert log.read_text().split("\n")[:4] == ["router stopped", "verifier stopped", "verifier stopped",
                                              "drafter stopped"]
    assert all(c.proc.returncode == 0 for c in sup.children)


async def _restarted(c, old_pid: int) -> bool:
    return c.proc is not None and c.proc.pid != old_pid and c.proc.returncode is None
