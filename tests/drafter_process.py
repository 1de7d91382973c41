"""`dspark drafter` as a child process for the fault tests. It imports everything first (the slow
part), then reads the port to serve on from stdin (0 = any free port) and runs the ordinary CLI,
so a test can have a replacement process ready before it kills the running one."""

import sys

import drafter_svc.server  # noqa: F401  (torch and the model code: seconds on a busy machine)
from dspark_common.cli import main

if __name__ == "__main__":
    port = sys.stdin.readline().strip()
    sys.exit(main(["drafter", "--port", port, *sys.argv[1:]]))
