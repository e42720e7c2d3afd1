"""The queue's config message as bytes, the kernel's answers parsed, and `apply()` against a
scripted peer on a socketpair standing in for the kernel (no privilege, no netlink).

Netlink headers are in host byte order: the literals below are for little-endian hosts (x86-64,
arm64), the attributes' values are big-endian as nfnetlink_queue wants them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from interceptor import nfqconfig, service
from interceptor.config import InterceptorConfig
from interceptor.nfqconfig import Ack, Queued, config_message, parse, verdict_message

CONFIG_Q5 = bytes.fromhex(
    "2c000000" "0203" "0500" "0100676d" "00000000"  # nlmsghdr: 44 bytes, QUEUE/CONFIG,
    #                                                 REQUEST|ACK, our seq, port id 0
    "00" "00" "0005"                                # nfgenmsg: AF_UNSPEC, version 0, queue 5
    "0800" "0300" "00000010"                        # NFQA_CFG_QUEUE_MAXLEN 16
    "0800" "0400" "00000001"                        # NFQA_CFG_MASK: FAIL_OPEN
    "0800" "0500" "00000001")                       # NFQA_CFG_FLAGS: FAIL_OPEN on


def test_config_message_sets_fail_open_and_the_length() -> None:
    assert config_message(5, max_len=16, fail_open=True) == CONFIG_Q5


def test_config_message_clears_fail_open_and_names_big_queues_big_endian() -> None:
    message = config_message(0x1234, max_len=8192, fail_open=False)
    assert message[16:20] == bytes.fromhex("00001234")
    assert message[20:] == bytes.fromhex("0800030000002000" "0800040000000001"
                                         "0800050000000000")  # mask names it, value 0


def test_verdict_message_repeats_one_packet() -> None:
    assert verdict_message(5, 0x01020304) == bytes.fromhex(
        "20000000" "0103" "0100" "00000000" "00000000"  # 32 bytes, QUEUE/VERDICT, REQUEST
        "00000005"
        "0c00" "0200" "00000004" "01020304")            # NFQA_VERDICT_HDR: NF_REPEAT, id


def ack(error: int = 0, seq: int = nfqconfig.CONFIG_SEQ,
        request_type: int = nfqconfig.CONFIG_TYPE) -> bytes:
    """struct nlmsgerr as the kernel sends it for a request (capped: only its header)."""
    request = struct.pack("=IHHII", 44, request_type, 5, seq, 0)
    return struct.pack("=IHHII", 36, 2, 0x100, seq, 4242) + struct.pack("=i", -error) + request


def packet(packet_id: int, first: bytes = b"") -> bytes:
    """NFQNL_MSG_PACKET with `first` attributes before NFQA_PACKET_HDR (7 bytes, padded)."""
    body = (b"\x02\x00\x00\x05" + first
            + struct.pack("=HH", 11, 1) + struct.pack("!IHB", packet_id, 0x0800, 0) + b"\0")
    return struct.pack("=IHHII", 16 + len(body), 0x0300, 0, 0, 0) + body


@pytest.mark.parametrize(("datagram", "expected"), [
    (ack(), [Ack(nfqconfig.CONFIG_TYPE, nfqconfig.CONFIG_SEQ, 0)]),
    (ack(errno.EPERM), [Ack(nfqconfig.CONFIG_TYPE, nfqconfig.CONFIG_SEQ, errno.EPERM)]),
    (packet(42), [Queued(42)]),
    # The mark (NFQA_MARK, 3) first; several messages in one datagram.
    (packet(7, struct.pack("=HH", 8, 3) + b"\0\0\0\x02") + ack(), [
        Queued(7), Ack(nfqconfig.CONFIG_TYPE, nfqconfig.CONFIG_SEQ, 0)]),
    (packet(9)[:-6], []),                            # cut short: nothing made up
    (struct.pack("=IHHII", 16, 3, 0, 0, 0), []),     # NLMSG_DONE and the like: skipped
    (b"\x00" * 20, []),                              # a zero length does not loop
])
def test_parse(datagram: bytes, expected: list[object]) -> None:
    assert list(parse(datagram)) == expected


@pytest.fixture
def kernel() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(ours, the stand-in kernel): datagrams keep their boundaries, as netlink's do."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        yield ours, theirs


def test_apply_puts_back_what_was_queued_before_the_ack(
        kernel: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = kernel
    for datagram in (packet(7), packet(8), ack(seq=99), ack()):  # 99: not ours, ignored
        theirs.send(datagram)
    assert nfqconfig.apply(ours.fileno(), 5, max_len=16, fail_open=True) == 2
    sent = [theirs.recv(1000) for _ in range(3)]
    assert sent == [CONFIG_Q5, verdict_message(5, 7), verdict_message(5, 8)]
    assert os.get_blocking(ours.fileno())  # the shared socket stays blocking for netfilterqueue


def test_apply_raises_what_the_kernel_refused(kernel: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = kernel
    theirs.send(ack(errno.EPERM))
    with pytest.raises(PermissionError):
        nfqconfig.apply(ours.fileno(), 5, max_len=16, fail_open=True)


def test_apply_gives_up_without_an_answer(kernel: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(TimeoutError):
        nfqconfig.apply(kernel[0].fileno(), 5, max_len=16, fail_open=True, timeout=0.05)


@pytest.mark.parametrize(("fail", "queue_full"), [("open", "pass"), ("closed", "drop")])
def test_the_interceptor_asks_for_what_fail_says(monkeypatch: pytest.MonkeyPatch, fail: str,
                                                 queue_full: str) -> None:
    asked: list[tuple[int, int, bool]] = []

    def apply(fd: int, queue: int, *, max_len: int, fail_open: bool) -> int:
        asked.append((queue, max_len, fail_open))
        return 0

    monkeypatch.setattr(nfqconfig, "apply", apply)
    config = InterceptorConfig(queue=3, queue_max_len=64, fail=fail)
    assert service._configure_queue(-1, config) == queue_full
    assert asked == [(3, 64, fail == "open")]


def test_a_refused_config_is_one_warning_and_the_interceptor_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def apply(fd: int, queue: int, *, max_len: int, fail_open: bool) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(nfqconfig, "apply", apply)
    with caplog.at_level(logging.INFO, logger="mailgate"):
        assert service._configure_queue(-1, InterceptorConfig()) == "drop"
    record, = caplog.records
    assert (record.levelno, record.getMessage()) == (logging.WARNING,
                                                     "interceptor_queue_config_failed")
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["queue_full"] == "drop" and "not supported" in fields["error"], fields
