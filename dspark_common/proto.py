"""The generated `dspark.v1` protobuf and gRPC modules, (re)generated first if missing or stale,
so code and tests work from a clean tree:

    from dspark_common.proto import drafter_pb2, drafter_pb2_grpc"""

from __future__ import annotations

from dspark_common import protogen

protogen.ensure()

from dspark_common._proto.dspark.v1 import (  # noqa: E402
    common_pb2,
    drafter_pb2,
    drafter_pb2_grpc,
    tensor_pb2,
    verifier_pb2,
    verifier_pb2_grpc,
)

__all__ = ["common_pb2", "drafter_pb2", "drafter_pb2_grpc", "tensor_pb2", "verifier_pb2", "verifier_pb2_grpc"]
