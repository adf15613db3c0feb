"""Hardening (issue 13): the runtime directory and pidfile are never followed
through a symlink nor taken from someone else; the CLI believes only its own
user or root on a control socket; control requests are bounded; stale sockets
are cleaned; unused signals are forwarded; repeated log lines are counted;
a reload's timeout has its own exit status."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hupt import cli, control, log
from hupt.control import MAX_REQUEST, Message, Peer
from hupt.errors import ControlError, ControlTimeout, Refused, UsageError
from hupt.safefs import private_dir, write_pidfile
from hupt.supervisor import FORWARDED, Options, Supervisor
from tests.fakes import FakeSystem

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, seteuid)")
OTHER_UID = 54329


# -- the runtime directory ----------------------------------------------------------------


def test_private_dir_is_created_0700_whatever_the_umask(tmp_path: Path) -> None:
    d = tmp_path / "rt"
    old = os.umask(0o277)  # would leave the owner without write and execute
    try:
        assert private_dir(str(d))
    finally:
        os.umask(old)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert private_dir(str(d))  # and accepted as it is from then on


def test_a_missing_directory_is_not_created_when_only_checked(tmp_path: Path) -> None:
    assert private_dir(str(tmp_path / "nope"), create=False) is False
    assert not (tmp_path / "nope").exists()


def test_a_symlinked_directory_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    os.chmod(victim, 0o755)
    link = tmp_path / "hupt-1000"
    link.symlink_to(victim)
    for create in (True, False):
        with pytest.raises(Refused, match="is a symlink"):
            private_dir(str(link), create=create)
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o755, "followed and chmod'ed"


@pytest.mark.parametrize("mode", [0o777, 0o755, 0o701])
def test_a_directory_with_other_permissions_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "rt"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(Refused, match=f"mode {mode:04o}, not 0700"):
        private_dir(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == mode


@root_only
def test_someone_elses_0700_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "rt"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)
    with pytest.raises(Refused, match=f"belongs to uid {OTHER_UID}"):
        private_dir(str(d))


def test_a_plain_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "rt"
    f.write_text("")
    with pytest.raises(Refused, match="not a directory"):
        private_dir(str(f))


def test_the_control_server_refuses_an_unsafe_runtime_dir_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir(mode=0o700)
    link = tmp_path / "rt"
    link.symlink_to(other)
    monkeypatch.setattr(control, "runtime_dir", lambda uid=None: str(link))
    with pytest.raises(Refused):
        control.ControlServer(pid=99999)
    assert not list(other.iterdir()), "a socket was created through the symlink"
    # And `hupt run` says so in one line, exit 2, having started nothing.
    flag = tmp_path / "started"
    monkeypatch.setattr("hupt.tracer.subreaper.become_subreaper", lambda: None)
    assert cli.main(["run", "--", "sh", "-c", f"touch {flag}"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hupt: error: the runtime directory") and "symlink" in err[-1]
    assert not flag.exists()


# -- pidfile ------------------------------------------------------------------------------


def test_pidfile_written_and_rewritten(tmp_path: Path) -> None:
    p = tmp_path / "hupt.pid"
    p.write_text("123456789\n")
    write_pidfile(str(p), 42)
    assert p.read_text() == "42\n"


def test_pidfile_never_follows_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    link = tmp_path / "hupt.pid"
    link.symlink_to(target)
    with pytest.raises(Refused, match="symlink"):
        write_pidfile(str(link), 42)
    assert target.read_text() == "keep me\n"
    dangling = tmp_path / "dangling.pid"
    dangling.symlink_to(tmp_path / "created-through-it")
    with pytest.raises(Refused):
        write_pidfile(str(dangling), 42)
    assert not (tmp_path / "created-through-it").exists()


def test_pidfile_in_a_missing_directory_or_a_directory_or_a_fifo(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        write_pidfile(str(tmp_path / "no" / "hupt.pid"), 42)
    with pytest.raises(UsageError, match="is a directory"):
        write_pidfile(str(tmp_path), 42)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="FIFO"):  # and it does not block
        write_pidfile(str(fifo), 42)


def test_a_bad_pidfile_starts_nothing_and_removes_nothing(fake: FakeSystem,
                                                         tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep\n")
    link = tmp_path / "hupt.pid"
    link.symlink_to(target)
    for path in (str(tmp_path / "missing" / "hupt.pid"), str(tmp_path), str(link)):
        sup = Supervisor(fake, Options(argv=["server"], env={}, pidfile=path), control=False)
        with pytest.raises((UsageError, Refused)):
            sup.run()
        assert not fake.spawns, "a generation started"
    assert link.is_symlink() and target.read_text() == "keep\n"


def test_pidfile_errors_are_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("hupt.tracer.subreaper.become_subreaper", lambda: None)
    flag = tmp_path / "started"
    for pidfile, needle in ((tmp_path / "no" / "x.pid", "does not exist"),
                            (tmp_path, "is a directory")):
        code = cli.main(["run", "--pidfile", str(pidfile), "--", "sh", "-c", f"touch {flag}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == cli.EXIT_USAGE, err
        assert err[-1].startswith("hupt: error: --pidfile") and needle in err[-1], err
        assert not any("Traceback" in line for line in err)
    assert not flag.exists()


# -- the control socket: the client's trust ---------------------------------------------


@contextlib.contextmanager
def fake_hupt(path: str, answers: list[Message], *, euid: int | None = None,
              pause: float = 0.0) -> Iterator[None]:
    """A listener on ``path`` answering one client with ``answers`` (listen() as ``euid``)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o777)
    if euid is not None:
        os.seteuid(euid)  # SO_PEERCRED is taken at listen()
    try:
        srv.listen(1)
    finally:
        if euid is not None:
            os.seteuid(0)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                for a in answers:
                    conn.sendall(json.dumps(a).encode() + b"\n")
                    time.sleep(pause)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        srv.close()
        t.join(10)


@root_only
def test_the_cli_believes_no_one_but_its_own_user_or_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "runtime_dir", lambda uid=None: str(tmp_path))
    done = [{"event": "result", "ok": True, "reason": "reloaded (not really)"}]
    with fake_hupt(str(tmp_path / "777.sock"), done, euid=OTHER_UID), \
            pytest.raises(Refused, match=f"runs as uid {OTHER_UID}"):
        list(control.request(777, {"cmd": "reload"}, timeout=5))
    (tmp_path / "777.sock").unlink()
    with fake_hupt(str(tmp_path / "777.sock"), done):  # root (and this user): believed
        assert list(control.request(777, {"cmd": "reload"}, timeout=5)) == done


def test_reload_timeout_counts_the_whole_exchange(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "runtime_dir", lambda uid=None: str(tmp_path))
    progress = [{"event": "progress", "message": f"step {i}"} for i in range(30)]
    with fake_hupt(str(tmp_path / "778.sock"), progress, pause=0.1):
        t0 = time.monotonic()
        with pytest.raises(ControlTimeout):  # progress every 0.1 s must not extend it
            list(control.request(778, {"cmd": "reload"}, timeout=0.5))
        assert time.monotonic() - t0 < 2.0


def test_reload_timeout_exits_3_saying_it_may_go_on(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def request(*a: Any, **kw: Any) -> Iterator[Message]:
        raise ControlTimeout("hupt 5 gave no result within 2 s")
        yield {}

    monkeypatch.setattr(control, "find_instance", lambda pid: 5)
    monkeypatch.setattr(control, "request", request)
    assert cli.main(["reload", "--timeout", "2", "5"]) == cli.EXIT_TIMEOUT == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "may still be going on" in err[0], err


def test_every_exit_status_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out
    for code in (0, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_TIMEOUT, 130):
        assert f"\n  {code} " in out, code
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert "| 3 | `hupt reload --timeout` expired" in readme
    assert "status 3 if `--timeout` expired first" in readme


# -- the control socket: hupt's side ------------------------------------------------------


class _Client:
    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ours.setblocking(False)
        self.messages: list[Message] = []
        self.peer = Peer(self.ours, lambda p, m: self.messages.append(m), lambda p: None)

    def answers(self) -> list[Message]:
        self.theirs.settimeout(2)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := self.theirs.recv(65536):
                data += chunk
        return [json.loads(line) for line in data.splitlines()]

    def close(self) -> None:
        self.peer.close()
        self.theirs.close()


@pytest.fixture
def client() -> Iterator[_Client]:
    c = _Client()
    yield c
    c.close()


def test_an_oversized_request_is_answered_and_hung_up_on(
        client: _Client, capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(color=False)
    big = b'{"cmd": "' + b"x" * 100_000  # never a newline: would be buffered for ever
    client.theirs.setblocking(False)
    sent = 0
    with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
        while sent < len(big) and not client.peer.closed:
            sent += client.theirs.send(big[sent:sent + 8192])
            client.peer.readable()
    assert client.peer.closed and not client.messages
    [answer] = client.answers()
    assert answer["ok"] is False and "too large" in answer["reason"]
    assert len(client.peer._in) == 0
    assert capsys.readouterr().err.count("refused a control request over") == 1


def test_an_oversized_line_is_refused_even_whole(client: _Client) -> None:
    client.theirs.sendall(json.dumps({"cmd": "status", "pad": "x" * MAX_REQUEST}).encode()
                          + b"\n")
    client.peer.readable()
    assert client.peer.closed and not client.messages
    assert "too large" in client.answers()[0]["reason"]


@pytest.mark.parametrize("line", [b"[1, 2]", b'"reload"', b"42", b"null", b"[" * 4000])
def test_json_that_is_not_an_object_gets_an_error_result(client: _Client, line: bytes) -> None:
    client.theirs.sendall(line + b"\n")
    client.peer.readable()
    assert not client.messages
    [answer] = client.answers()
    assert answer["event"] == "result" and answer["ok"] is False
    assert "malformed request" in answer["reason"]


def test_an_object_still_reaches_the_commands(client: _Client) -> None:
    client.theirs.sendall(b'{"cmd": "ping"}\n')
    client.peer.readable()
    assert client.messages == [{"cmd": "ping"}]


# -- stale sockets ------------------------------------------------------------------------


def _bound(path: Path, *, listen: bool, kind: int = socket.SOCK_STREAM) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(str(path))
    if listen:
        s.listen(1)
    return s


def test_stale_sockets_and_aliases_are_removed_live_ones_kept(tmp_path: Path) -> None:
    live = _bound(tmp_path / "100.sock", listen=True)
    _bound(tmp_path / "200.sock", listen=False).close()  # a killed hupt's
    live_notify = _bound(tmp_path / "100.1.notify", listen=False, kind=socket.SOCK_DGRAM)
    _bound(tmp_path / "200.1.notify", listen=False, kind=socket.SOCK_DGRAM).close()
    os.symlink("100.sock", tmp_path / "101.sock")  # an attached server's alias
    os.symlink("200.sock", tmp_path / "201.sock")
    os.symlink("300.sock", tmp_path / "301.sock")  # dangling
    (tmp_path / "notes.txt").write_text("not ours to judge")
    try:
        removed = control.clean_stale(str(tmp_path))
        assert sorted(os.path.basename(p) for p in removed) == [
            "200.1.notify", "200.sock", "201.sock", "301.sock"]
        assert sorted(os.listdir(tmp_path)) == ["100.1.notify", "100.sock", "101.sock",
                                                "notes.txt"]
    finally:
        live.close()
        live_notify.close()


def test_a_new_control_server_cleans_up_and_is_listening_under_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt = tmp_path / "rt"
    monkeypatch.setattr(control, "runtime_dir", lambda uid=None: str(rt))
    private_dir(str(rt))
    _bound(rt / "4242.sock", listen=False).close()
    server = control.ControlServer(pid=4343)
    try:
        assert sorted(os.listdir(rt)) == ["4343.sock"]
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(rt / "4343.sock"))
    finally:
        server.close()
    assert os.listdir(rt) == []


def test_status_cleans_up_stale_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hupt import status

    rt = tmp_path / "rt"
    monkeypatch.setattr(control, "runtime_dir", lambda uid=None: str(rt))
    assert status.collect(None)["instances"] == [] and not rt.exists()
    private_dir(str(rt))
    _bound(rt / "4242.sock", listen=False).close()
    assert status.collect(None)["instances"] == []
    assert os.listdir(rt) == []


def test_status_and_find_refuse_an_unsafe_runtime_dir(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from hupt import status

    rt = tmp_path / "rt"
    rt.mkdir(mode=0o777)
    os.chmod(rt, 0o777)
    monkeypatch.setattr(control, "runtime_dir", lambda uid=None: str(rt))
    with pytest.raises(Refused):
        status.collect(None)
    with pytest.raises(Refused):
        control.find_instance(os.getpid())
    with pytest.raises(ControlError):  # missing: nothing to talk to
        monkeypatch.setattr(control, "runtime_dir", lambda uid=None: str(tmp_path / "none"))
        control.find_instance(os.getpid())


# -- signals ------------------------------------------------------------------------------


def test_forwarded_signals_are_those_hupt_does_not_use() -> None:
    used = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGCHLD}
    never = {signal.SIGKILL, signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
             signal.SIGCONT, signal.SIGPIPE, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE,
             signal.SIGILL, signal.SIGTRAP, signal.SIGABRT, signal.SIGSYS, signal.SIGXCPU,
             signal.SIGXFSZ, signal.SIGPROF, signal.SIGVTALRM, signal.SIGURG}
    fwd = set(FORWARDED)
    assert not fwd & (used | never)
    # Every other catchable signal is forwarded: none is left to kill hupt.
    assert fwd | used | never == set(signal.valid_signals())
    assert {signal.SIGUSR1, signal.SIGQUIT, signal.SIGWINCH, signal.SIGRTMIN} <= fwd


def test_run_help_documents_forwarding(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "USR1, QUIT, WINCH" in out and "forwarded to the serving generation" in out


def test_usr1_goes_to_the_serving_generations_main_processes(fake: FakeSystem) -> None:
    sup = Supervisor(fake, Options(argv=["server"], env={}, multi=3), control=False)
    sup.start()
    gen = sup.gens[0]
    gen.copies.extend([900, 901])
    gen.pids |= {900, 901, 950}  # 950: a worker of a copy, not signalled itself
    sup._on_signal(signal.SIGUSR1, None)
    sup._on_signal(signal.SIGRTMIN + 2, None)
    sup._handle_signals()
    sent = {(p, s) for p, s in fake.signals}
    assert sent == {(p, s) for p in gen.copies for s in (signal.SIGUSR1, signal.SIGRTMIN + 2)}
    assert sup.current is gen and not sup.stopping


def test_a_forwarded_signal_with_no_generation_serving_is_dropped(fake: FakeSystem) -> None:
    sup = Supervisor(fake, Options(argv=["server"], env={}), control=False)
    sup._on_signal(signal.SIGUSR1, None)
    sup._handle_signals()
    assert fake.signals == []


# -- repeated log lines -------------------------------------------------------------------


def test_identical_lines_are_counted_not_repeated(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    now = [1000.0]
    monkeypatch.setattr(log, "_clock", lambda: now[0])
    log.configure(color=False)
    for _ in range(1000):
        log.error("accept failed: EMFILE")
        now[0] += 0.001
    log.warn("something else")
    lines = capsys.readouterr().err.splitlines()
    assert sum("accept failed: EMFILE" in line for line in lines) == log.REPEAT_BURST
    assert lines[-1].endswith("warn: something else")
    now[0] += log.REPEAT_WINDOW  # the window is over: the count comes out, then the line
    log.error("accept failed: EMFILE")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(f"error: … repeated {1000 - log.REPEAT_BURST} times: "
                             "accept failed: EMFILE")
    assert lines[1].endswith("error: accept failed: EMFILE")
    log.flush()  # nothing suppressed since: nothing to say
    assert capsys.readouterr().err == ""


def test_alternating_errors_are_bounded_too_and_flushed_at_exit(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(log, "_clock", lambda: 5.0)
    log.configure(color=False)
    for i in range(600):
        log.error(f"error {'AB'[i % 2]}\nTraceback: the same every time")
    log.flush()
    lines = [line for line in capsys.readouterr().err.splitlines() if "hupt[" in line]
    assert len(lines) == 2 * log.REPEAT_BURST + 2, lines
    assert any(f"… repeated {300 - log.REPEAT_BURST} times: error A" in line for line in lines)


def test_distinct_lines_are_never_suppressed(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(color=False)
    for i in range(200):
        log.info(f"generation {i} is ready")
    assert len(capsys.readouterr().err.splitlines()) == 200
