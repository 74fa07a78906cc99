"""Where the server listens: each address given, on a pair of ports.

Why this exists: hosts with several addresses, IPv6, and tests.  The
article's mediator has one address: a TCP port, and a UDP port with a
second one beside it for probes (points 2, 3, 6).  Ours listens on every
--bind address, each with its own three sockets, and on the wildcard
``::`` IPv6 and IPv4 alike (a reader asked the article about IPv6); port
0 picks any free pair, PORT and PORT + 1, so that tests and benchmarks
can run many servers at once.
"""

import errno
import socket

import p2pcommon as wire


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
