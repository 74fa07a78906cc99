#!/usr/bin/env python3
"""Delay packets on a link with NFQUEUE, using only the Python standard library.

The lab kernel has no ``netem`` qdisc, so link latency is emulated in user
space: an nft rule ``queue num N`` hands every packet of a link to this
program through a netlink socket (NETLINK_NETFILTER, the "nfnetlink_queue"
subsystem). The kernel keeps the packet; we only get its id. We hold the id
for ``delay +- jitter`` milliseconds and then send the verdict NF_ACCEPT, upon
which the kernel lets the packet continue. Nothing is copied to user space
(copy mode "meta"), so this is cheap.

Jitter draws each packet's delay uniformly from [delay - jitter, delay +
jitter]; like netem's jitter this can reorder packets, which real paths
also do now and then.

Usage (run inside the namespace whose nft rules queue to it)::

    python3 nfdelay.py --queue 0 --delay 50 --jitter 5

It prints ``ready`` on stdout once the queue is bound (the lab waits for that
line, so no packet slips through undelayed), then runs until SIGTERM/SIGINT.
The nft rule should use ``queue num N bypass`` so that packets pass (without
delay) rather than vanish if this program is not running.

The message layouts below are those of <linux/netfilter/nfnetlink_queue.h>.
"""

import argparse
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5       # don't report overruns as errors; just keep going

NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0         # kernel -> us: a queued packet
NFQNL_MSG_VERDICT = 1        # us -> kernel: what to do with one packet
NFQNL_MSG_CONFIG = 2         # us -> kernel: bind the queue, set parameters

NFQA_PACKET_HDR = 1          # attribute in PACKET: id (be32), hw proto, hook
NFQA_VERDICT_HDR = 2         # attribute in VERDICT: verdict (be32), id (be32)

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1          # deliver metadata only, no payload bytes
NFQA_CFG_F_FAIL_OPEN = 1     # if our queue overflows, accept instead of drop

NF_ACCEPT = 1

NLMSG_HDR = struct.Struct('=IHHII')     # len, type, flags, seq, portid (host order)
NFGEN_HDR = struct.Struct('=BBH')       # family, version, res_id (res_id is big endian!)
NLA_HDR = struct.Struct('=HH')          # len, type


def _attr(atype, payload):
    """Encode one netlink attribute (TLV, padded to 4 bytes)."""
    length = NLA_HDR.size + len(payload)
    pad = (4 - length % 4) % 4
    return NLA_HDR.pack(length, atype) + payload + b'\0' * pad


def _nfq_msg(msg_type, queue, attrs, flags=NLM_F_REQUEST, seq=0):
    """Encode a complete nfnetlink_queue message for queue number ``queue``."""
    body = NFGEN_HDR.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + b''.join(attrs)
    mtype = (NFNL_SUBSYS_QUEUE << 8) | msg_type
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), mtype, flags, seq, 0) + body


def _parse_attrs(data, off):
    """Yield (type, payload) for the attributes in ``data`` from ``off`` on."""
    while off + NLA_HDR.size <= len(data):
        alen, atype = NLA_HDR.unpack_from(data, off)
        if alen < NLA_HDR.size:
            break
        yield atype & 0x3fff, data[off + NLA_HDR.size:off + alen]
        off += (alen + 3) & ~3


def _messages(data):
    """Yield (type, flags, seq, body) for each netlink message in a datagram."""
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        mlen, mtype, mflags, seq, _pid = NLMSG_HDR.unpack_from(data, off)
        if mlen < NLMSG_HDR.size:
            break
        yield mtype, mflags, seq, data[off + NLMSG_HDR.size:off + mlen]
        off += (mlen + 3) & ~3


def open_queue(queue, maxlen=10000):
    """Bind netfilter queue ``queue`` and return the netlink socket.

    Raises OSError if the kernel refuses (no nfnetlink_queue support, queue
    already bound by another program, not root...).
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    try:        # a big buffer so bursts are not lost while we sleep in select
        sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)     # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    config = [
        _nfq_msg(NFQNL_MSG_CONFIG, queue,
                 [_attr(NFQA_CFG_CMD, struct.pack('>BBH', NFQNL_CFG_CMD_BIND, 0, 0))],
                 NLM_F_REQUEST | NLM_F_ACK, seq=1),
        _nfq_msg(NFQNL_MSG_CONFIG, queue,
                 [_attr(NFQA_CFG_PARAMS, struct.pack('>IB', 0, NFQNL_COPY_META)),
                  _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack('>I', maxlen)),
                  _attr(NFQA_CFG_FLAGS, struct.pack('>I', NFQA_CFG_F_FAIL_OPEN)),
                  _attr(NFQA_CFG_MASK, struct.pack('>I', NFQA_CFG_F_FAIL_OPEN))],
                 NLM_F_REQUEST | NLM_F_ACK, seq=2),
    ]
    for msg in config:
        sock.send(msg)
        # Wait for the ACK (an NLMSG_ERROR with error 0) so failures are loud.
        data = sock.recv(65536)
        for mtype, _flags, _seq, body in _messages(data):
            if mtype == NLMSG_ERROR:
                err = struct.unpack_from('=i', body)[0]
                if err:
                    sock.close()
                    raise OSError(-err, 'nfqueue config: ' + os.strerror(-err))
    return sock


def run(queue, delay_ms, jitter_ms, ready_out=sys.stdout, seed=None):
    """Hold every packet of ``queue`` for delay +- jitter ms, forever."""
    rng = random.Random(seed)
    sock = open_queue(queue)
    sock.setblocking(False)
    print('ready', file=ready_out, flush=True)
    pending = []            # heap of (release_time, counter, queue, packet_id)
    counter = 0
    while True:
        timeout = None
        if pending:
            timeout = max(0.0, pending[0][0] - time.monotonic())
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                now = time.monotonic()
                for mtype, _flags, _seq, body in _messages(data):
                    if mtype != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                        continue
                    qnum = socket.ntohs(NFGEN_HDR.unpack_from(body)[2])
                    for atype, payload in _parse_attrs(body, NFGEN_HDR.size):
                        if atype == NFQA_PACKET_HDR:
                            pkt_id = struct.unpack_from('>I', payload)[0]
                            wait = delay_ms + rng.uniform(-jitter_ms, jitter_ms)
                            counter += 1
                            heapq.heappush(pending, (now + max(0.0, wait) / 1000.0,
                                                     counter, qnum, pkt_id))
                            break
        # Release everything that is due, all verdicts in one send().
        now = time.monotonic()
        verdicts = []
        while pending and pending[0][0] <= now:
            _t, _c, qnum, pkt_id = heapq.heappop(pending)
            verdicts.append(_nfq_msg(NFQNL_MSG_VERDICT, qnum,
                                     [_attr(NFQA_VERDICT_HDR,
                                            struct.pack('>II', NF_ACCEPT, pkt_id))]))
        if verdicts:
            try:
                sock.send(b''.join(verdicts))
            except OSError:
                pass        # the packet may be gone (e.g. its device was removed)


def main(argv=None):
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--queue', type=int, default=0, help='netfilter queue number')
    parser.add_argument('--delay', type=float, default=0.0, help='delay in ms')
    parser.add_argument('--jitter', type=float, default=0.0, help='+- jitter in ms')
    args = parser.parse_args(argv)
    # SIGTERM (sent by the lab at teardown) should end us quietly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run(args.queue, args.delay, args.jitter)
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    main()
