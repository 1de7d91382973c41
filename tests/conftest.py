"""Suite-wide test settings. One torch thread: tests use tiny models, and on a shared 2-core
machine several OpenMP threads spin against each other and run ~100x slower."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# ---- a hang says where it is -------------------------------------------------------------------
# pytest-timeout shows thread stacks, and an asyncio hang shows only a loop waiting in select();
# this prints every pending task's stack first, so a CI log says which await never returned, and
# repeats it in a section at the end of the run (a failing test's captured stderr is easy to miss).
import asyncio  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from dspark_common.shutdown import OVERRUN_MESSAGE, pending_task_stacks  # noqa: E402

# Hang reports from every xdist worker, printed by the controller at the end of the run.
HANG_REPORT = Path(__file__).resolve().parent.parent / "runs" / "test-hangs.log"


def _report(text: str) -> None:
    HANG_REPORT.parent.mkdir(parents=True, exist_ok=True)
    with HANG_REPORT.open("a") as fh:
        fh.write(text + "\n\n")


ASYNC_HANG_DUMP_S = 300.0


def _dump_tasks(label: str) -> None:
    with warnings.catch_warnings():  # isinstance() on some torch objects warns of deprecations
        warnings.simplefilter("ignore")
        loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]
    lines = [f"+++ {label}: still running after {ASYNC_HANG_DUMP_S:.0f} s; pending asyncio tasks:"]
    lines += [pending_task_stacks(loop) for loop in loops]
    print("\n" + "\n".join(lines), file=sys.stderr)
    sys.stderr.flush()
    _report("\n".join(lines))  # also at the end of the run: a captured stderr can go unread


@pytest.fixture(autouse=True)
def _async_hang_dump(request):
    timer = threading.Timer(ASYNC_HANG_DUMP_S, _dump_tasks, args=(request.node.nodeid,))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


# ---- a stop that was rescued by its bound is reported, not hidden ------------------------------
# Service stops give up on a stuck step at its limit and log it (dspark_common.shutdown), so the
# teardown it rescued passes. The records (with every pending task's stack) are gathered from all
# xdist workers into one file and printed at the end of the run: a hang that no longer fails CI
# still says where it is. Tests that provoke an overrun on purpose carry `provokes_stop_overrun`.
import logging  # noqa: E402

_overrun_expected = False


class _OverrunFile(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if not _overrun_expected and OVERRUN_MESSAGE in record.getMessage():
            _report(f"[{os.environ.get('PYTEST_CURRENT_TEST', 'outside a test')}]\n{record.getMessage()}")


logging.getLogger("dspark_common.shutdown").addHandler(_OverrunFile(logging.ERROR))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "provokes_stop_overrun: the test overruns a bounded stop step on purpose")
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) starts the file afresh
        HANG_REPORT.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _stop_overrun_expected(request):
    global _overrun_expected
    _overrun_expected = request.node.get_closest_marker("provokes_stop_overrun") is not None
    yield
    _overrun_expected = False


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if hasattr(config, "workerinput") or not HANG_REPORT.exists():
        return
    terminalreporter.section("hangs: stop steps that overran their bound, tests still running after %.0f s" % ASYNC_HANG_DUMP_S)
    terminalreporter.write(HANG_REPORT.read_text())
