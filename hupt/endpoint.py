"""The control socket in the supervisor's loop: who may ask, and what they ask.

The wire protocol (one JSON object per line) and the socket itself are in
hupt/control.py; this is the server side's part of the loop: accepting
clients, reading their requests and writing answers without blocking, and
the commands they map to.  A reload's client is a waiter of the upgrade
and hears its progress and outcome.

Clients cannot take hupt's file descriptors (issue 13):

* A client gets IDLE_TIMEOUT to send its request, and again to read its
  answer once it is complete; past that it is hung up on.  Between the two,
  while a reload or a stop it asked for goes on, it waits as long as that.
* At the limit of open files (EMFILE, ENFILE on accept), or once clients
  would take the last RESERVE fds hupt needs to supervise (spawning a
  generation, handing it a socket, reading /proc), hupt stops accepting: the
  listening socket leaves the selector (it stays readable while clients wait
  in its backlog, and would make every step return at once), hupt says so
  once, and tries again ACCEPT_RETRY later, or as soon as a client of its own
  goes.  Clients waiting meanwhile are served then, in order.  It says so
  again only after it has let every waiting client in with room to spare (as
  many fds as the reserve), not each time one fd comes and goes.  The first
  ALWAYS_ADMITTED clients are let in whatever the count, so that hupt stays
  controllable when its own fds fill the table.
"""

from __future__ import annotations

import errno
import functools
import math
import selectors
import signal
from typing import TYPE_CHECKING, Any, Protocol

from hupt import fdlimit, log
from hupt.control import ControlServer, Message, Peer, listen_as, version
from hupt.loop import Loop
from hupt.upgrade import PeerWaiter, Waiter

if TYPE_CHECKING:
    from hupt.command import Change

# The CLI sends its request as soon as it is connected: ten seconds leave room
# for a loaded machine, or a person typing into socat.
IDLE_TIMEOUT = 10.0
# One accept() per retry costs nothing; a client waits no longer than this
# once an fd is free for another reason than one of hupt's clients going.
ACCEPT_RETRY = 0.5
# A reload takes a few fds at once (a socketpair and a pipe for the spawn, the
# notify fd, copies of listening sockets); never more than a quarter of the limit.
RESERVE = 64
ALWAYS_ADMITTED = 4
# accept() failing for one client only (gone before it was accepted): the next may do.
_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EINTR, errno.EPROTO})


class Commands(Protocol):
    def request_reload(self, waiter: Waiter | None = None, *,
                       change: Change | None = None, wait_old: bool = False) -> None: ...

    def send_signal(self, sig: int, *,
                    every: bool = False) -> tuple[bool, str, list[dict[str, Any]]]: ...

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
        # Peers by when they are hung up on unless they ask (or read their answer)
        # by then; insertion order is deadline order (one timeout for all).
        self._idle: dict[Peer, float] = {}
        self._accepting = False  # the listening socket is in the selector
        self._retry_at = math.inf
        # Said once at the limit; over once every client waiting has been let in and
        # there is room for as many again as the reserve (one fd freed and taken
        # again at once is no recovery: hupt would say so at every one).
        self._at_limit = False
        loop.add_timer("control", self)

    def open(self, server: ControlServer | None = None) -> None:
        """Listen; with a name, take it (UsageError if a live hupt has it: nothing started).
        ``server``: one opened already, its name taken (hupt/launch.py's start_first)."""
        self._server = server if server is not None else listen_as(self.name)
        self._listen()
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
        self._accepting = False
        self._retry_at = math.inf
        for p in list(self._peers.values()):  # closing unregisters them
            p.close()
        self._idle.clear()

    # -- accepting, within the limit of open files ---------------------------------------------
    def _listen(self) -> None:
        assert self._server is not None
        self._loop.add(self._server.fileno(), self._on_control)
        self._accepting = True
        self._retry_at = math.inf

    def _on_control(self, mask: int) -> None:
        assert self._server is not None
        while True:
            if len(self._peers) >= ALWAYS_ADMITTED and self._in_reserve():
                return
            try:
                conn = self._server.accept()
            except OSError as e:
                if e.errno in _TRANSIENT:
                    continue
                self._stop_accepting(f"accept(): {e.strerror}; soft limit "
                                     f"{fdlimit.soft_limit()}")
                return
            if conn is None:
                if self._at_limit and self._has_room():
                    self._at_limit = False
                    log.info("accepting control connections again")
                return
            peer = Peer(conn, self._on_message, self._sync)
            self._peers[peer.fileno()] = peer
            self._idle[peer] = self._loop.now() + IDLE_TIMEOUT
            self._loop.add(peer.fileno(), functools.partial(self._on_peer, peer))

    def _in_reserve(self) -> bool:
        """Whether a client accepted now would take one of the fds kept for supervising.

        accept() gives the lowest free number: as long as that is below the last
        ``reserve`` numbers of the table, no client ever holds one of them.
        """
        assert self._server is not None
        soft = fdlimit.soft_limit()
        reserve = _reserve(soft)
        free = fdlimit.lowest_free(self._server.fileno())
        if free is not None and free < soft - reserve:
            return False
        self._stop_accepting(f"{len(self._peers)} control connections open, the last "
                             f"{reserve} of {soft} file descriptors are kept for supervising")
        return True

    def _has_room(self) -> bool:
        """Whether as many fds as the reserve are free on top of it (counted: clients
        leave holes, so the lowest free fd says nothing of how many are free)."""
        soft = fdlimit.soft_limit()
        used = fdlimit.open_count()
        return used is not None and used < soft - 2 * _reserve(soft)

    def _stop_accepting(self, why: str) -> None:
        assert self._server is not None
        if self._accepting:
            self._loop.remove(self._server.fileno())
            self._accepting = False
        self._retry_at = self._loop.now() + ACCEPT_RETRY
        if not self._at_limit:
            self._at_limit = True
            log.warn(f"out of file descriptors: not accepting control connections until some "
                     f"are free ({why})")

    # -- the timer: idle clients, accepting again ----------------------------------------------
    def deadline(self) -> float:
        idle = next(iter(self._idle.values()), math.inf)
        return min(idle, self._retry_at)

    def tick(self, now: float) -> None:
        while self._idle:
            peer, at = next(iter(self._idle.items()))
            if at > now:
                break
            del self._idle[peer]
            self._hang_up(peer)
        if self._server is not None and not self._accepting and now >= self._retry_at:
            self._listen()
            self._on_control(selectors.EVENT_READ)

    def _hang_up(self, peer: Peer) -> None:
        if peer.close_when_flushed:
            log.debug("closed a control connection that left its answer unread "
                      f"for {IDLE_TIMEOUT:g} s")
        else:
            log.debug(f"closed a control connection that sent no request within "
                      f"{IDLE_TIMEOUT:g} s")
            peer.send({"event": "result", "ok": False,
                       "reason": f"no request within {IDLE_TIMEOUT:g} s"})
        peer.close()

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
            self._idle.pop(peer, None)
            self._loop.remove(fd)
            if self._server is not None and not self._accepting:
                # An fd is free: no need to wait for the retry.
                self._retry_at = min(self._retry_at, self._loop.now())
            return
        if peer.close_when_flushed and peer.wants_write:
            self._idle.setdefault(peer, self._loop.now() + IDLE_TIMEOUT)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.wants_write else 0)
        self._loop.modify(fd, events)

    def _on_message(self, peer: Peer, msg: Message) -> None:
        self._idle.pop(peer, None)
        cmd = msg.get("cmd")
        c = self._commands
        if cmd == "reload":
            c.request_reload(PeerWaiter(peer), wait_old=msg.get("wait_old") is True)
        elif cmd == "change":
            self._change(peer, msg)
        elif cmd == "signal":
            self._signal(peer, msg)
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

    def _signal(self, peer: Peer, msg: Message) -> None:
        """``hupt signal``: {"cmd": "signal", "signal": N, "all": bool}."""
        sig = msg.get("signal")
        if type(sig) is not int or sig not in _SIGNALS:
            peer.send({"event": "result", "ok": False, "reason": f"not a signal: {sig!r}"})
        else:
            self._commands.settle()  # the processes there are now
            ok, reason, sent = self._commands.send_signal(sig, every=msg.get("all") is True)
            peer.send({"event": "result", "ok": ok, "reason": reason, "sent": sent})
        peer.finish()

    def _change(self, peer: Peer, msg: Message) -> None:
        """``hupt reload --env/--unset-env/-- ARGV``: a reload with a changed command.

        A command of its own, not a field of ``reload``: a hupt older than it
        answers "unknown command" instead of reloading with the command unchanged.
        """
        from hupt.command import Change
        from hupt.errors import UsageError

        try:
            change = Change.from_wire(msg)
        except UsageError as e:
            peer.send({"event": "result", "ok": False, "reason": str(e)})
            peer.finish()
            return
        self._commands.request_reload(PeerWaiter(peer), change=change,
                                      wait_old=msg.get("wait_old") is True)


_SIGNALS = frozenset(int(s) for s in signal.valid_signals())


def _reserve(soft: int) -> int:
    return min(RESERVE, soft // 4)
