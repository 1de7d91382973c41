"""The interface a drafting method offers the decode loop. The in-process DSpark `DraftEngine`
and the gRPC client of a remote drafter both implement it; a new drafting method (n-gram,
DFlash) is a new class, not a new branch in the loop."""

from __future__ import annotations

from typing import Protocol

import torch

from dspark_common.types import DraftRequest, Proposal


class Proposer(Protocol):
    block_size: int

    def open(self, session_id: str) -> None: ...

    def release(self, session_id: str) -> bool: ...

    def context_length(self, session_id: str) -> int: ...

    def append_context(self, session_id: str, features: torch.Tensor, start_pos: int) -> None: ...

    def truncate(self, session_id: str, length: int) -> None: ...

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]: ...
