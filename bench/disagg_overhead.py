"""Disaggregation overhead: the in-process decode loop vs a real drafter + verifier on grpc.aio
loopback, in ONE process over the SAME loaded target and drafter model objects.

    python -m bench.disagg_overhead --prompts 3 --max-new-tokens 32 --draft-length 4 \
        --out docs/perf/disagg_overhead.json

Per prompt (a/b interleaved to cancel drift): (a) `DecodeLoop` start + rounds in process, (b) the
verifier's Decode stream driven through the generated stubs. Per-token latency = wall time after
the first token (prefill) until the generation ends, divided by the tokens generated after it.
Greedy outputs must be token-identical. Bytes: the serialized protobuf size (`ByteSize()`, no gRPC
5-byte message header, no HTTP/2 framing) of every DraftMessage (verifier -> drafter) and
DraftReply (drafter -> verifier), counted on the verifier's side of the stream (`DrafterLink`).

`--drafter-process` runs the drafter as its own process (`dspark drafter`, as deployed) instead of
in the benchmark's process: the verifier and the drafter then no longer share one interpreter
lock, so the figure is the deployment's, not a single-process artefact."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from drafter_svc import server as drafter_server  # noqa: E402
from dspark_common.proto import common_pb2, verifier_pb2, verifier_pb2_grpc  # noqa: E402
from dspark_common.settings import DrafterSettings, GenerateSettings, VerifierSettings  # noqa: E402
from verifier_svc.decode_loop import GenerationRequest  # noqa: E402
from verifier_svc.local_stack import build_local_loop  # noqa: E402
from verifier_svc.scheduler import SpsTable  # noqa: E402
from verifier_svc.server import VerifierServer  # noqa: E402
from verifier_svc.target_loading import chat_prompt_ids  # noqa: E402

PROMPTS = Path("/work/shared/data/prompts/eval/gsm8k-tail319.jsonl")

BYTES = {"to_drafter": 0, "to_verifier": 0, "messages_to_drafter": 0, "messages_to_verifier": 0,
         "first_to_drafter": 0}


def _install_byte_counter() -> None:
    """Wrap the verifier's DrafterLink so every request and reply message is sized."""
    from verifier_svc.drafter_client import DrafterLink

    call, send = DrafterLink.call, DrafterLink.send

    def count_out(msg) -> None:
        if BYTES["messages_to_drafter"] == 0:  # the session's open: carries the prompt's features
            BYTES["first_to_drafter"] = msg.ByteSize()
        BYTES["to_drafter"] += msg.ByteSize()
        BYTES["messages_to_drafter"] += 1

    async def counted_call(self, msg, timeout):
        count_out(msg)
        reply = await call(self, msg, timeout)
        BYTES["to_verifier"] += reply.ByteSize()
        BYTES["messages_to_verifier"] += 1
        return reply

    def counted_send(self, msg):
        count_out(msg)
        return send(self, msg)

    DrafterLink.call, DrafterLink.send = counted_call, counted_send


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _start_drafter_process(checkpoint: str):
    """`dspark drafter` as a child process; returns (process, address) once it answers Info."""
    import subprocess
    import sys

    import grpc

    from dspark_common.proto import drafter_pb2, drafter_pb2_grpc

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSPARK_REDIS_URL": ""}
    proc = subprocess.Popen([sys.executable, "-m", "dspark_common.cli", "drafter", "--port", str(port),
                             "--checkpoint", checkpoint, "--host", "127.0.0.1", "--threads", "1"], env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the drafter process exited with {proc.returncode}")
        try:
            # Info carries the context projection (fc + hidden_norm) weights: ~5 MB
            async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
                await drafter_pb2_grpc.DrafterStub(ch).Info(drafter_pb2.DrafterInfoRequest(), timeout=2)
            return proc, address
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.5)
    proc.kill()
    raise RuntimeError("the drafter process did not come up within 180 s")


def load_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    with PROMPTS.open() as f:
        for line in f:
            if len(out) >= n:
                break
            out.append(chat_prompt_ids(tokenizer, json.loads(line)["turns"][0]))
    return out


def run_local(stack, prompt: list[int], max_new: int, dl: int) -> dict:
    loop = stack.loop
    req = GenerationRequest(list(prompt), max_new, draft_length=dl, stop_ids=stack.stop_ids)
    t_open = time.perf_counter()
    s = loop.start(req)
    t_first = time.perf_counter()
    n_first = len(s.output)
    accepted = rounds = 0
    try:
        while not s.done:
            r = loop.round([s])[0]
            accepted += r.accepted
            rounds += 1
    finally:
        loop.release(s)
    t_end = time.perf_counter()
    after = len(s.output) - n_first
    return dict(tokens=list(s.output), ttft_s=t_first - t_open, decode_s=t_end - t_first, after_first=after,
                per_token_ms=(t_end - t_first) / max(after, 1) * 1e3, rounds=rounds, accepted=accepted)


async def run_service(stub, prompt: list[int], max_new: int, dl: int, stop_ids) -> dict:
    req = verifier_pb2.DecodeRequest(open=verifier_pb2.OpenSession(
        prompt_ids=prompt, max_new_tokens=max_new, draft_length=verifier_pb2.DraftLength(tokens=dl),
        sampling=common_pb2.SamplingParams(temperature=0.0), stop_ids=sorted(stop_ids)))
    for k in BYTES:
        BYTES[k] = 0
    tokens: list[int] = []
    accepted = rounds = n_first = 0
    t_first = t_end = None
    t_open = time.perf_counter()
    async for ev in stub.Decode(iter([req]), timeout=600):
        kind = ev.WhichOneof("kind")
        if kind == "round":
            tokens.extend(ev.round.tokens)
            if ev.round.prefill:
                t_first, n_first = time.perf_counter(), len(ev.round.tokens)
            else:
                rounds += 1
                accepted += ev.round.accepted
                t_end = time.perf_counter()
        elif kind == "summary":
            t_end = time.perf_counter() if t_end is None else t_end
    await asyncio.sleep(0.05)  # let the release/close messages land before reading the counters
    after = len(tokens) - n_first
    return dict(tokens=tokens, ttft_s=t_first - t_open, decode_s=t_end - t_first, after_first=after,
                per_token_ms=(t_end - t_first) / max(after, 1) * 1e3, rounds=rounds, accepted=accepted,
                bytes=dict(BYTES))


async def main(args) -> dict:
    torch.set_num_threads(1)
    _install_byte_counter()
    stack = build_local_loop(GenerateSettings(threads=1), profile=False)
    target_model = stack.loop.target.model
    drafter_model = stack.loop.proposer._model
    prompts = load_prompts(stack.tokenizer, args.prompts)

    proc = drafter = None
    if args.drafter_process:
        proc, address = await _start_drafter_process("default")
    else:
        drafter = drafter_server.DrafterServer(drafter_model, DrafterSettings.from_sources(None, env={}, port=0))
        await drafter.start()
        address = drafter.address
    vs = VerifierSettings.from_sources(None, env={}, port=0, drafter=[address], profile_sps=False,
                                       drafter_wait_s=30.0)
    verifier = VerifierServer(target_model, vs, sps=SpsTable({1: 1.0}))
    await verifier.start()
    import grpc

    channel = grpc.aio.insecure_channel(verifier.address)
    stub = verifier_pb2_grpc.VerifierStub(channel)
    try:
        # warm-up (both paths), not measured
        wp = prompts[0]
        run_local(stack, wp, 4, args.draft_length)
        await run_service(stub, wp, 4, args.draft_length, stack.stop_ids)
        rows = []
        for i, p in enumerate(prompts):
            order = ("a", "b") if i % 2 == 0 else ("b", "a")
            res = {}
            for which in order:
                if which == "a":
                    res["a"] = run_local(stack, p, args.max_new_tokens, args.draft_length)
                else:
                    res["b"] = await run_service(stub, p, args.max_new_tokens, args.draft_length, stack.stop_ids)
            a, b = res["a"], res["b"]
            acc = max(b["accepted"], 1)
            row = dict(prompt=i, prompt_tokens=len(p), order="".join(order), identical=a["tokens"] == b["tokens"],
                       tokens=len(b["tokens"]), after_first=b["after_first"],
                       local_per_token_ms=a["per_token_ms"], service_per_token_ms=b["per_token_ms"],
                       ratio=b["per_token_ms"] / a["per_token_ms"] - 1,
                       local_ttft_ms=a["ttft_s"] * 1e3, service_ttft_ms=b["ttft_s"] * 1e3,
                       rounds_local=a["rounds"], rounds_service=b["rounds"],
                       accepted_local=a["accepted"], accepted_service=b["accepted"],
                       bytes=b["bytes"],
                       bytes_per_accepted_to_drafter=b["bytes"]["to_drafter"] / acc,
                       bytes_per_accepted_to_verifier=b["bytes"]["to_verifier"] / acc,
                       bytes_per_token_to_drafter=b["bytes"]["to_drafter"] / max(len(b["tokens"]), 1),
                       bytes_per_token_to_verifier=b["bytes"]["to_verifier"] / max(len(b["tokens"]), 1),
                       bytes_per_accepted_to_drafter_after_prefill=(
                           b["bytes"]["to_drafter"] - b["bytes"]["first_to_drafter"]) / acc)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}), flush=True)
    finally:
        await channel.close()
        await verifier.stop()
        if drafter is not None:
            await drafter.stop()
        if proc is not None:
            proc.terminate()
            proc.wait(30)

    la = statistics.median(r["local_per_token_ms"] for r in rows)
    lb = statistics.median(r["service_per_token_ms"] for r in rows)
    tot = {k: sum(r["bytes"][k] for r in rows) for k in BYTES}
    acc = sum(r["accepted_service"] for r in rows)
    toks = sum(r["tokens"] for r in rows)
    summary = dict(
        all_identical=all(r["identical"] for r in rows),
        median_local_per_token_ms=la, median_service_per_token_ms=lb,
        overhead_of_medians=lb / la - 1, median_per_prompt_overhead=statistics.median(r["ratio"] for r in rows),
        accepted_draft_tokens=acc, generated_tokens=toks,
        bytes_per_accepted_to_drafter=tot["to_drafter"] / max(acc, 1),
        bytes_per_accepted_to_verifier=tot["to_verifier"] / max(acc, 1),
        bytes_per_generated_to_drafter=tot["to_drafter"] / max(toks, 1),
        bytes_per_generated_to_verifier=tot["to_verifier"] / max(toks, 1),
        bytes_per_accepted_to_drafter_after_prefill=(tot["to_drafter"] - tot["first_to_drafter"]) / max(acc, 1),
        bytes_total=tot,
    )
    return dict(
        command="python -m bench.disagg_overhead " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        settings=dict(prompts=args.prompts, max_new_tokens=args.max_new_tokens, draft_length=args.draft_length,
                      greedy=True, threads=1, target=stack.target_name, drafter=stack.drafter_name,
                      feature_wire_dtype=vs.feature_wire_dtype, prompts_file=str(PROMPTS),
                      drafter_process=args.drafter_process),
        bytes_method="serialized protobuf ByteSize() of each DraftMessage/DraftReply, counted by wrapping "
                     "DrafterService.Draft; excludes the 5-byte gRPC message prefix and HTTP/2 framing",
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__,
                     load_avg=os.getloadavg()),
        summary=summary, rows=rows,
    )


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--draft-length", type=int, default=4)
    p.add_argument("--drafter-process", action="store_true",
                   help="run the drafter as its own `dspark drafter` process (as deployed)")
    p.add_argument("--out", default="docs/perf/disagg_overhead.json")
    args = p.parse_args()
    result = asyncio.run(main(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    cli()
