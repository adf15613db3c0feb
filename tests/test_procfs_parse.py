"""The /proc parsers of hupt.tracer.procfs, on text captured from Linux 6.18."""

from __future__ import annotations

import pytest

from hupt.tracer import procfs
from hupt.tracer.abi import (
    EPOLLERR,
    EPOLLET,
    EPOLLEXCLUSIVE,
    EPOLLHUP,
    EPOLLONESHOT,
    O_CLOEXEC,
    O_NONBLOCK,
)
from hupt.tracer.procfs import EpollEntry

STAT_CAT = (b"12850 (cat) R 12846 12846 2255 0 -1 4194304 97 0 0 0 0 0 0 0 20 0 1 0 52866 "
            b"3133440 412 18446744073709551615 94529769111552 94529769131433 0 0 0 0 0 0 0\n")

STATUS_HEAD = (
    b"Name:\tcat\nUmask:\t0022\nState:\tR (running)\nTgid:\t12848\nNgid:\t0\nPid:\t12850\n"
    b"PPid:\t12846\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t256\n"
    b"Groups:\t \nNStgid:\t12848\nVmPeak:\t    3060 kB\nThreads:\t1\n"
    b"SigBlk:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t2\nSeccomp_filters:\t1\n"
)

# An epoll fd with a listener registered EPOLLIN|EPOLLET and a pipe with
# EPOLLIN|EPOLLOUT|EPOLLONESHOT (the kernel adds EPOLLERR|EPOLLHUP), then the
# line kernel-facts quotes, then one with a full 64-bit data value.
FDINFO_EPOLL = (
    b"pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n"
    b"tfd:        4 events: 80000019 data:                4  pos:0 ino:2fe8 sdev:9\n"
    b"tfd:        5 events: 4000001d data:                5  pos:0 ino:2fe9 sdev:f\n"
    b"tfd:        5 events: 40000019 data: 5 pos:0 ino:3a6db3 sdev:9\n"
    b"tfd:       12 events: 10000019 data: deadbeefcafe1234  pos:0 ino:d247 sdev:f\n"
)


def test_stat_plain() -> None:
    st = procfs.parse_stat(STAT_CAT)
    assert (st.pid, st.comm, st.state, st.ppid) == (12850, b"cat", "R", 12846)


@pytest.mark.parametrize("comm", [b"a b", b"x) (y", b"))", b"(", b"tab\there", b"new\nline",
                                  b"\xff\xfe", b"Z 1 2 )"])
def test_stat_hostile_comm(comm: bytes) -> None:
    # comm is whatever the process set with PR_SET_NAME (15 bytes, any but NUL).
    line = b"77 (" + comm + b") S 4242 77 77 0 -1 4194560 0 0\n"
    st = procfs.parse_stat(line)
    assert (st.pid, st.comm, st.state, st.ppid) == (77, comm, "S", 4242)


@pytest.mark.parametrize("bad", [b"", b"12 cat R 1", b"12 (cat) R", b"12 (cat"])
def test_stat_malformed(bad: bytes) -> None:
    with pytest.raises(ValueError):
        procfs.parse_stat(bad)


def test_status_fields() -> None:
    f = procfs.parse_status(STATUS_HEAD)
    assert f["Tgid"] == "12848"
    assert f["Pid"] == "12850"
    assert f["TracerPid"] == "0"
    assert f["Uid"] == "0\t0\t0\t0"
    assert f["Groups"] == ""
    assert f["State"] == "R (running)"
    assert f["Seccomp_filters"] == "1"
    assert f["VmPeak"] == "3060 kB"


def test_status_undecodable_name_survives() -> None:
    f = procfs.parse_status(b"Name:\t\xff\xfe\nTgid:\t9\n")
    assert f["Tgid"] == "9"
    assert f["Name"].encode("utf-8", "surrogateescape") == b"\xff\xfe"


@pytest.mark.parametrize(("text", "flags"), [
    (b"pos:\t0\nflags:\t02000002\nmnt_id:\t10\nino:\t12264\n", 0o2000002),
    (b"pos:\t0\nflags:\t04002\nmnt_id:\t10\nino:\t12264\n", 0o4002),
    (b"pos:\t0\nflags:\t02004002\nmnt_id:\t10\n", 0o2004002),
])
def test_fd_flags(text: bytes, flags: int) -> None:
    assert procfs.parse_fd_flags(text) == flags


def test_fd_flags_bits() -> None:
    flags = procfs.parse_fd_flags(b"pos:\t0\nflags:\t02004002\n")
    assert flags & O_NONBLOCK
    assert flags & O_CLOEXEC
    assert not procfs.parse_fd_flags(b"flags:\t02\n") & (O_NONBLOCK | O_CLOEXEC)


def test_fd_flags_missing() -> None:
    with pytest.raises(ValueError):
        procfs.parse_fd_flags(b"pos:\t0\n")


def test_epoll_fdinfo() -> None:
    entries = procfs.parse_epoll_fdinfo(FDINFO_EPOLL)
    assert entries == [
        EpollEntry(tfd=4, events=0x80000019, data=4, ino=0x2FE8),
        EpollEntry(tfd=5, events=0x4000001D, data=5, ino=0x2FE9),
        EpollEntry(tfd=5, events=0x40000019, data=5, ino=0x3A6DB3),
        EpollEntry(tfd=12, events=0x10000019, data=0xDEADBEEFCAFE1234, ino=0xD247),
    ]
    assert entries[0].events & EPOLLET
    assert entries[1].events & EPOLLONESHOT
    assert entries[3].events & EPOLLEXCLUSIVE
    assert all(e.events & (EPOLLERR | EPOLLHUP) == EPOLLERR | EPOLLHUP for e in entries)


def test_epoll_fdinfo_no_registrations() -> None:
    assert procfs.parse_epoll_fdinfo(b"pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\n") == []


@pytest.mark.parametrize(("raw", "items"), [
    (b"", []),
    (b"python3\0-m\0http.server\0", [b"python3", b"-m", b"http.server"]),
    (b"A=1\0B=\0\0C=x\0", [b"A=1", b"B=", b"", b"C=x"]),
    (b"rewritten title", [b"rewritten title"]),  # setproctitle drops the NULs
])
def test_nul_list(raw: bytes, items: list[bytes]) -> None:
    assert procfs.parse_nul_list(raw) == items


@pytest.mark.parametrize(("link", "ino"), [
    ("socket:[12264]", 12264),
    ("socket:[0]", 0),
    ("anon_inode:[eventpoll]", None),
    ("pipe:[53831]", None),
    ("/tmp/socket:[1]", None),
    ("socket:[12]x", None),
])
def test_socket_link(link: str, ino: int | None) -> None:
    assert procfs.parse_socket_link(link) == ino
