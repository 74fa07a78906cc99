"""The interactive peer-to-peer client (the article's Listing 3).

    python p2pclient.py alice --server rendezvous.example.org

It registers a name with the rendezvous server over a TCP control
connection (article point 2), learns its public UDP endpoint (point 3),
and then, in one loop over stdin, the control socket and the UDP socket:

* ``/connect bob`` asks the server to introduce us (point 4); the server
  asks bob, and bob's ``/connect alice`` is his consent;
* on INTRODUCE both peers punch (point 5) and lock onto the first endpoint
  that proves the peer, public or private (points 6 and 10);
* chat then goes straight to the peer (point 7), with keepalives that hold
  the hole open (point 9);
* if punching fails, chat goes through the server's relay (point 11).

``Peer`` is that design alone (``--article`` runs it).  Each addition
since (TCP, several servers, files...) is a mix-in in a module of its own
that overrides the methods marked "Hook" and calls ``super()``; ``Client``
composes them, as ``socketserver`` composes ThreadingMixIn and TCPServer.
"""

import selectors
import sys
import time

import cli
import identity
import interfaces
import narrate
import p2pcommon as wire
import punch
from allow import AllowMixIn
from birthday import BirthdayMixIn
from caps import CapsMixIn
from control import Fatal, ServerLink
from early import EarlyLinesMixIn
from console import Console, LineReader
from netcat import run_raw
from portmap import PortMapMixIn
from presence import PresenceMixIn
from repunch import RePunchMixIn
from roaming import RoamingMixIn
from script import ScriptMixIn
from servers import SeveralServersMixIn
from session import Session
from status import StatusMixIn
from tcppunch import TcpPunchMixIn
from transfer import FilesMixIn
from upgrade import UpgradeMixIn


class Peer(Console):
    """The article's peer: registration, the loop, and messages from server and peers.

    A server's message goes to ``control_<type>(link, message)``, a peer's
    to ``peer_<type>(session, message, now)``; the user's side is Console.
    """

    narrator = None             # with -v, a narrate.Narrator (control.py tells it too)

    def __init__(self, name, servers, udp_port=0, keepalive=punch.KEEPALIVE_INTERVAL,
                 punch_timeout=punch.PUNCH_TIMEOUT, out=sys.stdout, key=b''):
        self.name = name
        self.key = key              # our secret: REGISTER proves it (identity.py)
        self.links = [ServerLink(self, server) for server in servers]
        self.udp_port = udp_port
        self.keepalive_interval = keepalive
        self.punch_timeout = punch_timeout
        self.out = out
        self.sessions = {}          # session id -> Session
        self.chosen = None          # the peer name typed lines go to (/connect, /to)
        self.asked = {}             # peer name -> when we sent CONNECT
        self.asks = {}              # peer name -> (the link whose server says it asks us, when)
        self.udp = None
        self.mapping = None
        self.networks = []          # ours: where a peer's private address may be punched
        self.stdin = None
        self.selector = selectors.DefaultSelector()
        self.running = True

    # -- start-up: register (point 2), then learn the mapping (point 3) ------

    def start(self):
        """Register with the server, then learn our public endpoint from it."""
        try:
            self.udp = wire.UDPSocket(self.udp_port)    # for IPv6 and IPv4 alike
        except OSError as error:
            raise Fatal(f'cannot use UDP port {self.udp_port}: {error.strerror}') from None
        self.networks = interfaces.our_networks()
        reached = self.register()
        first = reached[0]
        try:
            self.mapping = punch.discover_mapping(self.udp, first.udp, first.probe, first.token)
        except TimeoutError as error:
            raise Fatal(f'{error}: UDP to the rendezvous server is blocked') from None
        now = time.monotonic()
        for link in reached:
            link.refresh_mapping(now)       # the other servers learn it too
            link.attach(self.selector)
            self.say(f'registered as {self.name} with {link}; public endpoint {self.our_public()}')
        self.udp.setblocking(False)

    def private_endpoints(self, link, route):
        """Hook: what REGISTER tells link's server: our addresses toward route, our UDP port."""
        return [(host, self.udp.port) for host in interfaces.private_addresses(route)]

    def register(self):
        """Hook: register with the server; return the links registered (one here)."""
        link = self.links[0]
        try:
            link.open()
        except OSError as error:
            raise Fatal(f'cannot reach the rendezvous server at {link}: '
                        f'{error.strerror or error}') from None
        link.wait_registered()
        return [link]

    # -- the loop: one select() over every socket ----------------------------

    def run(self, stdin_fd=0):
        """Serve stdin, the control sockets and the UDP socket until /quit.

        stdin may be a file of commands (or /dev/null), which epoll refuses
        (EPERM: a file is always ready to read); the loop then reads it
        itself, one chunk a turn, without waiting in select.
        """
        self.stdin = LineReader(stdin_fd)
        try:
            self.selector.register(stdin_fd, selectors.EVENT_READ, self.read_stdin)
        except PermissionError:
            self.stdin.polled = True
        self.selector.register(self.udp, selectors.EVENT_READ, self.read_udp)
        while self.running:
            timeout = 0 if self.stdin.polled else 0.01 if self.busy() else 0.2
            for key, mask in self.selector.select(timeout):
                # An earlier handler of this batch may have closed this one.
                if self.selector.get_map().get(key.fd) is key:
                    key.data(key.fileobj, mask)
            if self.stdin.polled and self.running:
                self.read_stdin(stdin_fd, selectors.EVENT_READ)
            self.check_timers(time.monotonic())

    def busy(self):
        """Hook: True while timers are due often (punching): the loop wakes every 10 ms."""
        return any(session.punching for session in self.sessions.values())

    def check_timers(self, now):
        """Hook: drive punches, retransmissions, keepalives and reconnects."""
        for session in list(self.sessions.values()):
            self.check_session(session, now)
        for link in self.links:
            link.tick(now)

    def check_session(self, session, now):
        """Hook: one session's timers: punch, relay fallback, resends, keepalive."""
        if session.punching:
            session.punch.tick(now)
            if session.punch.expired(now):
                self.punch_failed(session, now)
        for text in session.channel.retransmit(now):
            self.say(f'not delivered to {session.name}: {wire.safe(text)}')
        if session.endpoint is not None:
            self.keep_open(session, now)

    def keep_open(self, session, now):
        """Hook: keep the hole open, or punch again once it has died (point 9)."""
        session.keepalive.tick(now)
        if session.keepalive.dead(now) or session.channel.stalled:
            self.punch_again(session, now)

    def punch_failed(self, session, now):
        """Hook: no proof within the punch timeout: the relay carries the chat (point 11)."""
        session.punch_running = False
        if session.relayed:
            self.say(f'no direct path to {session.name}: chat stays on the relay')
        elif not session.direct:
            self.relay(session, now)

    def relay(self, session, now):
        """Hook: no direct path: chat goes through the server (point 11)."""
        session.relayed = True
        self.connected(session, now, 'relayed through the rendezvous server')

    def punch_again(self, session, now):
        """Hook: the direct path died: punch again (point 9)."""
        self.say(f'lost the direct path to {session.name}; punching again')
        session.started = now
        session.start_punch(now)
        session.keepalive.heard(now)

    # -- messages from the server (point 2) -----------------------------------

    def handle_control(self, link, message):
        """Act on one message from a server: control_<type>(link, message)."""
        action = getattr(self, 'control_' + message.name_of_type.lower(), None)
        if action is not None:
            action(link, message)

    def control_registered(self, link, message):
        """Registered again, after the server was lost."""
        link.registered(message.token, time.monotonic())

    def control_peers(self, link, message):
        """The answer to /list."""
        self.say(f'peers: {", ".join(message.names) or "nobody"}')

    def control_ask(self, link, message):
        """The reply flag (point 8) tells our request's answer from another peer's ask."""
        if message.flags & wire.FLAG_REPLY:
            self.say(f'asked {message.name}; waiting for their answer')
        else:
            self.asked_by(link, message.name)

    def asked_by(self, link, name):
        """Hook: the mediator asks us to send a request (point 4): our user decides.

        Nothing goes toward the asker until the user says yes: the server
        sends its addresses only when both have asked.
        """
        self.asks[name] = (link, time.monotonic())
        self.say(f'{name} asks to connect: /connect {name} to accept, /reject {name} to decline')

    def control_decline(self, link, message):
        """With the reply flag, the end of our own request: declined or unanswered."""
        if message.flags & wire.FLAG_REPLY:
            self.say(f'{message.name} declined' if message.why == wire.DECLINED
                     else f'{message.name} did not answer')
            self.request_ended(message.name)

    def control_error(self, link, message):
        """Hook: an ERROR: a refused registration, or a request of ours refused."""
        if link.token is None:
            self.say(f'{link} refused to register us: {wire.safe(message.text)}')
            link.lost('registration refused')
        else:
            self.say(f'error from the rendezvous server: {wire.safe(message.text)}')

    def request_ended(self, name):
        """Hook: our request to connect to name will bring no introduction."""
        self.asked.pop(name, None)

    def control_introduce(self, link, message):
        """A server introduced a peer: start punching toward it (points 4, 5)."""
        if not self.may_introduce(link, message):
            return
        now = time.monotonic()
        old = self.session_named(message.name)
        if old is not None:         # a new introduction replaces the old session
            self.replace_session(old)
        started = self.asked.pop(message.name, now)
        targets = punch.candidates(message, self.mapping.public if self.mapping else None,
                                   self.networks)
        session = self.make_session(link, message, targets, now, started)
        self.sessions[session.key.id] = session
        self.start_paths(session, link, message, now)
        self.session_started(session, now)

    def make_session(self, link, message, targets, now, started):
        """Hook: the Session for an introduced peer."""
        return Session(self, link, message.name, message.session, message.role, targets,
                       now, started)

    def may_introduce(self, link, message):
        """Hook: False (having said why) for an introduction we ignore; none here."""
        return True

    def replace_session(self, old):
        """Hook: a new introduction to the same peer ends the old session."""
        self.end_session(old, f'{old.name} was introduced again')

    def start_paths(self, session, link, message, now):
        """Hook: start punching toward every candidate endpoint (point 5)."""
        self.say(f'introduced to {message.name}; punching to '
                 f'{" ".join(map(wire.format_endpoint, session.targets))}')
        session.start_punch(now)

    def session_started(self, session, now):
        """Hook: a new session's paths are started; the core has nothing more to do."""

    def relay_lost(self, link):
        """Hook: a server went away, and the sessions it relayed with it.

        (A server forgets a session with either peer's control connection.)
        """
        for session in list(self.sessions.values()):
            if session.link is link and session.relayed:
                self.say(f'the relay to {session.name} went with the server; '
                         f'/connect {session.name} to reach them again')
                self.end_session(session, 'the relay went away')

    def control_relay(self, link, message):
        """Peer traffic that came through the server's relay (point 11)."""
        session = self.sessions.get(identity.session_id(message.session))
        if session is None:
            return
        try:
            inner = wire.decode(message.message)
        except wire.ProtocolError:
            return
        if inner.type not in wire.PEER_TYPES or not session.key.check(inner):
            return
        self.session_message(session, inner, source=None)

    # -- UDP: mapping refreshes and peer traffic ---------------------------------

    def send_udp(self, data, endpoint):
        """Hook: send one datagram; a failure here is a lost packet, nothing more."""
        try:
            self.udp.sendto(data, endpoint)
        except OSError:
            pass

    def read_udp(self, sock, mask):
        """Read every waiting datagram; ignore any that is not our protocol."""
        while True:
            try:
                data, source = sock.recvfrom(wire.MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue    # an ICMP error for something we sent earlier
            try:
                message = wire.decode(data)
            except wire.ProtocolError:
                continue    # not our protocol: garbage is dropped silently
            self.datagram(message, source)

    def datagram(self, message, source):
        """Hook: one datagram of our protocol: a MAPPING reply or a peer's message."""
        if message.type == wire.MAPPING:
            self.mapping_refreshed(message, source)
        elif message.type in wire.PEER_TYPES:
            self.peer_message(message, source)

    def mapping_refreshed(self, message, source):
        """A MAPPING reply to our refresh: note when our public endpoint moved."""
        for link in self.links:
            if message.token == link.token and wire.same_endpoint(source, link.udp):
                if not wire.same_endpoint(message.public, self.mapping.public):
                    self.mapping.public = message.public
                    self.say(f'our public endpoint is now '
                             f'{wire.format_endpoint(message.public)}')
                return

    def peer_message(self, message, source):
        """Hook: a datagram from a peer, taken only with the MAC of a session we hold.

        That MAC is how we validate the peer's identity (point 10): a
        stranger on the same private address cannot forge it.
        """
        session = self.sessions.get(message.session)
        if session is not None and session.key.check(message):
            self.session_message(session, message, source)

    def session_message(self, session, message, source):
        """Hook: a proven peer message; source is None when it came another way."""
        now = time.monotonic()
        session.keepalive.heard(now)
        if source is not None and message.type != wire.GOODBYE:
            self.punched(session, message, source, now)
        action = getattr(self, 'peer_' + message.name_of_type.lower(), None)
        if action is not None:
            action(session, message, now)

    def peer_data(self, session, message, now):
        """A chat line: acknowledge it, and show what is now in order."""
        ready, ack = session.channel.receive(message.seq, message.text, message.oldest)
        session.send(wire.ACK, seq=ack, sack=session.channel.selective())
        for text in ready:
            self.show_chat(session.name, text)

    def peer_ack(self, session, message, now):
        """The peer has our chat lines up to seq, and those in sack."""
        session.channel.acknowledge(message.seq, now, message.sack)

    def peer_goodbye(self, session, message, now):
        """The peer quit."""
        self.say(f'{session.name} left')
        self.end_session(session, f'{session.name} left')

    def end_session(self, session, why):
        """Hook: forget a session; each line it had not delivered is reported."""
        for text in session.channel.take_unacknowledged():
            self.say(f'not delivered to {session.name}: {wire.safe(text)}')
        del self.sessions[session.key.id]

    def punched(self, session, message, source, now):
        """Hook: a datagram of this session straight from the peer: proof of a path.

        The punch bounces a PUNCH and locks onto the first proof (points 5,
        8); a proof that comes after we gave up and relayed opens the
        direct path all the same.
        """
        was_locked = session.endpoint is not None
        session.punch.receive(message, source)
        if was_locked:
            return
        session.relayed = False
        elapsed = (now - session.started) * 1000
        self.connected(session, now, f'direct, {elapsed:.0f} ms',
                       f' at {wire.format_endpoint(session.endpoint)}')

    def connected(self, session, now, how, where=''):
        """Say how we reach the peer (each time the path moves), and where typed lines go."""
        self.say(f'connected to {session.name}{where} ({how})')
        if self.chosen is None:
            self.chosen = session.name      # the first peer: nobody else was chosen
        if self.chosen != session.name and not session.announced:
            self.say(f'what you type still goes to {self.chosen}; /to {session.name} to change')
        session.announced = True
        session.channel.hurry(now)


class Client(StatusMixIn, ScriptMixIn, FilesMixIn, TcpPunchMixIn, UpgradeMixIn, SeveralServersMixIn,
             EarlyLinesMixIn, RoamingMixIn, RePunchMixIn, PresenceMixIn, AllowMixIn, CapsMixIn,
             PortMapMixIn, narrate.NarrateMixIn, BirthdayMixIn, Peer):
    """The peer with every addition: what ``p2pclient.py NAME`` runs."""


def main(argv=None):
    """Run the client; exit 0 on /quit or end of input, 1 on a fatal error."""
    args = cli.client_arguments(argv)
    if args.raw:
        return run_raw(args)
    common = dict(udp_port=args.port, keepalive=args.keepalive,
                  punch_timeout=args.punch_timeout, key=args.key)
    if args.article:
        client = Peer(args.name, args.server, **common)
    else:
        client = Client(args.name, args.server, downloads=args.downloads,
                        transport=args.transport, allow=args.allow, birthday=args.birthday,
                        portmap=args.portmap, **common)
        client.narrator = narrate.Narrator(args.name, sys.stderr) if args.verbose else None
    try:
        client.start()
        if args.connect:
            client.do_connect(args.connect)
        client.run()
    except Fatal as error:
        client.say(str(error))
        return 1
    except KeyboardInterrupt:
        client.do_quit('')
    return 0


if __name__ == '__main__':
    sys.exit(main())
