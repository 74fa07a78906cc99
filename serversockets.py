"""The server's sockets: where it listens, and the bytes of a control connection.

Why this exists: the listing (rendezvous.py) reads as the article's
protocol, in whole messages; this is the plumbing beneath it.

Where it listens (``open_all``): the article's mediator has one address,
a TCP port, and a UDP port with a second one beside it for probes (points
2, 3, 6).  Ours listens on every --bind address, each with its own three
sockets, and on the wildcard ``::`` IPv6 and IPv4 alike (a reader asked
the article about IPv6); port 0 picks any free pair, PORT and PORT + 1,
so that tests and benchmarks can run many servers at once.

The bytes of a control connection (``ControlIO``, a base of Rendezvous):
the loop says a socket may be read or written; what is read is cut into
frames by the header's length (p2pcommon.FrameReader) and decoded, and
each message goes to the server's ``handle``; what the server queued in
``peer.output`` is written as the socket takes it.
"""

import errno
import logging
import selectors
import socket

import p2pcommon as wire

log = logging.getLogger('rendezvous')


def open_all(binds, port):
    """On each address, TCP and UDP on port and UDP on port + 1 for probes (point 6).

    Returns the port and, per address, (listener, udp, probe).  Port 0
    means any free pair: the kernel picks the TCP port, and if port + 1 is
    taken we try another, 20 times at most.
    """
    for _ in range(20 if port == 0 else 1):
        opened = []
        try:
            chosen = port
            for bind in binds:
                family = wire.family_of(bind)
                opened.append(open_socket(family, socket.SOCK_STREAM, bind, chosen))
                chosen = opened[-1].getsockname()[1]
                opened.append(open_socket(family, socket.SOCK_DGRAM, bind, chosen))
                opened.append(open_socket(family, socket.SOCK_DGRAM, bind, chosen + 1))
        except OSError as error:
            for sock in opened:
                sock.close()
            if port or error.errno != errno.EADDRINUSE:
                raise
            continue        # port + 1 was taken: try another pair
        for listener in opened[::3]:
            listener.listen(128)
        return chosen, list(zip(*[iter(opened)] * 3))
    raise OSError(errno.EADDRINUSE, 'no free pair of ports')


def open_socket(family, kind, bind, port):
    """One non-blocking socket of kind bound to (bind, port).

    SO_REUSEADDR on the TCP listener only: a restarted server may then
    listen again while its old connections are in TIME_WAIT.  On UDP
    it lets a second socket share the port: a server started later on
    PORT - 1, whose probe port is our PORT, would get our MAPPINGs.
    """
    sock = socket.socket(family, kind)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if bind == '::':
        # One socket for both: IPv4 peers appear as ::ffff:a.b.c.d.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((bind, port))
    sock.setblocking(False)
    return sock


class ControlIO:
    """Reads and writes the control connections for Rendezvous (point 2).

    Calls the server's handle, send_error and close; a message is never
    cut: the stream is framed by each header's length.
    """

    def ready(self, peer, sock, mask):
        """The loop's handler of a control connection: write what waits, read what came."""
        if mask & selectors.EVENT_WRITE:
            self.write(peer)
        if mask & selectors.EVENT_READ:
            self.read(peer)

    def read(self, peer):
        """Read what is there, and handle every whole message in it.

        A message that does not decode gets an ERROR, and the stream goes
        on; a stream that is not framed as ours is closed, with a reason.
        """
        try:
            data = peer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if not data:
            self.close(peer)
            return
        peer.reader.feed(data)
        try:
            for frame in peer.reader.frames():      # FramingError: not our stream
                try:
                    message = wire.decode(frame)
                except wire.ProtocolError as error:
                    self.send_error(peer, wire.E_BAD_MESSAGE, str(error), 'bad message')
                    continue
                self.handle(peer, message)
                if peer.sock.fileno() < 0:
                    return      # the message closed the connection
        except wire.FramingError as error:
            log.debug('closing %s: %s', peer, error)
            self.send_error(peer, wire.E_BAD_MESSAGE, str(error), 'broken stream')
            self.write(peer)
            self.close(peer)

    def write(self, peer):
        """Send what is queued; stop asking for EVENT_WRITE when done."""
        try:
            del peer.output[:peer.sock.send(peer.output)]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(peer)
            return
        if not peer.output and peer.sock.fileno() >= 0:
            self.selector.modify(peer.sock, selectors.EVENT_READ,
                                 self.selector.get_key(peer.sock).data)
