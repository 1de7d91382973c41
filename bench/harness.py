"""`dspark bench`: drive the stack over HTTP and write the performance report's data.

One run per configuration (dataset × temperature × concurrency × draft length); every run sends
the same prompts (the first turn of the first `--limit` rows of each dataset, chat endpoint,
streaming), so draft length 0 of the same benchmark is the speedup reference. Draft lengths of one
dataset/temperature/concurrency run back to back; at concurrency 1 they alternate prompt by prompt
(`--no-interleave` to run them in a row), so slow drifts of a shared machine hit them alike.
Writes DIR/results.json, DIR/results.md and DIR/*.png.

    dspark bench --start --dataset gsm8k.jsonl humaneval.jsonl --limit 20 --max-new-tokens 128 \\
        --concurrency 1,4 --temperature 0,1 --draft-length 0,auto --out runs/bench
    dspark bench --url http://127.0.0.1:8000 ...          # an already running stack
    dspark bench --baselines hf,prompt-lookup,inprocess ...  # peers on the same prompts (in-process)

`--start` launches `dspark up` on free ports and stops it after the HTTP runs (before the
in-process baselines, which need the CPU)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from dspark_common.errors import InvalidRequest
from dspark_common.types import validate_draft_length

log = logging.getLogger(__name__)

SCHEMA = 1
BASELINES = ("hf", "prompt-lookup", "inprocess")


@dataclass
class Dataset:
    name: str
    path: str
    prompts: list[str]


# ---------------------------------------------------------------------------- inputs


def dataset_name(path: str) -> str:
    """`gsm8k-tail319.jsonl` -> `gsm8k`; `mt-bench.jsonl` -> `mt-bench`."""
    return re.sub(r"-(tail|head)\d+$", "", Path(path).stem)


def load_dataset(spec: str, limit: int | None) -> Dataset:
    """A JSONL file of {"turns": [first, ...]} rows (or {"prompt": ...}); `NAME=FILE` names it."""
    name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    prompts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            turns = row.get("turns") or ([row["prompt"]] if "prompt" in row else None)
            if not turns or not isinstance(turns[0], str):
                raise InvalidRequest(f"{path}:{i + 1}: a row needs 'turns' (a list of strings) or 'prompt'", "dataset")
            prompts.append(turns[0])
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise InvalidRequest(f"no prompts in {path}", "dataset")
    return Dataset(name or dataset_name(path), path, prompts)


def parse_draft_lengths(value: str) -> list[int | str]:
    out: list[int | str] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        dl = validate_draft_length(part if part == "auto" else int(part))
        if dl not in out:
            out.append(dl)
    if 0 not in out:  # speedup is measured against draft length 0 of the same benchmark
        out.insert(0, 0)
    return out


def parse_list(value: str, kind: type) -> list:
    return [kind(v) for v in value.split(",") if v.strip()]


def dl_label(dl: int | str) -> str:
    return f"dl={dl}"


# ---------------------------------------------------------------------------- machine


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": model or platform.processor(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def command_line(argv: list[str] | None = None) -> str:
    """How this process was started, as a user would type it."""
    argv = list(sys.argv if argv is None else argv)
    exe = Path(argv[0])
    if exe.name == "dspark" or (exe.name == "cli.py" and exe.parent.name == "dspark_common"):
        head = ["dspark"]
    elif exe.suffix == ".py" and exe.parent.name == "bench":
        head = ["python", "-m", f"bench.{exe.stem}"]
    else:
        head = [str(exe)]
    return shlex.join(head + argv[1:])


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- `--start`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def describe_stack(url: str) -> dict:
    """What the stack says about itself (/healthz, /v1/models), kept with the results."""
    out = {}
    for path in ("/healthz", "/v1/models"):
        try:
            with urllib.request.urlopen(url + path, timeout=10) as r:
                out[path] = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            out[path] = {"error": str(e)}
    return out


@contextmanager
def started_stack(up_args: str = "", timeout_s: float = 900.0, log_path: Path | None = None):
    """`dspark up` on a free HTTP port (router gRPC off) in its own process group; yields the URL
    once /healthz answers 200, and stops the whole group after."""
    port = free_port()
    cmd = [sys.executable, "-m", "dspark_common.cli", "up", "--port", str(port), "--grpc-port", "-1",
           *shlex.split(up_args)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    log.info("starting the stack: %s", shlex.join(cmd))
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None:
                raise InvalidRequest(f"dspark up exited with {proc.returncode} before it was healthy"
                                     + (f" (log: {log_path})" if log_path else ""), "start")
            if time.monotonic() > end:
                raise InvalidRequest(f"the stack was not healthy within {timeout_s:.0f} s", "start")
            time.sleep(0.5)
        log.info("stack healthy at %s", url)
        yield url
    finally:
        _stop_group(proc)
        if log_path:
            out.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop `dspark up` like Ctrl-C does (it stops router, verifiers, drafters in order), then
    SIGTERM and SIGKILL the process group this module started, for whatever outlived it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            log.warning("dspark up did not stop within 60 s")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(2)


# ---------------------------------------------------------------------------- HTTP runs


@dataclass
class Plan:
    datasets: list[Dataset]
    max_new_tokens: int
    concurrency: list[int]
    temperatures: list[float]
    draft_lengths: list[int | str]
    seed: int = 0
    warmup: int = 1
    request_timeout_s: float = 600.0
    model: str | None = None
    api_key: str = ""
    keep_text: bool = False
    interleave: bool = True  # concurrency 1: draft lengths alternate prompt by prompt

    def groups(self):
        """(dataset, temperature, concurrency) groups; each runs every draft length back to back."""
        for d in self.datasets:
            for t in self.temperatures:
                for c in self.concurrency:
                    yield d, t, c

    @property
    def total_requests(self) -> int:
        return sum(len(d.prompts) for d in self.datasets) * len(self.temperatures) * len(self.concurrency) * len(
            self.draft_lengths)


def new_run(source: str, family: str, dataset: str, temperature: float, concurrency: int, draft_length,
            max_new_tokens: int, reference: bool, label: str | None = None) -> dict:
    label = label or dl_label(draft_length)
    return {
        "name": f"{source}/{dataset}/T{temperature:g}/c{concurrency}/{label}",
        "source": source, "family": family, "label": label, "reference": reference, "dataset": dataset,
        "temperature": float(temperature), "concurrency": int(concurrency), "draft_length": draft_length,
        "max_new_tokens": int(max_new_tokens), "started": now_iso(), "loadavg_before": loadavg(),
    }


async def _run_config(session, url: str, requests, concurrency: int, plan: Plan, progress) -> tuple[list, float]:
    """Send `requests` with `concurrency` closed-loop workers; return (records in order, wall s)."""
    from bench.http_client import stream_chat

    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    records = {}

    async def worker():
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            rec = await stream_chat(session, url, req, api_key=plan.api_key)
            if not rec.ok:
                log.warning("prompt %d failed: %s", req.prompt_index, rec.error)
            records[req.prompt_index] = rec
            progress.update(1)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return [records[r.prompt_index] for r in requests], wall


async def run_http(url: str, plan: Plan, *, progress=None) -> list[dict]:
    """Every configuration of `plan` against the stack at `url`; the run dicts of results.json."""
    import aiohttp

    from bench.http_client import ChatRequest, stream_chat

    timeout = aiohttp.ClientTimeout(total=plan.request_timeout_s, sock_read=plan.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=max(plan.concurrency) + 2)
    runs: list[dict] = []
    progress = progress or _NullProgress()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        first = plan.datasets[0].prompts[0]
        for _ in range(plan.warmup):  # not recorded: first-use costs of every service
            for dl in plan.draft_lengths:
                rec = await stream_chat(session, url, ChatRequest(-1, first, min(16, plan.max_new_tokens), 0.0, dl,
                                                                  model=plan.model), api_key=plan.api_key)
                if not rec.ok:
                    raise InvalidRequest(f"the warm-up request failed: {rec.error}", "url")
        for d, t, c in plan.groups():
            if c == 1 and plan.interleave:
                runs += await _run_interleaved(session, url, plan, d, t, progress)
                continue
            for dl in plan.draft_lengths:
                run = new_run("http", "http", d.name, t, c, dl, plan.max_new_tokens, reference=dl == 0)
                progress.set_postfix_str(run["name"], refresh=True)
                requests = [ChatRequest(i, p, plan.max_new_tokens, t, dl, seed=plan.seed + i, model=plan.model)
                            for i, p in enumerate(d.prompts)]
                records, wall = await _run_config(session, url, requests, c, plan, progress)
                runs.append(_finish_run(run, records, wall, plan))
    return runs


async def _run_interleaved(session, url: str, plan: Plan, d: Dataset, t: float, progress) -> list[dict]:
    """Concurrency 1, draft lengths interleaved prompt by prompt (prompt i runs every draft length
    back to back, starting at a rotating one): a shared machine's drifts, which last minutes, then
    hit every configuration alike instead of whichever ran during them. A run's wall time is the
    sum of its requests' times (one user, closed loop: the same as running them in a row)."""
    from bench.http_client import ChatRequest, stream_chat

    dls = plan.draft_lengths
    runs = {dl: new_run("http", "http", d.name, t, 1, dl, plan.max_new_tokens, reference=dl == 0) for dl in dls}
    records: dict = {dl: [] for dl in dls}
    walls = dict.fromkeys(dls, 0.0)
    progress.set_postfix_str(f"http/{d.name}/T{t:g}/c1/interleaved", refresh=True)
    for i, prompt in enumerate(d.prompts):
        for dl in dls[i % len(dls):] + dls[: i % len(dls)]:
            t0 = time.perf_counter()
            rec = await stream_chat(session, url, ChatRequest(i, prompt, plan.max_new_tokens, t, dl, seed=plan.seed + i,
                                                              model=plan.model), api_key=plan.api_key)
            walls[dl] += time.perf_counter() - t0
            if not rec.ok:
                log.warning("prompt %d failed: %s", i, rec.error)
            records[dl].append(rec)
            progress.update(1)
    return [_finish_run({**run, "interleaved": True}, records[dl], walls[dl], plan) for dl, run in runs.items()]


def _finish_run(run: dict, records: list, wall_s: float, plan: Plan) -> dict:
    """A run dict of results.json completed with its requests' figures and the run's metrics."""
    from bench.metrics import run_figures

    run["loadavg_after"] = loadavg()
    run["requests"] = [r.figures(keep_text=plan.keep_text) for r in records]
    run["metrics"] = run_figures(run["requests"], wall_s)
    return run


class _NullProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass


# ---------------------------------------------------------------------------- results


def finish(results: dict, out: Path, *, plots: bool = True) -> None:
    """Speedups and identity checks across runs, then results.json, results.md and the plots."""
    from bench.metrics import add_speedups, identical_outputs
    from bench.report import markdown

    add_speedups(results["runs"])
    identical_outputs(results["runs"])
    out.mkdir(parents=True, exist_ok=True)
    results["figures"] = []
    if plots:
        from bench.plots import write_plots

        results["figures"] = [p.name for p in write_plots(results, out)]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results, img_dir="."))


def fallback_warnings(runs: list[dict]) -> list[str]:
    out = []
    for r in runs:
        m = r["metrics"]
        if m.get("errors"):
            out.append(f"{r['name']}: {m['errors']} of {m['requests']} requests failed")
        if m.get("fallback_rounds"):
            out.append(f"{r['name']}: {m['fallback_rounds']} rounds fell back to target-only (drafter unreachable?)")
    return out


# ---------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="base URL of a running router, e.g. http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start `dspark up` on a free port, stop it after")
    p.add_argument("--up-args", default="", help="extra arguments for `dspark up` with --start, e.g. '--checkpoint DIR'")
    p.add_argument("--startup-timeout-s", type=float, default=900.0)
    p.add_argument("--dataset", nargs="+", required=True, metavar="FILE",
                   help="JSONL files of {\"turns\": [...]} rows; the first turn is the prompt ([NAME=]FILE)")
    p.add_argument("--limit", type=int, default=20, help="first N prompts of each dataset")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1", help="comma list of concurrent users, e.g. 1,4,8")
    p.add_argument("--temperature", default="0", help="comma list of temperatures, e.g. 0,1 (0 = greedy)")
    p.add_argument("--draft-length", default="0,auto", help="comma list of 0..16 or auto (0 is always added)")
    p.add_argument("--seed", type=int, default=0, help="request i of a sampled run uses seed SEED+i")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up requests per draft length")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--model", default=None, help="the `model` field sent (default: none, the router's model)")
    p.add_argument("--api-key", default=os.environ.get("DSPARK_API_KEY", ""))
    p.add_argument("--keep-text", action="store_true", help="store generated texts in results.json")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="concurrency 1: run each draft length's prompts in a row instead of alternating draft "
                        "lengths prompt by prompt")
    p.add_argument("--baselines", default="", help=f"comma list of in-process peers: {','.join(BASELINES)}")
    p.add_argument("--target", default="smollm2", help="baselines: the target model (as `dspark up --model`)")
    p.add_argument("--drafter", default="default", help="baselines: DSpark checkpoint of the in-process loop")
    p.add_argument("--prompt-lookup-tokens", type=int, default=10, help="baselines: prompt_lookup_num_tokens")
    p.add_argument("--baseline-temperature", default=None,
                   help="baselines: comma list of temperatures (default: those of --temperature)")
    p.add_argument("--threads", type=int, default=1, help="baselines: torch threads (the stack uses 1 on <= 4 cores)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise InvalidRequest(f"unknown baseline {sorted(unknown)[0]!r}; choose from {', '.join(BASELINES)}", "baselines")
    if not (args.url or args.start or baselines):
        raise InvalidRequest("give --url URL or --start (and/or --baselines)", "url")
    plan = Plan(
        datasets=[load_dataset(s, args.limit) for s in args.dataset], max_new_tokens=args.max_new_tokens,
        concurrency=parse_list(args.concurrency, int), temperatures=parse_list(args.temperature, float),
        draft_lengths=parse_draft_lengths(args.draft_length), seed=args.seed, warmup=args.warmup,
        request_timeout_s=args.request_timeout_s, model=args.model, api_key=args.api_key, keep_text=args.keep_text,
        interleave=args.interleave,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "schema": SCHEMA, "created": now_iso(), "command": command_line(),
        "machine": machine_info(),
        "settings": {"datasets": {d.name: {"path": d.path, "prompts": len(d.prompts)} for d in plan.datasets},
                     "limit": args.limit, "max_new_tokens": plan.max_new_tokens, "concurrency": plan.concurrency,
                     "temperatures": plan.temperatures, "draft_lengths": plan.draft_lengths, "seed": plan.seed,
                     "baselines": baselines, "url": args.url, "start": bool(args.start), "up_args": args.up_args},
        "runs": [],
    }
    from tqdm import tqdm

    def bench(url: str) -> list[dict]:
        results["settings"]["url"] = url
        results["stack"] = describe_stack(url)
        with tqdm(total=plan.total_requests, unit="req", desc="dspark bench", disable=args.no_progress) as progress:
            return asyncio.run(run_http(url, plan, progress=progress))

    if args.start:
        with started_stack(args.up_args, args.startup_timeout_s, out / "stack.log") as url:
            results["runs"] += bench(url)
    elif args.url:
        results["runs"] += bench(args.url)
    if baselines:
        from bench.baselines import BaselineConfig, run_baselines

        cfg = BaselineConfig(target=args.target, drafter=args.drafter, prompt_lookup_tokens=args.prompt_lookup_tokens,
                             threads=args.threads)
        temps = parse_list(args.baseline_temperature, float) if args.baseline_temperature else plan.temperatures
        results["settings"]["baseline_temperatures"] = temps
        results["settings"]["baseline_config"] = vars(cfg)
        runs, notes = run_baselines(baselines, replace(plan, temperatures=temps), cfg, progress=not args.no_progress)
        results["runs"] += runs
        results["baseline_models"] = notes
    finish(results, out, plots=not args.no_plots)
    for w in fallback_warnings(results["runs"]):
        print(f"warning: {w}", file=sys.stderr)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0
