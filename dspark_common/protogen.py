"""Generating the Python gRPC stubs from `protos/dspark/v1/*.proto` (run at set-up time by
`make protos`, or on first import by `dspark_common.proto`).

Stubs go to `dspark_common/_proto/` (git-ignored). protoc writes absolute imports rooted at the
proto path (`from dspark.v1 import tensor_pb2`); they are rewritten to
`from dspark_common._proto.dspark.v1 import ...` so the stubs live inside this package. A stamp
file records a hash of the sources and of the generator, so stale stubs are regenerated."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
OUT_DIR = PACKAGE_DIR / "_proto"
PROTO_ROOT = PACKAGE_DIR.parent / "protos"
PROTO_PACKAGE = Path("dspark") / "v1"
STAMP = "SOURCES.sha256"
_IMPORT = re.compile(r"^from dspark\.v1 import ", re.MULTILINE)


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / PROTO_PACKAGE).glob("*.proto"))


def source_hash(root: Path = PROTO_ROOT) -> str:
    h = hashlib.sha256(f"grpcio-tools {metadata.version('grpcio-tools')}\n".encode())
    for f in proto_files(root):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def is_fresh(out: Path = OUT_DIR, root: Path = PROTO_ROOT) -> bool:
    """True when the stubs exist and match the sources (or the sources are not shipped)."""
    stamp = out / STAMP
    if not proto_files(root):
        return stamp.is_file()
    return stamp.is_file() and stamp.read_text().strip() == source_hash(root)


def generate(out: Path = OUT_DIR, root: Path = PROTO_ROOT) -> Path:
    """(Re)generate the stubs into `out`, atomically replacing what was there."""
    from grpc_tools import protoc

    files = proto_files(root)
    if not files:
        raise FileNotFoundError(f"no .proto files under {root / PROTO_PACKAGE}")
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    tmp = Path(tempfile.mkdtemp(prefix="_proto.", dir=out.parent))
    try:
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *(str(f.relative_to(root)) for f in files)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[f.name for f in files]}")
        for d in (tmp, tmp / "dspark", tmp / PROTO_PACKAGE):
            (d / "__init__.py").touch()
        for py in (tmp / PROTO_PACKAGE).glob("*.py*"):
            py.write_text(_IMPORT.sub("from dspark_common._proto.dspark.v1 import ", py.read_text()))
        (tmp / STAMP).write_text(source_hash(root) + "\n")
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure(out: Path = OUT_DIR, root: Path = PROTO_ROOT) -> Path:
    """Generate the stubs unless they are fresh; safe when several processes start at once."""
    if is_fresh(out, root):
        return out
    fd = os.open(out.parent, os.O_RDONLY)  # lock the parent directory: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not is_fresh(out, root):
            generate(out, root)
    finally:
        os.close(fd)
    return out


def main() -> int:
    out = generate()
    print(f"generated {len(proto_files())} protos into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
