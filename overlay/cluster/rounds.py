"""The coordinator's side of a deploy: one conversation with every other live process, step by step.

Each step is sent to every process first and answered by all of them after, so the processes work
in parallel and a step costs the slowest of them, not their sum. A process that cannot be reached,
closes its connection or does not answer by the step's deadline is *lost*: the deploy treats that
as a refusal (before anything was applied) or a failure (after).
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from overlay.cluster import messages
from overlay.cluster.messages import Gone
from overlay.cluster.registry import WorkerEntry

__all__ = ["Peer", "Round"]


@dataclass
class Peer:
    """Another process in this deploy, and what it last answered."""

    entry: WorkerEntry
    sock: socket.socket | None = None
    answer: dict[str, Any] = field(default_factory=dict)
    lost: str = ""  # why it stopped taking part ("" while it does)

    @property
    def pid(self) -> int:
        return self.entry.pid

    @property
    def ok(self) -> bool:
        return not self.lost and self.answer.get("ok") is True

    def describe(self) -> str:
        """Why it refused or failed, in a few words for a message."""
        if self.lost:
            return f"process {self.pid} {self.lost}"
        return f"process {self.pid} {self.answer.get('code', 'refused')}: {self.answer.get('message', '')}"


class Round:
    """A deploy's conversations with the processes in ``entries``."""

    def __init__(self, entries: list[WorkerEntry], *, connect_timeout: float = 5.0) -> None:
        self.peers = [Peer(entry) for entry in entries]
        self._connect_timeout = connect_timeout

    def ask(self, header: dict[str, Any], payload: bytes, timeout: float) -> list[Peer]:
        """Send one step to every peer still in the round; the peers that did not answer it ok."""
        self.send(header, payload)
        return self.collect(timeout)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        """Send one step to every peer still in the round (connecting first, at the first step)."""
        for peer in self.peers:
            if peer.lost:
                continue
            try:
                if peer.sock is None:
                    peer.sock = messages.connect(peer.entry.socket, self._connect_timeout)
                messages.send(peer.sock, header, payload)
            except Gone as exc:
                self._lose(peer, str(exc))

    def collect(self, timeout: float) -> list[Peer]:
        """Every peer's answer to the step just sent, by ``timeout`` seconds from now; the peers that
        did not answer ok."""
        deadline = time.monotonic() + timeout
        for peer in self.peers:
            if peer.lost or peer.sock is None:
                continue
            try:
                peer.answer, _ = messages.receive(peer.sock, deadline)
            except Gone as exc:
                self._lose(peer, f"did not answer within {timeout:g} s" if "in time" in str(exc) else str(exc))
        return [peer for peer in self.peers if not peer.ok]

    def tell(self, header: dict[str, Any], timeout: float) -> None:
        """A last word (abort, revert) to every peer still connected, answers awaited briefly; what
        the peers answered before (the reasons the deploy stops) is kept."""
        deadline = time.monotonic() + timeout
        listening = []
        for peer in self.peers:
            if peer.sock is not None:
                try:
                    messages.send(peer.sock, header)
                    listening.append(peer)
                except Gone:
                    pass
        for peer in listening:
            assert peer.sock is not None
            with contextlib.suppress(Gone):
                messages.receive(peer.sock, deadline)
        self.close()

    def close(self) -> None:
        for peer in self.peers:
            if peer.sock is not None:
                with contextlib.suppress(OSError):
                    peer.sock.close()
                peer.sock = None

    def _lose(self, peer: Peer, why: str) -> None:
        peer.lost = why if peer.entry.alive() else "stopped during the deploy"
        if peer.sock is not None:
            with contextlib.suppress(OSError):
                peer.sock.close()
            peer.sock = None

