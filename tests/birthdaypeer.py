#!/usr/bin/env python3
"""One side of birthday.py's search, alone: no server, no client (a lab driver).

    birthdaypeer.py open  TOKEN --target HOST:PORT      # behind the symmetric NAT
    birthdaypeer.py probe TOKEN --address HOST --port P # behind the cone NAT

Both sides are given the session token and each other's public side, as
INTRODUCE would give them: the opener the cone's public endpoint (its
port P, which a cone NAT keeps), the prober the symmetric NAT's address.
Each bounces a PUNCH as the client does, stops at the first message that
passes the session's MAC check, or at the give-up time, and prints one
JSON line: met (true or false), ms, sent (birthday datagrams), open
(sockets of the search still open: the winner's, or none).
"""

import argparse
import json
import selectors
import sys
import time

import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import birthday                 # noqa: E402 (the checkout's modules, above)
import p2pcommon as wire        # noqa: E402
from identity import SessionKey  # noqa: E402


def main(argv=None):
    """Run one side; exit 0 whether or not it met (the JSON line says)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('role', choices=(birthday.OPEN, birthday.PROBE))
    parser.add_argument('token', help='the session token, 32 hex digits')
    parser.add_argument('--target', help='open: the cone side public HOST:PORT')
    parser.add_argument('--address', help="probe: the symmetric NAT's public address")
    parser.add_argument('--port', type=int, default=0, help='probe: our UDP port')
    parser.add_argument('--sockets', type=int, default=birthday.SOCKETS)
    parser.add_argument('--rate', type=float, default=birthday.RATE)
    parser.add_argument('--time', type=float, default=birthday.GIVE_UP)
    args = parser.parse_args(argv)
    key = SessionKey(bytes.fromhex(args.token), 0 if args.role == birthday.OPEN else 1)
    selector = selectors.DefaultSelector()
    met = []
    now = time.monotonic()

    def read(sock, mask):
        """Take the peer's messages; bounce a PUNCH; the first one meets."""
        while True:
            try:
                data, source = sock.recvfrom(wire.MAX_DATAGRAM + 1)
                message = wire.decode(data)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, wire.ProtocolError):
                continue
            if message.type not in wire.PEER_TYPES or not key.check(message):
                continue        # not the peer: ignored
            if message.type == wire.PUNCH:
                sock.sendto(key.seal(wire.PUNCH_ACK), source)
            if not met:
                met.append((sock, source, time.monotonic()))

    if args.role == birthday.OPEN:
        search = birthday.Sockets(selector, read, key.seal, wire.parse_endpoint(args.target),
                                  now, args.sockets, args.rate, args.time)
    else:
        udp = wire.UDPSocket(args.port)
        udp.setblocking(False)
        selector.register(udp, selectors.EVENT_READ, read)
        search = birthday.Probes(udp.sendto, key.seal, args.address, now, args.rate, args.time)
    while not met and not search.expired(time.monotonic()):
        search.tick(time.monotonic())
        for selected, mask in selector.select(0.005):
            selected.data(selected.fileobj, mask)
    if met and args.role == birthday.OPEN:
        search.keep(*met[0][:2])
    ms = (met[0][2] - now) * 1000 if met else None
    left = len(search.open) if args.role == birthday.OPEN else 0
    print(json.dumps(dict(met=bool(met), ms=ms, sent=search.sent, open=left)), flush=True)
    search.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
