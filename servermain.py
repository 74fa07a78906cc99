"""The rendezvous server as a program: its command line, its log, start and stop.

Why this exists: the listing reads better without its plumbing.  The
article's server takes a port; ours takes the addresses to listen on, the
port (PORT + 1 is the probe port, point 6), how much to log, whether to
run the article's design alone (--article), and every limit of limits.py,
each an option with its default in --help.  rendezvous.main() picks the
server to run; ``run`` runs it.
"""

import argparse
import logging
import signal
import socket
import sys

import cli
import p2pcommon as wire
from limits import Limits

log = logging.getLogger('rendezvous')


def run(kind, args):
    """Serve with a server of kind (a Rendezvous) until interrupted; the exit status.

    1, with one line that says why, when the server cannot listen.
    """
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    logging.basicConfig(level=level, format='%(asctime)s %(message)s', stream=sys.stderr)
    try:
        server = kind(args.bind, args.port, Limits.from_args(args))
    except (OSError, ValueError) as error:
        ports = f'port {args.port} (tcp, udp) and {args.port + 1} (udp)' if args.port \
            else 'port 0 (any free pair)'
        log.error('cannot listen on %s %s: %s', ' '.join(args.bind), ports,
                  getattr(error, 'strerror', None) or error)
        return 1
    log.info('rendezvous listening on %s (tcp, udp) and udp port %d for probes%s',
             ' '.join(wire.format_endpoint((bind, server.port)) for bind in args.bind),
             server.port + 1, ", the article's design only" if args.article else '')
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info('stopped')
    return 0


def stop(signum, frame):
    """SIGTERM stops the server as Ctrl-C does, with the last report."""
    raise KeyboardInterrupt


def parse_args(argv, max_request):
    """The command line; every limit is an option, its default in --help."""
    parser = argparse.ArgumentParser(
        description='Rendezvous server for UDP hole punching: introduces peers, '
                    'tells them their public endpoints, relays when punching fails.',
        epilog=f'Control messages over {max_request} bytes, or a stream that is not '
               f'this protocol, close the connection.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # SUPPRESS: the help says the default in its own words, and the
    # formatter would add a second one, '(default: None)', for None.
    parser.add_argument('--bind', action='append', metavar='ADDRESS', default=argparse.SUPPRESS,
                        help=f'address to listen on, may be given several times (default: '
                             f'{default_bind()}, which is IPv6 and IPv4 alike, on every address; '
                             f'each UDP answer leaves from the address its request came to)')
    parser.add_argument('--port', type=server_port, default=wire.DEFAULT_PORT,
                        help='TCP and UDP port; PORT+1 is the UDP probe port (0: any free)')
    parser.add_argument('--article', action='store_true',
                        help="run only the article's design: no additions (no limits but the "
                             "message size, names compared as spelled, asks that wait for ever)")
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='log every message in and out, one line each')
    parser.add_argument('-q', '--quiet', action='store_true', help='log errors only')
    parser.add_argument('--version', action='version', version=f'p2pnat {wire.__version__}')
    Limits.add_options(parser)
    args = parser.parse_args(argv)
    args.bind = getattr(args, 'bind', None) or [default_bind()]
    return args


def server_port(text):
    """An argparse type: a port for TCP and UDP that leaves room for the probe port, PORT+1."""
    port = cli.whole_number(text)
    if not 0 <= port <= 65534:
        raise argparse.ArgumentTypeError(f'{port} is not a port for the server: give 0-65534 '
                                         f'(65535 would leave no room for the probe port, PORT+1)')
    return port


def default_bind():
    """'::' (IPv6 and IPv4 on one socket) where the system has IPv6, else 0.0.0.0."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return '0.0.0.0'
    return '::'
