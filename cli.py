"""The client's command line, and argument types both programs share.

argparse turns a bad value into one line and exit status 2, never a
traceback, when its ``type`` raises ArgumentTypeError with the reason.
"""

import argparse
import math

import birthday
import identity
import p2pcommon as wire
import portmap
import punch
from limits import non_negative


def whole_number(text):
    """The integer an argument spells, or argparse's one-line error."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None


def port(text):
    """An argparse type: a port, 0 (any free one) to 65535."""
    number = whole_number(text)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f'{number} is not a port: give 0-65535')
    return number


def seconds(text):
    """An argparse type: a time in seconds, 0 or more (a negative interval means nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f'{text} is not allowed: give 0 or more seconds')
    return value


def client_arguments(argv):
    """p2pclient.py's command line."""
    parser = argparse.ArgumentParser(
        description='Chat peer to peer through NATs: a rendezvous server introduces '
                    'the peers, UDP hole punching connects them directly.')
    parser.add_argument('name', nargs='?',
                        help='your name: 1-32 bytes, printable, no spaces')
    parser.add_argument('--server', action='append', metavar='HOST[:PORT]',
                        help=f'a rendezvous server; give several to register with all '
                             f'(default: 127.0.0.1:{wire.DEFAULT_PORT})')
    parser.add_argument('--port', type=port, default=0, metavar='UDP_PORT',
                        help='local UDP port to punch from (default: any free port)')
    parser.add_argument('--connect', metavar='PEER', help='connect to PEER at once')
    parser.add_argument('--keepalive', type=seconds, default=punch.KEEPALIVE_INTERVAL,
                        metavar='SECONDS',
                        help=f'keepalive interval; 0 turns keepalives off '
                             f'(default: {punch.KEEPALIVE_INTERVAL:.0f})')
    only = parser.add_mutually_exclusive_group()
    only.add_argument('--udp-only', dest='transport', action='store_const', const='udp',
                      default='both', help='punch UDP only (default: TCP first, then UDP)')
    only.add_argument('--tcp-only', dest='transport', action='store_const', const='tcp',
                      help='punch TCP only; relay if that fails')
    only.add_argument('--article', action='store_true',
                      help="run only the article's design: UDP, one server, chat; "
                           "no additions")
    parser.add_argument('--downloads', default='.', metavar='DIR',
                        help='where files that peers send are saved (default: here)')
    parser.add_argument('--punch-timeout', type=seconds, default=punch.PUNCH_TIMEOUT,
                        metavar='SECONDS',
                        help=f'give up punching and relay after this long '
                             f'(default: {punch.PUNCH_TIMEOUT:.0f})')
    parser.add_argument('--birthday-sockets', type=non_negative(int), default=birthday.SOCKETS,
                        metavar='N',
                        help=f'against a cone NAT from behind a symmetric one: open at most N '
                             f'sockets toward the peer; 0 turns the search off '
                             f'(default: {birthday.SOCKETS})')
    parser.add_argument('--birthday-rate', type=non_negative(float), default=birthday.RATE,
                        metavar='PER_SECOND',
                        help=f'sockets opened, or ports of a symmetric NAT probed, per second '
                             f'(default: {birthday.RATE:.0f})')
    parser.add_argument('--birthday-time', type=seconds, default=birthday.GIVE_UP,
                        metavar='SECONDS',
                        help=f'give that search up after this long; the relay carries the chat '
                             f'meanwhile (default: {birthday.GIVE_UP:.0f})')
    parser.add_argument('--allow', action='append', default=[], metavar='PEER',
                        help="accept PEER's requests to connect without asking; may be "
                             "given several times; '*' accepts anyone (for scripts and demos)")
    parser.add_argument('--no-portmap', dest='portmap', action='store_false',
                        help=f'do not ask the router (NAT-PMP, PCP) to forward a port to us '
                             f'(asking costs at most {portmap.START_TIMEOUT:.0f} s at start-up '
                             f'where no router answers)')
    parser.add_argument('--key', metavar='FILE',
                        help=f'the secret that keeps your name yours, created on first use '
                             f'(default: {identity.default_key_path()})')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='narrate every packet in and out, with the article point it '
                             'shows, on standard error')
    parser.add_argument('--raw', action='store_true',
                        help='plain-text UDP with --peer, as netcat does: no rendezvous, '
                             'no header, one datagram per line')
    parser.add_argument('--peer', metavar='IP:PORT', help='with --raw: the peer to talk to')
    parser.add_argument('--version', action='version', version=f'p2pnat {wire.__version__}')
    args = parser.parse_args(argv)
    try:
        if args.raw:
            if not args.peer:
                parser.error('--raw needs --peer IP:PORT')
            args.peer = wire.parse_endpoint(args.peer)
            wire.family_of(args.peer[0])
        elif args.name is None:
            parser.error('a name is needed (or --raw --peer IP:PORT)')
        else:
            wire.check_name(args.name)
        args.server = [wire.parse_endpoint(server)
                       for server in args.server or [f'127.0.0.1:{wire.DEFAULT_PORT}']]
    except (wire.ProtocolError, ValueError) as error:
        parser.error(str(error))
    args.birthday = (args.birthday_sockets, args.birthday_rate, args.birthday_time)
    if args.article and (len(args.server) > 1 or args.allow or args.verbose):
        parser.error('--article runs one server, without --allow or -v')
    if not args.raw:
        try:
            args.key = identity.load_key(args.key or identity.default_key_path())
        except (OSError, ValueError) as error:
            parser.exit(1, f'* cannot use the key file: {error}\n')
    return args
