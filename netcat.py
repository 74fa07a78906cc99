"""The article's netcat demonstration, spoken by the client: ``--raw``.

The article shows hole punching by hand: ``nc -u -p 17000 PEER 17000`` at
both ends, each typed after the other's public address is known.
``p2pclient.py --raw --peer IP:PORT --port 17000`` speaks the same way,
with no rendezvous and no header, so it can talk to a real netcat.
"""

import selectors
import sys

import p2pcommon as wire
from console import LineReader


class RawChat:
    """Plain lines over UDP, one datagram each, to and from one peer."""

    def __init__(self, peer, port, out=sys.stdout):
        self.peer = peer
        self.out = out
        self.udp = wire.UDPSocket(port)
        self.udp.setblocking(False)

    def run(self, stdin_fd=0):
        """Send each line typed; print each datagram from the peer."""
        stdin = LineReader(stdin_fd)
        selector = selectors.DefaultSelector()
        try:
            selector.register(stdin_fd, selectors.EVENT_READ)
        except PermissionError:
            stdin.polled = True     # a file or /dev/null: always ready, as in Peer.run
        selector.register(self.udp, selectors.EVENT_READ)
        while True:
            ready = [key.fileobj for key, _ in selector.select(0 if stdin.polled else None)]
            if self.udp in ready:
                self.receive()
            if stdin.polled or stdin_fd in ready:
                lines, ended = stdin.read()
                for line in lines:
                    self.send(line + '\n')
                if ended:
                    return

    def send(self, line):
        """One line, one datagram."""
        try:
            self.udp.sendto(line.encode('utf-8'), self.peer)
        except OSError:
            pass    # like netcat: a lost datagram is not an error

    def receive(self):
        """Print what the peer sent; datagrams from anyone else are ignored."""
        try:
            data, source = self.udp.recvfrom(65536)
        except OSError:
            return
        if wire.same_endpoint(source, self.peer):
            for line in data.decode('utf-8', 'replace').splitlines():
                self.out.write(wire.safe(line) + '\n')
            self.out.flush()


def run_raw(args):
    """The --raw mode: exit 0 at end of input, 1 if the port is not free."""
    try:
        chat = RawChat(args.peer, args.port)
    except OSError as error:
        print(f'* cannot use UDP port {args.port}: {error.strerror}')
        return 1
    try:
        chat.run()
    except KeyboardInterrupt:
        pass
    return 0
