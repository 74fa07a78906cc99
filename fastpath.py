"""Speed: the MAPPING answered from bytes, replies written at once.

Why this exists: speed.  Nearly every datagram a rendezvous server gets
is a MAPPING request (article point 3), from every peer every keepalive
interval, and the plain answer in rendezvous.py decodes it field by
field, parses the source address string and encodes a reply message: in
Python that is most of the cost.  A well-formed request has exactly one
size and header, so this path checks bytes instead, keeps each source
address's encoded bytes ready (the same peers ask again and again), and
puts the reply together from them.  Anything unusual takes the plain path,
which also names what was wrong.  tests/test_fastpath.py holds the two to
the same bytes.  And it reads up to BURST datagrams a wake-up, not one:
a select() per datagram would be most of the cost.

Replies on the control connections (``WriteAtOnceMixIn``) go to the
socket at once, and are queued only if it does not take them all: waiting
for the loop to say it may write (it nearly always may) costs two
epoll_ctl calls and a loop turn per reply.

Plugged into the server as a mix-in, composed in rendezvous.py:

    class Server(PktinfoMixIn, FastMappingMixIn, WriteAtOnceMixIn, ..., Rendezvous): ...
"""

import logging
import struct
import time

import p2pcommon as wire

log = logging.getLogger('rendezvous')

ADDRESS_CACHE = 4096            # source addresses whose reply bytes we keep ready
BURST = 64                      # datagrams read per wake-up, before others get a turn
MAPPING_SIZE = wire.HEADER_SIZE + wire.TOKEN_SIZE + wire.Endpoint.SIZE
MAPPING_REQUEST = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.MAPPING, 0,
                                   MAPPING_SIZE - wire.HEADER_SIZE)
MAPPING_REPLY = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.MAPPING, wire.FLAG_REPLY,
                                 MAPPING_SIZE - wire.HEADER_SIZE)
TOKEN_END = wire.HEADER_SIZE + wire.TOKEN_SIZE
# An IPv4 endpoint's last 12 address bytes are zeros, XORed with the key.
IPV4_PADDING = wire.XOR_ADDRESS[4:]
ENDPOINT_PORT = struct.Struct('!BH')


class FastMappingMixIn:
    """Answers a plain MAPPING request from bytes; leaves the rest to the server's answer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.addresses = {}         # source host -> (plain host, family, XORed address bytes)

    def receive_datagrams(self, sock, mask):
        """The loop's handler of a UDP socket: as the server's, up to BURST datagrams."""
        now = time.monotonic()
        for _ in range(BURST):
            try:
                data, source = sock.recvfrom(wire.MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:    # e.g. an ICMP error from an earlier send
                log.debug('udp: %s', error)
                continue
            self.answer_mapping(sock, data, source, now)

    def answer_mapping(self, sock, data, source, now, arrival=None):
        """What Rendezvous.answer_mapping does, byte for byte, without decoding."""
        if not plain_mapping_request(data):
            super().answer_mapping(sock, data, source, now, arrival)
            return
        token = data[wire.HEADER_SIZE:TOKEN_END]
        host, family, packed = self.source_address(source[0])
        public = (host, source[1])
        debug = log.isEnabledFor(logging.DEBUG)     # formatting costs, even when not logged
        if debug:
            log.debug('< MAPPING from %s (udp %d)', wire.format_endpoint(public),
                      sock.getsockname()[1])
        if not self.allow_mapping(host, now):
            return
        self.note_mapping(sock, token, public)
        if debug:
            log.debug('> MAPPING to %s (udp %d)', wire.format_endpoint(public),
                      sock.getsockname()[1])
        answer = (MAPPING_REPLY + token
                  + ENDPOINT_PORT.pack(family, source[1] ^ wire.XOR_PORT) + packed)
        if arrival:
            self.send_datagram(sock, answer, source, arrival)
            return
        try:
            sock.sendto(answer, source)     # the common case, without a call more
        except OSError:
            pass                            # a lost answer: the peer asks again

    def source_address(self, host):
        """(plain host, family byte, XORed address bytes) for a source address.

        Parsing an address string is the dearest step of a MAPPING answer,
        and the same peers ask again and again, so the answers are kept,
        a bounded number of them.
        """
        known = self.addresses.get(host)
        if known is None:
            if len(self.addresses) >= ADDRESS_CACHE:
                self.addresses.clear()
            plain = wire.plain((host, 0))[0]
            encoded = wire.ENDPOINT.pack((plain, 0))
            known = self.addresses[host] = (plain, encoded[0], encoded[3:])
        return known


class WriteAtOnceMixIn:
    """Replies go to the socket at once; the server's queue takes only what it did not."""

    def send_encoded(self, peer, data):
        """As the server's, but written at once when nothing waits before it."""
        if peer.output or peer.sock.fileno() < 0:
            super().send_encoded(peer, data)
            return
        try:
            sent = peer.sock.send(data)
        except OSError:
            sent = 0        # full, or broken: the loop's write meets the error and closes
        if sent < len(data):
            super().send_encoded(peer, data[sent:])


def plain_mapping_request(data):
    """True for a well-formed MAPPING request, checked byte by byte.

    This is what nearly every datagram is, and what the decoder would
    accept: the exact size and header, and an endpoint field of family 6,
    or of family 4 with the zero padding (XORed) after the address.
    """
    if len(data) != MAPPING_SIZE or not data.startswith(MAPPING_REQUEST):
        return False
    family = data[TOKEN_END]
    return family == 6 or (family == 4 and data.endswith(IPV4_PADDING))
