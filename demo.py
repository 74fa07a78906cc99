"""make demo: a rendezvous server and two scripted peers on this machine.

Starts ``rendezvous.py`` on a free port, then ``p2pclient.py alice`` and
``p2pclient.py bob``; alice asks to connect to bob by name, bob says yes,
they exchange a few lines and leave.  Everything each program prints is
shown as it happens, so the transcript reads like the protocol: register,
mapping, connect, ask, consent, introduce, punch, chat, bye.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests'))
from procs import command, start, start_server  # noqa: E402  (the tests' driver)


def show(proc, pattern):
    """Wait for a line from proc and print it, labelled."""
    line = proc.expect(pattern).string
    print(f'{proc.label:>5} | {line}')


def type_line(proc, line):
    """Type a line into proc, and show it."""
    print(f'{proc.label:>5} > {line}')
    proc.send(line)


def main():
    """Run the scripted conversation; exit 1 if any step does not happen."""
    server, port = start_server('-v')
    peers = []
    try:
        print(f'rendezvous server on 127.0.0.1:{port} (udp probe port {port + 1})\n')
        for name in ('alice', 'bob'):
            # UDP hole punching, the article's subject; without --udp-only
            # the client tries TCP hole punching first.
            peer = start(command('p2pclient.py', name, '--server', f'127.0.0.1:{port}',
                                 '--udp-only'), name)
            peers.append(peer)
            show(peer, r'^\* registered')
        alice, bob = peers
        type_line(alice, '/list')
        show(alice, r'^\* peers')
        type_line(alice, '/connect bob')
        show(alice, r'^\* asking')
        show(alice, r'^\* asked bob')
        show(bob, r'^\* alice asks to connect')
        type_line(bob, '/connect alice')        # bob says yes: both have asked
        show(bob, r'^\* saying yes')
        show(alice, r'^\* introduced')
        show(bob, r'^\* introduced')
        show(alice, r'^\* connected')
        show(bob, r'^\* connected')
        type_line(alice, 'hello bob, this came straight through the hole')
        show(bob, r'^<alice>')
        type_line(bob, 'hi alice! no server in between')
        show(alice, r'^<bob>')
        type_line(bob, '/quit')
        show(alice, r'^\* bob left')
        type_line(alice, '/quit')
        print('\nwhat the rendezvous server saw (-v):')
        for peer in peers:
            peer.wait()
        server.stop()
        for line in server.err.lines:
            print(f'  server | {line}')
    except AssertionError as error:
        print(f'demo failed: {error}', file=sys.stderr)
        return 1
    finally:
        for proc in [server, *peers]:
            proc.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
