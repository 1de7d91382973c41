"""Suite-wide test settings. One torch thread: tests use tiny models, and on a shared 2-core
machine several OpenMP threads spin against each other and run ~100x slower."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# ---- a hang says where it is -------------------------------------------------------------------
# pytest-timeout shows thread stacks, and an asyncio hang shows only a loop waiting in select();
# this prints every pending task's stack first, so a CI log says which await never returned.
import asyncio  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

ASYNC_HANG_DUMP_S = 300.0


def _dump_tasks(label: str) -> None:
    with warnings.catch_warnings():  # isinstance() on some torch objects warns of deprecations
        warnings.simplefilter("ignore")
        loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]
    print(f"\n+++ {label}: still running after {ASYNC_HANG_DUMP_S:.0f} s; pending asyncio tasks:", file=sys.stderr)
    for loop in loops:
        for _ in range(3):  # the set can change under us: the loop thread is still running
            try:
                tasks = list(asyncio.all_tasks(loop))
                break
            except RuntimeError:
                tasks = []
        for t in tasks:
            print(f"--- {t.get_name()} {t.get_coro()!r}", file=sys.stderr)
            for frame in t.get_stack(limit=12):
                print(f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}", file=sys.stderr)
    sys.stderr.flush()


@pytest.fixture(autouse=True)
def _async_hang_dump(request):
    timer = threading.Timer(ASYNC_HANG_DUMP_S, _dump_tasks, args=(request.node.nodeid,))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
