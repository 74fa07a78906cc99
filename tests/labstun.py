#!/usr/bin/env python3
"""A STUN server for the NAT lab: just enough for miniupnpd's start-up check.

miniupnpd refuses to map ports while its WAN address is in a reserved
block, and every lab address is (198.51.100.0/24 and 203.0.113.0/24 are
RFC 5737 documentation ranges; miniupnpd's ``addr_is_reserved()`` lists
them).  Its way out is ``ext_perform_stun=yes``: it sends four STUN Binding
Requests from four ports, asking (with RFC 5780's CHANGE-REQUEST) for the
answer from the same address and port, another port, another address, and
both; only when all four answers arrive and each shows its own port
unchanged does it believe it holds a public address and enable port
forwarding.  So this server listens on two addresses times two ports, and
answers each request from the socket its CHANGE-REQUEST asks for.

Usage (inside the server's namespace)::

    python3 labstun.py 203.0.113.10 203.0.113.11 34780

It prints ``ready`` once its four sockets are bound, then answers until it
is killed.
"""

import argparse
import select
import socket
import struct
import sys

MAGIC_COOKIE = 0x2112A442           # RFC 5389 section 6
HEADER = struct.Struct('!HHI12s')   # type, length, cookie, transaction id
ATTRIBUTE = struct.Struct('!HH')    # type, length
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
CHANGE_REQUEST = 0x0003             # RFC 5780 section 7.2
XOR_MAPPED_ADDRESS = 0x0020         # RFC 5389 section 15.2
CHANGE_IP = 0x4
CHANGE_PORT = 0x2


def change_flags(request):
    """The CHANGE-REQUEST flags of a Binding Request (0 when it has none)."""
    offset = HEADER.size
    while offset + ATTRIBUTE.size <= len(request):
        kind, length = ATTRIBUTE.unpack_from(request, offset)
        offset += ATTRIBUTE.size
        if kind == CHANGE_REQUEST and length == 4 and offset + 4 <= len(request):
            return struct.unpack_from('!I', request, offset)[0]
        offset += (length + 3) & ~3     # attributes are padded to 4 bytes
    return 0


def binding_success(transaction, source):
    """A Binding Success Response that tells ``source`` its address (XOR-MAPPED-ADDRESS)."""
    address = struct.unpack('!I', socket.inet_aton(source[0]))[0] ^ MAGIC_COOKIE
    value = struct.pack('!BBHI', 0, 1, source[1] ^ (MAGIC_COOKIE >> 16), address)
    body = ATTRIBUTE.pack(XOR_MAPPED_ADDRESS, len(value)) + value
    return HEADER.pack(BINDING_SUCCESS, len(body), MAGIC_COOKIE, transaction) + body


def serve(addresses, port):
    """Answer Binding Requests forever, each from the socket its flags ask for."""
    sockets = {}
    for a, address in enumerate(addresses):
        for p in (0, 1):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((address, port + p))
            sockets[a, p] = s
    print('ready', flush=True)
    where = {s: key for key, s in sockets.items()}
    while True:
        ready, _, _ = select.select(list(where), [], [])
        for s in ready:
            request, source = s.recvfrom(2048)
            if len(request) < HEADER.size:
                continue
            kind, _length, _cookie, transaction = HEADER.unpack_from(request)
            if kind != BINDING_REQUEST:
                continue
            flags = change_flags(request)
            a, p = where[s]
            answer_from = sockets[a ^ bool(flags & CHANGE_IP), p ^ bool(flags & CHANGE_PORT)]
            answer_from.sendto(binding_success(transaction, source), source)


def main(argv=None):
    """Command line: two addresses and the first of two ports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('address', nargs=2)
    parser.add_argument('port', type=int)
    args = parser.parse_args(argv)
    serve(args.address, args.port)


if __name__ == '__main__':
    sys.exit(main())
