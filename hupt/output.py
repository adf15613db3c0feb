"""The generations' stdout and stderr through hupt: lines prefixed with their
generation, the last lines of each generation's stderr, and a keeper for
when hupt is gone.

Where it goes (``hupt run --prefix-output`` / ``--no-prefix-output``): by
default a generation's stdout and stderr each go through hupt when hupt's own
is not a terminal (a file, a pipe, the journal), and are handed to the server
as they are when it is one (the server sees its terminal: colours, line
buffering, job control, as without hupt).  Through hupt, every line a
generation writes reaches hupt's own stdout or stderr with ``[gen N] `` before
it, so that the logs of overlapping generations (one starting, one draining)
can be told apart, and hupt keeps the last TAIL_LINES lines of each
generation's stderr (at most TAIL_LINE_CHARS characters each), which ``hupt
reload`` shows when a new generation exits or is not ready.  Without a pipe
(a terminal, ``--no-prefix-output``) there is no tail: the server writes
where hupt writes, and that is where to look.

How, and what it costs:

* One pipe per stream of each process hupt starts (a --multi copy has its
  own, so copies' lines never mix mid-line), enlarged to PIPE_SIZE where the
  kernel allows; hupt reads it from its loop, non-blocking, READ_CHUNK bytes
  a wake-up, and writes what it read in one write: per wake-up, not per line
  or request.  Nothing is added to the server's side: a write() to a pipe
  costs what a write() to a file or to the journal's socket does.
* A partial line waits for its end (at most MAX_LINE bytes: a longer one is
  written as it is and continued without a prefix); the last one is written
  with a newline when the generation's processes have all closed the pipe.
  Exec mode keeps the pipe across the exec: its lines are labelled with the
  image the root runs (leftover workers of the old image included).
* hupt's writes never block its loop.  A socket (the journal) is written
  with MSG_DONTWAIT; a pipe, FIFO or terminal through a second open file
  description of its own with O_NONBLOCK (the one hupt shares with its
  parent or the server is never made non-blocking); a regular file as it is
  (a file does not wait for a reader).  What cannot be written at once waits
  in a buffer of at most SINK_HIGH bytes; past that, hupt stops reading the
  generations' pipes until it is down to SINK_LOW: a server whose output
  nobody reads then blocks in write() once its pipe is full, as it would
  writing there without hupt.  Nothing is dropped, unless the destination is
  gone (EPIPE): then, as for a server writing there itself, it is lost.
* hupt being slow (a reload pausing a generation, a busy loop step) does not
  block a server: the pipe holds PIPE_SIZE bytes meanwhile.

hupt killed (SIGKILL, the OOM killer): a server writing to a pipe nobody
reads would die of SIGPIPE (EPIPE if it ignores the signal), and one whose
pipe stays open but unread would block for ever once it is full.  So a
second, tiny process keeps every pipe: the **output keeper**, started by
``hupt run`` (``start_keeper``) before it starts anything, outside hupt's
process tree (so it is never taken for a server process, and hupt's death
does not concern it), in a session of its own (no terminal signals), with
nothing of hupt's but its stdout and stderr.  hupt sends it a duplicate of
every pipe's read end (SCM_RIGHTS), its stream and label, and says when a
pipe is done.  While hupt lives the keeper only holds them (it reads nothing,
and costs nothing).  When hupt's end of their channel closes (hupt exited or
was killed), the keeper reads every pipe still open and writes its lines,
prefixed as hupt would, where hupt wrote them, until every writer has closed
its end; then it exits.  A server that outlives hupt thus keeps its output
and never blocks on it.  What hupt had read but not written yet when it was
killed (a partial line, a full buffer) is lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hupt.loop import Loop

PIPE_SIZE = 256 * 1024
READ_CHUNK = 64 * 1024
MAX_LINE = 64 * 1024
SINK_HIGH = 1024 * 1024
SINK_LOW = SINK_HIGH // 4
TAIL_LINES = 20
TAIL_LINE_CHARS = 300
KEEP_TAILS = 16  # generations whose stderr tail is kept (the newest)
DRAIN_CHUNKS = 64
SINK_WAIT = 1.0  # longest a line of hupt's own waits for the servers' lines before it
CLOSE_FLUSH = 2.0  # at hupt's exit, longest wait for its outputs to take what is left
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_BUF = select.PIPE_BUF
STREAMS = (1, 2)  # the generation's stdout and stderr, written to hupt's own


def label(number: int) -> bytes:
    return f"[gen {number}] ".encode()


class Lines:
    """One stream cut into lines, each prefixed: a partial line waits for its end."""

    def __init__(self) -> None:
        self.partial = b""
        self.continued = False  # the partial line was written already (over MAX_LINE)

    def feed(self, data: bytes, prefix: bytes) -> tuple[bytes, list[bytes]]:
        """What to write for ``data``, and the lines it completed (for a tail)."""
        parts = (self.partial + data).split(b"\n")
        rest = parts.pop()
        out = []
        for i, line in enumerate(parts):
            out.append((b"" if i == 0 and self.continued else prefix) + line + b"\n")
        if parts:
            self.continued = False
        done = parts
        if len(rest) > MAX_LINE:
            out.append((b"" if self.continued else prefix) + rest)
            done.append(rest)
            self.continued, rest = True, b""
        self.partial = rest
        return b"".join(out), done

    def end(self, prefix: bytes) -> tuple[bytes, list[bytes]]:
        """The stream is over: its partial line, ended with a newline."""
        line, self.partial = self.partial, b""
        continued, self.continued = self.continued, False
        if not line:
            return (b"\n" if continued else b""), []
        return (b"" if continued else prefix) + line + b"\n", [line]


class Sink:
    """hupt's own stdout or stderr, written without ever blocking hupt (see the module)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.broken = False
        self._sock: socket.socket | None = None
        self._own: int | None = None  # an O_NONBLOCK description of our own
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            with contextlib.suppress(OSError):  # no reader left, or no /proc: poll first
                self._own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK
                                    | os.O_CLOEXEC | os.O_NOCTTY)
        self._regular = stat.S_ISREG(mode)

    def fileno(self) -> int:
        """What to wait on for room."""
        if self._sock is not None:
            return self._sock.fileno()
        return self._own if self._own is not None else self.fd

    def write(self, data: bytes) -> None:
        if not self.broken and data:
            self.buf += data
            self.flush()

    def flush(self) -> None:
        while self.buf and not self.broken:
            chunk = bytes(self.buf[:READ_CHUNK])
            try:
                n = self._write(chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # The reader is gone (EPIPE) or the destination failed: what
                # would have gone there is lost, as for a server writing there.
                self.broken = True
                self.buf.clear()
                if e.errno != errno.EPIPE:
                    _say(f"hupt: cannot write the servers' output to fd {self.fd}: "
                         f"{e.strerror}")
                return
            if n == 0:
                return
            del self.buf[:n]

    def _write(self, chunk: bytes) -> int:
        if self._sock is not None:
            return self._sock.send(chunk, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        if self._own is not None:
            return os.write(self._own, chunk)
        if self._regular:
            return os.write(self.fd, chunk)
        # A pipe with room takes up to PIPE_BUF bytes without blocking.
        p = select.poll()
        p.register(self.fd, select.POLLOUT)
        if not p.poll(0):
            return 0
        return os.write(self.fd, chunk[:_PIPE_BUF])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._own is not None:
            os.close(self._own)
            self._own = None


def _say(msg: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()


class _Stream:
    # (Not a dataclass: `hupt run` opens generation 1's pipes before the server's exec,
    # and importing dataclasses would slow that path down.)
    __slots__ = ("fd", "gen", "id", "lines", "watched", "which")

    def __init__(self, id: int, fd: int, which: int, gen: int) -> None:
        self.id = id
        self.fd = fd  # hupt's read end
        self.which = which  # 1: stdout, 2: stderr
        self.gen = gen  # the generation its lines are labelled with
        self.lines = Lines()
        self.watched = False  # in the loop's selector


class Output:
    """The pipes of every generation hupt started, read in its loop (see the module)."""

    def __init__(self, prefix: tuple[bool, bool], *,
                 keeper: tuple[socket.socket, int] | None = None,
                 sinks: tuple[int, int] = (1, 2)) -> None:
        self.prefix = prefix
        self._sinks: dict[int, Sink] = {}
        for which, on, fd in zip(STREAMS, prefix, sinks, strict=True):
            if on:
                self._sinks[which] = Sink(fd)
        self._streams: dict[int, _Stream] = {}  # by read fd
        self._tails: dict[int, deque[str]] = {}
        self._keeper: socket.socket | None = keeper[0] if keeper is not None else None
        # Its hold (start_keeper): open until release_keeper.
        self._keeper_hold: int | None = keeper[1] if keeper is not None else None
        self._keeper_lost = False
        self._paused: set[int] = set()  # sinks whose streams are not read (full buffer)
        self._writing: set[int] = set()  # sinks waiting for room in the selector
        self._loop: Loop | None = None
        self._next_id = 0
        self._closed = False

    def release_keeper(self) -> None:
        """Let the keeper start its interpreter (see start_keeper)."""
        if self._keeper_hold is not None:
            os.close(self._keeper_hold)
            self._keeper_hold = None

    def bind(self, loop: Loop) -> None:
        self._loop = loop
        # hupt run: generation 1's pipes were opened before the loop existed (hupt/launch.py).
        for s in list(self._streams.values()):
            self._watch(s)
        if 2 in self._sinks:
            from hupt import log

            log.before_write(self._before_own_line)

    def _before_own_line(self) -> None:
        """hupt writes a line of its own to stderr: the servers' lines waiting for
        room there go first (for SINK_WAIT at most), so that it never lands in
        the middle of one.  hupt's own write would wait as long anyway."""
        sink = self._sinks[2]
        deadline = time.monotonic() + SINK_WAIT
        sink.flush()
        while sink.buf and not sink.broken and time.monotonic() < deadline:
            select.select([], [sink.fileno()], [], max(0.0, deadline - time.monotonic()))
            sink.flush()
        self._pending(2)

    @property
    def captures_stderr(self) -> bool:
        return 2 in self._sinks

    # -- a new process's pipes -------------------------------------------------------
    def open(self, number: int) -> tuple[int | None, int | None]:
        """Pipes for a process of generation ``number``: the write ends to make its
        stdout and stderr (None: it inherits hupt's), which the caller closes once
        the process has started (or failed to)."""
        ends: list[int | None] = []
        for which in STREAMS:
            if which not in self._sinks:
                ends.append(None)
                continue
            r, w = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # over the user's pipe quota: the default
                fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
            os.set_blocking(r, False)
            self._next_id += 1
            s = _Stream(self._next_id, r, which, number)
            self._streams[r] = s
            self._tail(number)
            self._watch(s)
            self._tell(f"add {s.id} {which} {number}".encode(), r)
            ends.append(w)
        return ends[0], ends[1]

    def relabel(self, old: int, new: int) -> None:
        """Exec mode: the root of generation ``old`` runs ``new``; so do its pipes."""
        for s in self._streams.values():
            if s.gen == old:
                s.gen = new
                self._tell(f"label {s.id} {new}".encode())
        self._tail(new)

    def tail(self, number: int) -> list[str] | None:
        """The last lines generation ``number`` wrote to stderr, up to now (None: its
        stderr does not go through hupt)."""
        if not self.captures_stderr:
            return None
        self.drain(number)
        return list(self._tails.get(number, ()))

    def drain(self, number: int | None = None) -> None:
        """Read now what generation ``number``'s pipes (every pipe: None) hold, up to
        DRAIN_CHUNKS reads each (one that keeps writing is not waited out)."""
        for s in list(self._streams.values()):
            if number is None or s.gen == number:
                self._read(s, chunks=DRAIN_CHUNKS)

    def _tail(self, number: int) -> deque[str]:
        t = self._tails.get(number)
        if t is None:
            t = self._tails[number] = deque(maxlen=TAIL_LINES)
            while len(self._tails) > KEEP_TAILS:
                del self._tails[next(iter(self._tails))]
        return t

    # -- reading -------------------------------------------------------------------------
    def _watch(self, s: _Stream) -> None:
        if self._loop is not None and not s.watched and s.which not in self._paused:
            self._loop.add(s.fd, functools.partial(self._on_readable, s))
            s.watched = True

    def _on_readable(self, s: _Stream, mask: int) -> None:
        self._read(s, chunks=1)  # one chunk a wake-up: the other fds get their turn

    def _unwatch(self, s: _Stream) -> None:
        if self._loop is not None and s.watched:
            self._loop.remove(s.fd)
        s.watched = False

    def _read(self, s: _Stream, *, chunks: int) -> bool:
        """Read what is there (at most ``chunks`` reads); False once the pipe is over."""
        n = 0
        while n < chunks:
            if self._streams.get(s.fd) is not s:
                return False
            try:
                data = os.read(s.fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                data = b""
            if not data:
                self._over(s)
                return False
            self._write(s, *s.lines.feed(data, label(s.gen)))
            n += 1
        return True

    def _write(self, s: _Stream, out: bytes, lines: list[bytes]) -> None:
        if s.which == 2 and lines:
            tail = self._tail(s.gen)
            for line in lines:
                tail.append(line.decode(errors="replace").rstrip("\r")[:TAIL_LINE_CHARS])
        sink = self._sinks[s.which]
        sink.write(out)
        self._pending(s.which)

    def _over(self, s: _Stream) -> None:
        """Every process that had this pipe has closed it: its last line, and done."""
        self._write(s, *s.lines.end(label(s.gen)))
        self._unwatch(s)
        del self._streams[s.fd]
        os.close(s.fd)
        self._tell(f"done {s.id}".encode())

    # -- writing: a full buffer stops the reading ----------------------------------------------
    def _pending(self, which: int) -> None:
        sink = self._sinks[which]
        if self._loop is None:
            return
        if sink.buf and which not in self._writing:
            self._loop.add(sink.fileno(), functools.partial(self._room, which),
                           selectors.EVENT_WRITE)
            self._writing.add(which)
        elif not sink.buf and which in self._writing:
            self._loop.remove(sink.fileno())
            self._writing.discard(which)
        if len(sink.buf) > SINK_HIGH and which not in self._paused:
            self._paused.add(which)
            for s in self._streams.values():
                if s.which == which:
                    self._unwatch(s)

    def _room(self, which: int, mask: int = 0) -> None:
        sink = self._sinks[which]
        sink.flush()
        self._pending(which)
        if which in self._paused and len(sink.buf) <= SINK_LOW:
            self._paused.discard(which)
            for s in list(self._streams.values()):
                if s.which == which:
                    self._watch(s)

    # -- the keeper ----------------------------------------------------------------------------
    def _tell(self, msg: bytes, fd: int | None = None) -> None:
        if self._keeper is None or self._keeper_lost:
            return
        anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      struct.pack("i", fd))]
        try:
            try:
                self._keeper.sendmsg([msg], anc, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except BlockingIOError:  # the keeper is slow to start: a moment more
                select.select([], [self._keeper], [], 1.0)
                self._keeper.sendmsg([msg], anc, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError as e:
            self._keeper_lost = True
            from hupt import log

            log.warn(f"the output keeper is gone ({e.strerror}): if hupt is killed, the "
                     "servers' output has nowhere to go (SIGPIPE)")

    def close(self) -> None:
        """hupt exits: what the pipes hold now is written, the rest is the keeper's.
        (Once: again is nothing.)"""
        if self._closed:
            return
        self._closed = True
        for s in list(self._streams.values()):
            self._unwatch(s)
            if self._read(s, chunks=DRAIN_CHUNKS) and s.lines.partial:
                # Still open (a process outlived its generation): the keeper goes on.
                self._sinks[s.which].write(b"" if s.lines.continued else label(s.gen))
                self._sinks[s.which].write(s.lines.partial)
                s.lines = Lines()
        deadline = time.monotonic() + CLOSE_FLUSH
        for which, sink in self._sinks.items():
            if which in self._writing and self._loop is not None:
                self._loop.remove(sink.fileno())
            while sink.buf and not sink.broken and time.monotonic() < deadline:
                select.select([], [sink.fileno()], [], max(0.0, deadline - time.monotonic()))
                sink.flush()
            sink.close()
        self._writing.clear()
        for s in self._streams.values():
            os.close(s.fd)
        self._streams.clear()
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        self.release_keeper()
        if 2 in self._sinks:
            from hupt import log

            log.before_write(None)


# -- the keeper ------------------------------------------------------------------------------

_KEEPER_CODE = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from hupt.output import keeper_main; keeper_main(int(sys.argv[3]))")


# The keeper waits for its release in a shell: spawned, not forked.  A fork of
# hupt copies its page tables and, while the copy waits, turns every page hupt
# writes on its way to generation 1's exec into a copy-on-write fault: 6 ms of
# that path on one CPU, measured, against about 1 for /bin/sh exec'd from a
# vfork (posix_spawn) that forks itself once.  The subshell is the keeper: its
# parent exits at once, so it is re-parented away from hupt's tree.  fd 3 is
# the channel, 4 the hold; $0.. are the interpreter, the code, the package
# directory and the label (the keeper's name in ps).
_SH = "/bin/sh"
_KEEPER_SH = '(read -r hold <&4; exec 4<&-; exec "$0" -I -S -c "$1" "$2" "$3" 3) &'
_CHAN_FD, _HOLD_FD = 3, 4


def start_keeper() -> tuple[socket.socket, int] | None:
    """Start the output keeper (see the module); return hupt's end of its channel
    and its hold: the keeper execs its interpreter once that fd is closed.

    Before hupt becomes a child subreaper: the keeper's parent exits at once,
    so it is re-parented to init (or the nearest subreaper above hupt), never
    to hupt.  None if it cannot be started (hupt then runs without one).
    ``hupt run`` closes the hold once generation 1 has exec'd and the
    supervisor is built (``Output.release_keeper``): the keeper's interpreter
    start, 10 ms of CPU, would otherwise compete with hupt's own path to that
    exec, and then with the server's first steps (10 to 13 ms from the exec to
    the server's first instruction in 5 of 12 starts on one CPU, 3 to 5 ms
    once moved).  Meanwhile the pipes hold what generation 1 writes and the
    channel queues what hupt sends; hupt gone, the hold closes with it and the
    keeper starts as before.
    """
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError:
        return None
    try:
        hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    except OSError:
        ours.close()
        theirs.close()
        return None
    label = f"hupt-output-keeper:{os.getpid()}"
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        started = _spawn_keeper(theirs.fileno(), hold_r, label, package)
    except OSError:
        started = False
    if not started:
        _fork_keeper(theirs.fileno(), hold_r, hold_w, ours, label, package)
    theirs.close()
    os.close(hold_r)
    return ours, hold_w


def _spawn_keeper(chan: int, hold: int, label: str, package: str) -> bool:
    """The keeper through /bin/sh (see _KEEPER_SH); False where there is none."""
    if not os.access(_SH, os.X_OK):
        return False
    # Above the numbers the dup2s write, so that no source is overwritten first.
    chan, hold = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (chan, hold))
    try:
        actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, chan, _CHAN_FD), (os.POSIX_SPAWN_DUP2, hold, _HOLD_FD)]
        # What hupt inherited open (its own fds are close-on-exec) is not the keeper's.
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in (_CHAN_FD, _HOLD_FD) and _inheritable(fd):
                actions.append((os.POSIX_SPAWN_CLOSE, fd))
        pid = os.posix_spawn(_SH, ["sh", "-c", _KEEPER_SH, sys.executable, _KEEPER_CODE,
                                   package, label], os.environ, file_actions=actions,
                              setsid=True)
    finally:
        os.close(chan)
        os.close(hold)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False  # the listing's own fd, closed since


def _fork_keeper(chan: int, hold_r: int, hold_w: int, ours: socket.socket, label: str,
                 package: str) -> None:
    """The keeper without a shell: a double fork of hupt (see _KEEPER_SH's comment)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the keeper's side, proved by integration tests
        try:
            ours.close()
            os.close(hold_w)
            if os.fork() == 0:
                os.setsid()
                with contextlib.suppress(OSError):
                    os.read(hold_r, 1)  # EOF: hupt released it (or is gone)
                os.set_inheritable(chan, True)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
                os.closerange(3, chan)
                os.closerange(chan + 1, 1 << 20)
                os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", _KEEPER_CODE,
                                          package, label, str(chan)])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def keeper_main(fd: int) -> None:  # pragma: no cover - a process of its own
    """The keeper: hold the pipes while hupt lives, forward them once it is gone."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2, signal.SIGTTOU, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
    chan = socket.socket(fileno=fd)
    pipes: dict[int, tuple[int, int, Lines]] = {}  # id -> (fd, stream, lines)
    labels: dict[int, int] = {}
    while True:
        try:
            msg, anc, _, _ = chan.recvmsg(256, socket.CMSG_SPACE(4))
        except InterruptedError:
            continue
        except OSError:
            break
        got = [struct.unpack("i", data[:4])[0] for level, kind, data in anc
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4]
        if not msg and not got:
            break  # hupt is gone
        words = msg.decode(errors="replace").split()
        if words[:1] == ["add"] and len(words) == 4 and got:
            sid, which, gen = (int(w) for w in words[1:])
            pipes[sid] = (got.pop(), which, Lines())
            labels[sid] = gen
        elif words[:1] == ["label"] and len(words) == 3:
            labels[int(words[1])] = int(words[2])
        elif words[:1] == ["done"] and len(words) == 2:
            entry = pipes.pop(int(words[1]), None)
            if entry is not None:
                os.close(entry[0])
        for extra in got:
            os.close(extra)
    chan.close()
    # hupt is gone: forward every pipe still open until its writers have closed it.
    broken: set[int] = set()

    def put(which: int, data: bytes) -> None:
        while data and which not in broken:
            try:
                n = os.write(which, data)
            except InterruptedError:
                continue
            except OSError:
                broken.add(which)  # nowhere to write: read on, so nobody blocks
                return
            data = data[n:]

    poller = select.poll()
    by_fd = {}
    for sid, (pfd, which, lines) in pipes.items():
        os.set_blocking(pfd, False)
        poller.register(pfd, select.POLLIN)
        by_fd[pfd] = (sid, which, lines)
    while by_fd:
        for pfd, _ev in poller.poll():
            sid, which, lines = by_fd[pfd]
            try:
                data = os.read(pfd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            prefix = label(labels.get(sid, 0))
            if data:
                put(which, lines.feed(data, prefix)[0])
                continue
            put(which, lines.end(prefix)[0])
            poller.unregister(pfd)
            os.close(pfd)
            del by_fd[pfd]
