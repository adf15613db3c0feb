"""The control socket in the supervisor's loop: who may ask, and what they ask.

The wire protocol (one JSON object per line) and the socket itself are in
hupt/control.py; this is the server side's part of the loop: accepting
clients, reading their requests and writing answers without blocking, and
the commands they map to.  A reload's client is a waiter of the upgrade
and hears its progress and outcome.
"""

from __future__ import annotations

import functools
import selectors
from typing import Any, Protocol

from hupt.control import ControlServer, Message, Peer, version
from hupt.loop import Loop
from hupt.upgrade import PeerWaiter, Waiter


class Commands(Protocol):
    def request_reload(self, waiter: Waiter | None = None) -> None: ...

    def request_stop(self, *, now: bool = False, waiter: Waiter | None = None) -> None: ...

    def end_draining(self) -> None: ...

    def settle(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def generations(self) -> list[dict[str, Any]]: ...


class ControlEndpoint:
    def __init__(self, loop: Loop, commands: Commands) -> None:
        self._loop = loop
        self._commands = commands
        self._server: ControlServer | None = None
        self._peers: dict[int, Peer] = {}
        # Attached server pids the control socket answers for too.
        self.aliases: set[int] = set()
        # hupt run --name: the name the control socket answers for (set before open()).
        self.name: str | None = None

    def open(self) -> None:
        """Listen; with a name, take it (UsageError if a live hupt has it: nothing started)."""
        server = ControlServer()
        if self.name is not None:
            try:
                server.claim_name(self.name)
            except BaseException:
                server.close()
                raise
        self._server = server
        self._loop.add(self._server.fileno(), self._on_control)
        for pid in self.aliases:
            self._server.alias(pid)

    def alias(self, pid: int) -> None:
        self.aliases.add(pid)
        if self._server is not None:
            self._server.alias(pid)

    def unalias(self, pid: int) -> None:
        self.aliases.discard(pid)
        if self._server is not None:
            self._server.unalias(pid)

    def close(self) -> None:
        if self._server is not None:
            self._loop.remove(self._server.fileno())
            self._server.close()
            self._server = None
        for p in list(self._peers.values()):  # closing unregisters them
            p.close()

    def _on_control(self, mask: int) -> None:
        assert self._server is not None
        while (conn := self._server.accept()) is not None:
            peer = Peer(conn, self._on_message, self._sync)
            self._peers[peer.fileno()] = peer
            self._loop.add(peer.fileno(), functools.partial(self._on_peer, peer))

    def _on_peer(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            peer.readable()
        if mask & selectors.EVENT_WRITE and not peer.closed:
            peer.flush()

    def _sync(self, peer: Peer) -> None:
        fd = peer.fileno()
        if self._peers.get(fd) is not peer:
            return
        if peer.closed:
            del self._peers[fd]
            self._loop.remove(fd)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.wants_write else 0)
        self._loop.modify(fd, events)

    def _on_message(self, peer: Peer, msg: Message) -> None:
        cmd = msg.get("cmd")
        c = self._commands
        if cmd == "reload":
            c.request_reload(PeerWaiter(peer))
        elif cmd == "stop":
            peer.send({"event": "progress", "message": "stopping"})
            # Stop first: a reload in progress is abandoned, so ending the drains
            # retires everyone (an exec-mode drain would otherwise exec anew).
            c.request_stop(now=False, waiter=PeerWaiter(peer))
            if msg.get("now"):
                c.end_draining()
        elif cmd == "status":
            c.settle()  # what is there now, not at the last scan
            doc = c.status()
            doc.update(name=self.name, version=version())
            peer.send({"event": "result", "ok": True, "reason": "status", "status": doc})
            peer.finish()
        elif cmd == "ping":
            c.settle()
            peer.send({"event": "result", "ok": True, "reason": "pong",
                       "generations": c.generations()})
            peer.finish()
        else:
            peer.send({"event": "result", "ok": False, "reason": f"unknown command {cmd!r}"})
            peer.finish()
