"""Answers that leave from the address their request came to (IP_PKTINFO).

Why this exists: a UDP socket bound to the wildcard address (the
server's default, `::`) sends from whichever address the kernel prefers,
and on a host with several that is not always the one the peer asked; the
peer's NAT or firewall then drops our answer as unsolicited, and the peer
never learns its mapping (article point 3).  So on a wildcard socket the
kernel is asked to tell, with each datagram, the address it came to, and
the answer names that address as its source.  It costs about a tenth of
the MAPPING rate (recvmsg and sendmsg); sockets bound to one address do
not need it and do not pay it.

Plugged into the server as a mix-in, composed in rendezvous.py:

    class Server(PktinfoMixIn, FastMappingMixIn, ..., Rendezvous): ...
"""

import logging
import selectors
import socket
import time

import p2pcommon as wire

log = logging.getLogger('rendezvous')

WILDCARDS = ('::', '0.0.0.0')
IP_PKTINFO = getattr(socket, 'IP_PKTINFO', 8)    # Linux's number: Python 3.11 has no name for it
ASK_PKTINFO = {socket.AF_INET6: (socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO),
               socket.AF_INET: (socket.IPPROTO_IP, IP_PKTINFO)}
PKTINFO_SPACE = socket.CMSG_SPACE(20)           # struct in6_pktinfo, the larger of the two
BURST = 64                  # datagrams read per wake-up, as fastpath.BURST


class PktinfoMixIn:
    """The server's UDP sockets on a wildcard address answer from where each request came."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key in list(self.selector.get_map().values()):
            sock = key.fileobj
            if sock.type == socket.SOCK_DGRAM and sock.getsockname()[0] in WILDCARDS:
                sock.setsockopt(*ASK_PKTINFO[sock.family], 1)
                self.selector.modify(sock, selectors.EVENT_READ, self.receive_with_pktinfo)

    def receive_with_pktinfo(self, sock, mask):
        """The loop's handler of a wildcard UDP socket: as receive_datagrams, with PKTINFO.

        recvmsg costs about a tenth more than recvfrom, which is why only
        these sockets use it.
        """
        now = time.monotonic()
        for _ in range(BURST):
            try:
                data, ancillary, _, source = sock.recvmsg(wire.MAX_DATAGRAM + 1, PKTINFO_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:    # e.g. an ICMP error from an earlier send
                log.debug('udp: %s', error)
                continue
            self.answer_mapping(sock, data, source, now, answer_from(ancillary))

    def send_datagram(self, sock, data, destination, arrival=None):
        """As the server's, but from the address the request came to, when we know it."""
        if not arrival:
            super().send_datagram(sock, data, destination)
            return
        try:
            sock.sendmsg([data], arrival, 0, destination)
        except OSError:
            pass        # a lost answer: the peer asks again


def answer_from(ancillary):
    """Ancillary data that makes an answer leave from the address its request came to.

    recvmsg gave us the request's PKTINFO: in6_pktinfo is the address (16
    bytes) and the interface (4); in_pktinfo is the interface, the local
    address, and the header's destination (4 bytes each).  The answer's
    PKTINFO names that destination as our source, and any interface.
    """
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return [(level, kind, data[:16] + bytes(4))]
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            return [(level, kind, bytes(4) + data[8:12] + bytes(4))]
    return []
