"""The interactive peer-to-peer client (the article's Listing 3).

    python p2pclient.py alice --server rendezvous.example.org

It registers a name with the rendezvous server over a TCP control
connection (article point 2), learns its public UDP endpoint (point 3),
and then, in one loop over stdin, the control socket and the UDP socket:

* ``/connect bob`` asks the server to introduce us (point 4); the server
  asks bob, and bob's ``/connect alice`` is his consent;
* on INTRODUCE both peers punch (point 5) and lock onto the first endpoint
  that proves the peer, public or private (points 6 and 10);
* chat then goes straight to the peer (point 7), over a small reliable
  layer, with keepalives that hold the hole open (point 9);
* if punching fails, chat goes through the server's relay (point 11).
"""

import argparse
import math
import os
import selectors
import sys
import time

import identity
import interfaces
import narrate
import p2pcommon as wire
import punch
import tcppunch
import transfer
from control import Fatal, ServerLink
from session import Session

MAX_LINE = 64 * 1024        # an endless stdin line is cut here
# A terminal in its usual (canonical) mode hands us at most 4,095 bytes of
# one line (Linux's N_TTY_BUF_SIZE less the newline) and drops the rest of
# it, before we see any of it: all we can do is say so.
TERMINAL_LINE = 4095
# The ERRORs that answer a CONNECT instead of an INTRODUCE or an ASK.
CONNECT_REFUSALS = frozenset({wire.E_UNKNOWN_PEER, wire.E_NOT_REGISTERED, wire.E_RATE_LIMITED,
                              wire.E_TOO_MANY})
MAX_SESSIONS = 32           # peers at once: each costs sockets, and a server could flood us
MAX_TCP_PUNCHES = 4         # TCP punches at once (a listener and a socket per target each)
MAX_ASKS = 16               # requests to connect shown and waiting for an answer
ASKS_KEPT = 60.0            # seconds we keep one (the server's default --ask-timeout)
REPUNCH_EVERY = 5.0         # seconds between punch rounds a peer may ask of us over the relay
# When the server says a peer's control connection closed, the peer may be
# gone (killed, off the network) or only its TCP mapping: a KEEPALIVE a
# second, each bounced by a live peer, tells which within DOUBT_WAIT.
DOUBT_WAIT = 3.0
# After the end of input the client quits once what the input asked for is
# done (Client.finished), or after this long: an unanswered request to
# connect takes the server's --ask-timeout (60 s), then punching (3 s TCP,
# 5 s UDP) and the chat's resends (30 s) may follow.
END_WAIT = 120.0
# Commands that need an argument, and how to give it.
USAGE = {'/connect': '/connect PEER', '/to': '/to PEER', '/send': '/send PATH'}
HELP = """commands:
  /connect PEER   ask PEER to connect (or say yes to PEER's request), then punch
  /reject PEER    say no to PEER's request to connect
  /to PEER        send what you type to PEER, one of the peers you are connected to
  /list           the names registered with the server
  /status         where you stand: servers, peers, paths, who you type to
  /send PATH      offer a file to the peer you type to
  /accept [N]     accept a file on offer: the oldest, or number N, or by its file name
  /reject [N]     refuse a file on offer the same way; a file on offer called NAME
                  comes before a request to connect from a peer NAME
  /cancel [N]     stop sending a file: the newest, or number N, or by its file name
  /quit           say goodbye and exit (so does end of input)
  /help           this text
anything else is a chat message to the peer you chose last with /connect or /to
(until it is connected it waits, and then goes with the punches); //text says /text"""


class Client:
    """The peer: registration, the event loop and the user's commands."""

    def __init__(self, name, servers, udp_port=0, keepalive=punch.KEEPALIVE_INTERVAL,
                 punch_timeout=punch.PUNCH_TIMEOUT, downloads='.', transport='both',
                 out=sys.stdout, key=b'', allow=()):
        self.name = name
        self.key = key              # our secret: REGISTER proves it (identity.py)
        self.allow = set(allow)     # peers whose requests we accept unasked; '*': anyone
        self.downloads = downloads
        self.transport = transport  # 'both' (TCP first, then UDP), 'tcp' or 'udp'
        self.links = [ServerLink(self, server) for server in servers]
        self.udp_port = udp_port
        self.keepalive_interval = keepalive
        self.punch_timeout = punch_timeout
        self.out = out
        self.sessions = {}          # session id -> Session
        self.chosen = None          # the peer name typed lines go to (/connect, /to)
        self.asked = {}             # peer name -> when we sent CONNECT
        self.held = []              # lines typed for the chosen peer before its session
        self.asks = {}              # peer name -> (the link whose server says it asks us, when)
        self.early_punches = []     # (message, source) before their INTRODUCE
        self.udp = None
        self.mapping = None
        self.networks = []          # ours: where a peer's private address may be punched
        self.narrator = None        # with -v: a narrate.Narrator, one line per packet
        self.stdin = None
        self.ending = None          # when the input ended: quit once what it asked is done
        self.listing = 0            # /list requests the server has not answered yet
        self.selector = selectors.DefaultSelector()
        self.running = True

    # -- output -------------------------------------------------------------

    def say(self, text):
        """Print a status line; they all start with '* '."""
        self.out.write(f'* {text}\n')
        self.out.flush()

    def show_chat(self, name, text):
        """Print a peer's chat line, made safe for the terminal."""
        self.out.write(f'<{name}> {wire.safe(text)}\n')
        self.out.flush()

    # -- start-up: register, then learn the mapping -------------------------

    def start(self):
        """Register with every server we can reach, then learn our mapping."""
        self.open_udp()
        self.networks = interfaces.our_networks()
        reached = []
        for link in self.links:
            try:
                link.open()
            except OSError as error:
                why = f'cannot reach the rendezvous server at {link}: {error.strerror or error}'
                if len(self.links) == 1:
                    raise Fatal(why) from None
                self.say(f'{why}; will keep trying')
                link.retry_at = time.monotonic() + link.backoff
                continue
            link.wait_registered()
            reached.append(link)
        if not reached:
            raise Fatal('no rendezvous server reached')
        first = reached[0]
        try:
            self.mapping = punch.discover_mapping(self.udp, first.udp, first.probe, first.token)
        except TimeoutError as error:
            raise Fatal(f'{error}: UDP to the rendezvous server is blocked') from None
        now = time.monotonic()
        for link in reached:
            link.refresh_mapping(now)       # the other servers learn it too
            link.attach(self.selector)
            self.say(f'registered as {self.name} with {link}; '
                     f'public endpoint {wire.format_endpoint(self.mapping.public)} '
                     f'({self.mapping.describe()})')
        self.udp.setblocking(False)

    def open_udp(self):
        """The one UDP socket we punch from, for IPv6 and IPv4 alike."""
        try:
            self.udp = wire.UDPSocket(self.udp_port)
        except OSError as error:
            raise Fatal(f'cannot use UDP port {self.udp_port}: {error.strerror}') from None

    # -- the loop -----------------------------------------------------------

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
            busy = any(s.punching or s.trying_tcp or s.transfers.busy
                       for s in self.sessions.values())
            timeout = 0 if self.stdin.polled else 0.01 if busy else 0.2
            for key, mask in self.selector.select(timeout):
                # An earlier handler of this batch may have closed this one.
                if self.selector.get_map().get(key.fd) is key:
                    key.data(key.fileobj, mask)
            if self.stdin.polled and self.running:
                self.read_stdin(stdin_fd, selectors.EVENT_READ)
            now = time.monotonic()
            self.check_timers(now)
            if self.ending is not None and self.running and self.finished(now):
                self.quit()

    def check_timers(self, now):
        """Drive punches, retransmissions, keepalives and reconnects."""
        for session in list(self.sessions.values()):
            self.check_session(session, now)
        for link in self.links:
            link.tick(now)

    def check_session(self, session, now):
        """One session's timers: punch, relay fallback, keepalive, loss."""
        if session.tcp is not None:
            self.check_tcp(session, now)
        elif session.punching:
            session.punch.tick(now)
            if session.punch.expired(now):
                self.relay(session, now)
        for text in session.channel.retransmit(now):
            self.say(f'not delivered to {session.name}: {wire.safe(text)}')
        if session.channel.exhausted:
            self.say(f'the session with {session.name} used up its 4 billion message numbers; '
                     f'/connect {session.name} for a new one')
            self.end_session(session, 'the session ended')
            return
        session.transfers.tick(now)
        if session.endpoint is None:
            return
        if session.doubted is not None:
            self.check_doubt(session, now)
        else:
            session.keepalive.tick(now)
        if session.keepalive.dead(now) or session.channel.stalled:
            self.punch_again(session, now)

    def check_doubt(self, session, now):
        """Is the peer whose control connection closed still there?  Ask it, once a second."""
        if session.keepalive.last_heard > session.doubted:
            session.doubted = None              # it answered: only its server link died
        elif now - session.doubted > DOUBT_WAIT:
            self.say(f'lost {session.name}: it left the server and stopped answering')
            self.end_session(session, f'{session.name} is gone')
        elif now - session.keepalive.last_sent >= 1.0:
            session.send(wire.KEEPALIVE)

    def check_tcp(self, session, now):
        """TCP first: on a timeout, or when its connection dies, go on with UDP."""
        if session.trying_tcp:
            session.tcp.tick(now)
            if not session.tcp.expired(now):
                return
            why = f'no TCP path to {session.name}'
        elif session.on_tcp:
            return
        else:
            why = f'lost the TCP connection to {session.name}'
        session.stop_tcp()
        self.after_tcp(session, why, now)

    def after_tcp(self, session, why, now):
        """TCP gave up: punch UDP next or, with --tcp-only, relay."""
        if self.transport == 'tcp':
            self.say(why)
            self.relay(session, now)
        else:
            self.say(f'{why}; punching UDP')
            session.start_punch(now)

    def relay(self, session, now):
        """No direct path: chat goes through the server (point 11), if it still relays.

        It does not once the peer's control connection has closed (the
        server said so): a peer we can neither punch nor relay to is gone.
        """
        if session.relay_gone:
            self.say(f'lost {session.name}: no direct path, and the server no longer '
                     f'relays to them')
            self.end_session(session, f'{session.name} is gone')
            return
        session.relayed = True
        self.connected(session, now, 'relayed through the rendezvous server')

    def punch_again(self, session, now):
        """The direct path died: punch again, and ask the peer to, via the relay."""
        self.say(f'lost the direct path to {session.name}; punching again')
        session.started = now
        session.start_punch(now)
        session.keepalive.heard(now)
        session.link.send(wire.RELAY, session=session.token,
                          message=session.key.seal(wire.PUNCH, nonce=punch.NO_NONCE))

    # -- stdin: commands and chat -------------------------------------------

    def read_stdin(self, fd, mask):
        """Act on each complete line the user typed, in order; note the end of input."""
        lines, ended = self.stdin.read()
        for line in lines:
            if self.stdin.terminal and len(line.encode('utf-8')) >= TERMINAL_LINE:
                self.say(f'your terminal cut that line at {TERMINAL_LINE:,} bytes, its limit; '
                         f'the rest was not sent (send long text in pieces, or as a file)')
            if self.running:
                self.command(line)
        if ended and self.running:
            self.input_ended()

    def input_ended(self):
        """End of input (Ctrl-D, the end of a file or pipe) is /quit, once the input is done.

        A script's last lines are often '/connect bob' and a line for bob,
        or '/list': quitting at once would send the line to nobody, or
        leave before the answer.  So the loop quits when finished() says
        that nothing the input asked for is still under way.
        """
        if self.stdin.fd in self.selector.get_map():
            self.selector.unregister(self.stdin.fd)     # at its end a pipe is always readable
        self.stdin.polled = False
        self.ending = time.monotonic()
        if not self.finished(self.ending):
            self.say('end of input: quitting once what it asked for is done (Ctrl-C: now)')

    def finished(self, now):
        """True when what the input asked for is done, or END_WAIT has passed.

        Done: every /list answered, every /connect introduced or refused,
        no line held for a peer, no session still punching, every chat
        line acknowledged (or given up) and every file we send ended.
        """
        if now - self.ending > END_WAIT:
            self.say(f'end of input {END_WAIT:.0f} s ago, and still not done: quitting')
            return True
        if self.listing or self.asked or self.held:
            return False
        return not any(s.punching or s.trying_tcp or s.transfers.busy or not s.channel.idle
                       for s in self.sessions.values())

    def command(self, line):
        """Act on one line: a /command, or chat to the chosen peer."""
        words = line.split()
        if not line.startswith('/'):
            self.chat(line)
        elif line.startswith('//'):
            self.chat(line[1:])         # '//etc' says '/etc'
        elif words[0] in ('/status', '/peers') and len(words) == 1:
            self.status()
        elif words[0] == '/connect' and len(words) == 2:
            self.connect(words[1])
        elif words[0] == '/to' and len(words) == 2:
            self.choose(words[1])
        elif words[0] == '/list' and len(words) == 1:
            if self.ask_server(wire.LIST):
                self.listing += 1
        elif words[0] == '/send' and len(words) > 1:
            self.send_file(line[len('/send'):].strip())
        elif words[0] in ('/accept', '/reject'):
            self.answer_offer(words[0] == '/accept', line[len(words[0]):].strip())
        elif words[0] == '/cancel':
            self.cancel_file(line[len('/cancel'):].strip())
        elif words[0] == '/quit':
            self.quit()
        elif words[0] == '/help':
            self.out.write(HELP + '\n')
            self.out.flush()
        elif words[0] in USAGE:
            self.say(f'usage: {USAGE[words[0]]}')
        else:
            self.say(f'unknown command {wire.safe(line)!r}; /help lists the commands')

    def status(self):
        """/status: our endpoint, each server, each session and its path, who we type to."""
        if self.mapping is not None:
            self.say(f'you are {self.name}, public endpoint '
                     f'{wire.format_endpoint(self.mapping.public)} ({self.mapping.describe()})')
        for link in self.links:
            self.say(f'server {link}: {link.state(time.monotonic())}')
        for session in self.sessions.values():
            rtt = session.channel.srtt
            rtt = f', round trip {rtt * 1000:.0f} ms' if rtt is not None else ''
            typing = ' <- what you type goes here' if session.name == self.chosen else ''
            self.say(f'{session.name}: {session.path}{rtt}{typing}')
        if self.chosen is not None and self.session_named(self.chosen) is None:
            self.say(f'what you type goes to {self.chosen}, not connected yet')
        for name in self.asks:
            self.say(f'{name} asks to connect: /connect {name} or /reject {name}')
        if not self.sessions and not self.asks:
            self.say('no peers yet: /connect PEER')

    def ask_server(self, type, **fields):
        """Send a request to the first server we are registered with."""
        for link in self.links:
            if link.token is not None:
                link.send(type, **fields)
                return link
        self.say('not registered with any rendezvous server yet; still trying')
        return None

    def connect(self, name):
        """Ask a server to introduce us to name (point 4); typed lines go to it now.

        To the server this is a request to name, or, when name asked us
        first, our consent: both having asked, it introduces us.
        """
        try:
            wire.check_name(name)
        except wire.ProtocolError as error:
            self.say(f'bad peer name: {error}')
            return
        if name == self.name:
            self.say('that is you: /connect another peer')
            return
        asker, _ = self.asks.pop(name, (None, None))
        link = asker or self.registered_link()
        if link is None:
            self.say('not registered with any rendezvous server yet; still trying')
            return
        self.choose(name, quiet=True)
        link.send(wire.CONNECT, target=name)
        link.connects.append(name)
        self.asked[name] = time.monotonic()
        doing = f'saying yes to {name}' if asker else \
            f'asking the rendezvous server to introduce {name}'
        self.say(f'{doing}; what you type goes to {name}')

    def choose(self, name, quiet=False):
        """/to NAME: typed lines go to name from now on, and nowhere else."""
        if name != self.chosen:
            self.drop_held()
        if not quiet and self.session_named(name) is None:
            self.say(f'not connected to {wire.safe(name)}: /connect {wire.safe(name)} first')
            return
        self.chosen = name
        if not quiet:
            self.say(f'what you type goes to {name}')

    def decline(self, name):
        """/reject NAME: no to name's request to connect."""
        link, _ = self.asks.pop(name, (None, None))
        if link is None:
            self.say(f'{wire.safe(name)} has not asked to connect')
            return
        link.send(wire.DECLINE, name=name, why=wire.DECLINED)
        self.say(f'declined {name}')

    def registered_link(self):
        """The first server we are registered with, or None."""
        return next((link for link in self.links if link.token is not None), None)

    def chat(self, line):
        """Send a chat line to the chosen peer, in pieces that fit a datagram.

        Lines go only to the peer the user chose (with /connect or /to),
        never to whoever connected last.  Until that peer's session exists
        they are held; once the server has introduced it they go along
        with the punches (early data, see Session.send), so the first line
        needs no round trip of its own.
        """
        if not line:
            return
        if self.chosen is None:
            self.say('not connected: /connect PEER first')
            return
        pieces = split_utf8(line, wire.MAX_TEXT)
        session = self.session_named(self.chosen)
        if session is not None:
            now = time.monotonic()
            for piece in pieces:
                session.channel.send(piece, now)
        elif self.chosen in self.asked:
            self.held += pieces
        else:
            others = ''.join(f', or /to {s.name}' for s in self.sessions.values())
            self.say(f'not connected to {self.chosen}: /connect {self.chosen} first{others}')

    def session_named(self, name):
        """The newest session with the peer called name, or None."""
        for session in reversed(self.sessions.values()):
            if session.name == name:
                return session
        return None

    def send_file(self, path):
        """/send PATH: offer a file to the chosen peer."""
        session = self.session_named(self.chosen)
        if session is None:
            self.say('not connected: /connect PEER first')
            return
        session.transfers.offer(path, time.monotonic())

    def answer_offer(self, accept, which=''):
        """/accept or /reject [N | FILE]: answer a file offer, the oldest if none is named.

        /reject NAME also says no to a request to connect: a file on offer
        called NAME comes first, then a peer NAME asking to connect.
        """
        try:
            transfers, receiving = transfer.OFFERS.pick(which, self.our_transfers())
        except transfer.TransferError as error:
            if not accept and which in self.asks:
                self.decline(which)
            elif not accept and which:
                self.say(f'{error}, and {wire.safe(which)} has not asked to connect')
            else:
                self.say(str(error))
            return
        transfers.answer(receiving, accept, time.monotonic())

    def cancel_file(self, which):
        """/cancel [N | FILE]: stop sending a file, the newest if none is named."""
        try:
            transfers, sending = transfer.SENDS.pick(which, self.our_transfers(), newest=True)
        except transfer.TransferError as error:
            self.say(str(error))
            return
        transfers.cancel(sending)

    def our_transfers(self):
        """The Transfers of each of our sessions, for the numbers shared by all peers."""
        return [session.transfers for session in self.sessions.values()]

    def quit(self):
        """Say BYE to every peer and to the servers, then stop the loop."""
        for session in self.sessions.values():
            session.send(wire.GOODBYE)
            session.transfers.abort('we left')
        for link in self.links:
            link.send(wire.BYE)
        self.running = False

    # -- messages from a server ---------------------------------------------

    def handle_control(self, link, message):
        """Act on one message from a server.

        The header's reply flag (point 8) tells an ASK or DECLINE about
        another peer's request from the server's answer to our own.
        """
        reply = message.flags & wire.FLAG_REPLY
        if message.type == wire.INTRODUCE:
            if message.name in link.connects:
                link.connects.remove(message.name)
            self.introduced(link, message)
        elif message.type == wire.ASK and reply:
            self.answered(link, message.name)
            self.say(f'asked {message.name}; waiting for their answer')
        elif message.type == wire.ASK:
            self.asked_by(link, message.name)
        elif message.type == wire.DECLINE and reply:
            self.refused(message)
        elif message.type == wire.RELAY:
            self.relayed(message)
        elif message.type == wire.PEERS:
            self.listing = max(0, self.listing - 1)
            names = ', '.join(message.names) or 'nobody'
            self.say(f'peers: {names}')
        elif message.type == wire.REGISTERED:
            link.registered(message.token, time.monotonic())
        elif message.type == wire.ERROR:
            self.server_error(link, message)

    @staticmethod
    def answered(link, name):
        """The server answered our CONNECT to name: the next answer is another's."""
        if name in link.connects:
            link.connects.remove(name)

    def asked_by(self, link, name):
        """NAME asks to connect: accept it by --allow, else ask our user.

        Nothing goes toward the asker until the user says yes: the server
        sends its addresses only when both have asked.
        """
        if name in self.allow or '*' in self.allow:
            self.say(f'{name} asks to connect; accepted (--allow)')
            link.send(wire.CONNECT, target=name)
            return
        now = time.monotonic()
        self.asks = {n: ask for n, ask in self.asks.items() if now - ask[1] < ASKS_KEPT}
        if name not in self.asks and len(self.asks) >= MAX_ASKS:
            return      # the server caps asks too: a flood of them is not shown
        self.asks[name] = (link, now)
        self.say(f'{name} asks to connect: /connect {name} to accept, /reject {name} to decline')

    def refused(self, message):
        """Our request to connect to a peer ended without an introduction."""
        name = message.name
        self.asked.pop(name, None)
        self.say(f'{name} declined' if message.why == wire.DECLINED
                 else f'{name} did not answer')
        if name == self.chosen and self.session_named(name) is None:
            self.drop_held()

    def server_error(self, link, message):
        """An ERROR: try the next server for an unknown peer, else show it.

        A refused CONNECT also loses the chat held for that peer: say so.
        """
        if link.token is None:
            self.say(f'{link} refused to register us: {wire.safe(message.text)}')
            link.lost('registration refused')
            return
        refused = None
        if message.code in CONNECT_REFUSALS and link.connects:
            refused = link.connects.popleft()
            if message.code == wire.E_UNKNOWN_PEER and self.ask_next_server(link, refused):
                return
        self.say(f'error from the rendezvous server: {wire.safe(message.text)}')
        if refused is None and message.code == wire.E_RATE_LIMITED:
            self.listing = max(0, self.listing - 1)     # too many /list: that was the answer
        if refused is not None and refused == self.chosen and self.session_named(refused) is None:
            self.asked.pop(refused, None)
            self.drop_held()

    def ask_next_server(self, link, name):
        """Ask the servers after link to introduce name; False if none is left."""
        for other in self.links[self.links.index(link) + 1:]:
            if other.token is not None:
                other.send(wire.CONNECT, target=name)
                other.connects.append(name)
                return True
        return False

    def drop_held(self):
        """The lines held for the chosen peer will not go: say what is lost."""
        for piece in self.held:
            self.say(f'not delivered to {self.chosen}: {wire.safe(piece)}')
        self.held = []

    def introduced(self, link, message):
        """A server introduced a peer: start punching toward it (points 4, 5)."""
        now = time.monotonic()
        if message.role not in (0, 1):
            self.say(f'{link} introduced {message.name} with role {message.role}, '
                     f'neither 0 nor 1: ignored')
            self.not_introduced(message.name)
            return
        if len(self.sessions) >= MAX_SESSIONS and self.session_named(message.name) is None:
            self.say(f'introduced to {message.name}, but {MAX_SESSIONS} sessions are open: '
                     f'ignored')
            self.not_introduced(message.name)
            return
        clash = self.sessions.get(identity.session_id(message.session))
        if clash is not None and clash.name != message.name:
            # Another peer's token: taking it would orphan that session, sockets and all.
            self.say(f'{link} introduced {message.name} with the session of {clash.name}: '
                     f'ignored')
            return
        old = self.session_named(message.name)
        carried = []
        if old is not None:         # a new introduction replaces the old session
            # Its unacknowledged lines go on the new one: the user typed
            # them for this peer, and a new /connect usually means the old
            # path is dead.  (One that did arrive, its ACK lost, shows twice.)
            carried = old.channel.take_unacknowledged()
            self.end_session(old, f'{message.name} was introduced again')
        started = self.asked.pop(message.name, now)
        targets = punch.candidates(message, self.mapping.public if self.mapping else None,
                                   self.networks)
        session = Session(self, link, message.name, message.session, message.role, targets,
                          now, started)
        self.sessions[session.key.id] = session
        tcp_punches = sum(1 for s in self.sessions.values() if s.trying_tcp)
        if self.transport != 'udp' and message.tcp_port and tcp_punches < MAX_TCP_PUNCHES:
            self.start_tcp(session, link, message, now)
        else:
            self.say(f'introduced to {message.name}; punching to '
                     f'{" ".join(map(wire.format_endpoint, targets))}')
            session.start_punch(now)
        early, self.early_punches = self.early_punches, []
        for early_message, source in early:
            self.peer_message(early_message, source)
        if message.name == self.chosen:
            carried += self.held        # typed after those, while no session was up
            self.held = []
        for piece in carried:
            session.channel.send(piece, now)

    def not_introduced(self, name):
        """We ignored name's INTRODUCE: our request is over, the lines held for it cannot go."""
        self.asked.pop(name, None)
        if name == self.chosen and self.session_named(name) is None:
            self.drop_held()

    def start_tcp(self, session, link, message, now):
        """TCP hole punching from our control connection's port (future work)."""
        private = [(host, message.tcp_port) for host, _ in message.private]
        targets = [message.tcp_public] + [endpoint for endpoint in private
                                          if endpoint[0] in {t[0] for t in session.targets}]
        targets = list(dict.fromkeys(targets))
        self.say(f'introduced to {message.name}; punching TCP to '
                 f'{" ".join(map(wire.format_endpoint, targets))}')
        try:
            session.tcp = tcppunch.TcpPunch(
                self.selector, link.local, targets, session.key, now,
                lambda stream: self.tcp_locked(session, stream),
                lambda stream, inner: self.session_message(session, inner, None))
        except OSError as error:        # the port cannot be shared here
            session.tcp = None
            self.after_tcp(session, f'cannot punch TCP ({error.strerror})', now)

    def tcp_locked(self, session, stream):
        """A TCP connection proved the peer: chat goes over it."""
        now = time.monotonic()
        peer = wire.plain(stream.sock.getpeername())
        elapsed = (now - session.started) * 1000
        self.connected(session, now, f'direct, tcp, {elapsed:.0f} ms',
                       f' at {wire.format_endpoint(peer)}')

    def relay_lost(self, link):
        """A server went away: the sessions it relayed went with it, and our requests.

        The server forgets a session when either peer's control connection
        closes, so even after we register again nothing would reach the
        peer: say so, and how to reach it again.
        """
        for session in list(self.sessions.values()):
            if session.link is link and session.relayed:
                self.say(f'the relay to {session.name} went with the server; '
                         f'/connect {session.name} to reach them again')
                self.end_session(session, 'the relay went away')
        if not any(other.token is not None for other in self.links):
            self.requests_lost()

    def requests_lost(self):
        """No server is left that holds our requests to connect: none will be introduced.

        A server forgets a peer's requests with its control connection,
        and registering again does not renew them; so the lines held for
        the chosen peer are reported now, not kept for ever (issue #11).
        """
        for name in self.asked:
            self.say(f'the request to connect to {name} went with the server; '
                     f'/connect {name} again once registered')
        self.asked.clear()
        if self.session_named(self.chosen) is None:
            self.drop_held()

    def relayed(self, message):
        """Peer traffic that came through the server's relay (point 11).

        An empty message is the server's word that the peer's control
        connection closed: a relayed session ends with it, a direct one
        goes on (point 7: the server is not on the direct path).
        """
        session = self.sessions.get(identity.session_id(message.session))
        if session is None:
            return
        if not message.message:
            session.relay_gone = True
            if session.endpoint is not None:    # direct over UDP: is the peer still there?
                session.doubted = time.monotonic()
                session.send(wire.KEEPALIVE)
            if session.relayed:
                self.say(f'{session.name} lost the rendezvous server, and with it the '
                         f'relay; /connect {session.name} to reach them again')
                self.end_session(session, 'the relay went away')
            return
        try:
            inner = wire.decode(message.message)
        except wire.ProtocolError:
            return
        if inner.type not in wire.PEER_TYPES or not session.key.check(inner):
            return
        if inner.type == wire.PUNCH:
            self.punch_requested(session)
            return
        self.session_message(session, inner, source=None)

    def punch_requested(self, session):
        """The peer lost its path to us and punches again: so must we, now and then.

        A relayed PUNCH costs the peer a few bytes and us a punch round:
        one per REPUNCH_EVERY seconds at the most.
        """
        now = time.monotonic()
        if session.punching or now - session.started < REPUNCH_EVERY:
            return
        self.say(f'{session.name} lost the direct path; punching again')
        session.started = now
        session.start_punch(now)

    # -- UDP: mapping refreshes and peer traffic -----------------------------

    def send_udp(self, data, endpoint):
        """Send one datagram; a failure here is a lost packet, nothing more."""
        if self.narrator:
            self.narrator.sent(data, endpoint)
        try:
            self.udp.sendto(data, endpoint)
        except OSError:
            pass

    def read_udp(self, sock, mask):
        """Read every waiting datagram; ignore any that is not for us."""
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
            if self.narrator:
                self.narrator.received(message, source)
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
        """A datagram from a peer: taken only with the MAC of a session we hold.

        With --tcp-only we take none at all: the user asked for no UDP path.
        """
        if self.transport == 'tcp':
            return
        session = self.sessions.get(message.session)
        if session is None:
            if message.type == wire.PUNCH and len(self.early_punches) < 16:
                # The peer's INTRODUCE reached it before ours reached us:
                # keep its punch until ours arrives, then check and answer it.
                self.early_punches.append((message, source))
            return
        if not session.key.check(message):
            return          # not the peer: forged, or for another session
        newer = session.key.newer(message)
        if session.endpoint is not None and not wire.same_endpoint(source, session.endpoint):
            if not newer or message.flags & wire.FLAG_PUNCHING or message.type == wire.PUNCH_ACK:
                return      # an old copy replayed from elsewhere, or a late punch
            self.moved(session, source)
        self.session_message(session, message, source)

    def moved(self, session, source):
        """The peer's regular traffic now comes from elsewhere: its NAT remapped it.

        Only a message newer than any before moves the path, so a copy of
        an old one, replayed by someone who saw it, cannot.
        """
        session.punch.locked = source
        self.say(f'{session.name} now reaches us from {wire.format_endpoint(source)}')

    def session_message(self, session, message, source):
        """Act on a proven peer message; source is None when it came over TCP or the relay."""
        now = time.monotonic()
        session.keepalive.heard(now)
        if source is not None and message.type != wire.GOODBYE:
            self.punched(session, message, source, now)
        if message.type == wire.DATA:
            ready, ack = session.channel.receive(message.seq, message.text, message.oldest)
            session.send(wire.ACK, seq=ack, sack=session.channel.selective())
            for text in ready:
                self.show_chat(session.name, text)
        elif message.type == wire.ACK:
            session.channel.acknowledge(message.seq, now, message.sack)
        elif message.type in session.transfers.MESSAGES:
            session.transfers.handle(message, now)
        elif message.type == wire.GOODBYE:
            self.say(f'{session.name} left')
            self.end_session(session, f'{session.name} left')

    def end_session(self, session, why):
        """Forget a session: its transfers stop (why says why), chat goes nowhere.

        Every chat line it still had unacknowledged is reported, never
        dropped without a word (issue #11): the peer left, or is gone, in
        the middle of it.  (A session that a new one replaces hands its
        lines over first: see introduced.)
        """
        for text in session.channel.take_unacknowledged():
            self.say(f'not delivered to {session.name}: {wire.safe(text)}')
        session.transfers.abort(why)
        session.stop_tcp()
        del self.sessions[session.key.id]

    def punched(self, session, message, source, now):
        """A datagram of this session straight from the peer: proof of a path.

        The punch bounces a PUNCH and locks onto the first proof (points 5,
        8); a proof that comes after we gave up and relayed opens the
        direct path all the same.
        """
        was_locked = session.endpoint is not None
        session.punch.receive(message, source)
        if was_locked:
            return
        # The peer found us over UDP first, or it has given up on the TCP
        # connection that we still hold (it punches UDP only then): UDP it is.
        session.stop_tcp()
        session.relayed = False
        if self.narrator:
            self.narrator.locked(session.endpoint, 'pt 5: the first proof wins')
        elapsed = (now - session.started) * 1000
        self.connected(session, now, f'direct, {elapsed:.0f} ms',
                       f' at {wire.format_endpoint(session.endpoint)}')

    def connected(self, session, now, how, where=''):
        """Say how we reach the peer, and where typed lines go."""
        self.say(f'connected to {session.name}{where} ({how})')
        if self.chosen is None:
            self.chosen = session.name      # the first peer: nobody else was chosen
        if self.chosen != session.name:
            self.say(f'what you type still goes to {self.chosen}; /to {session.name} to change')
        session.channel.hurry(now)


class LineReader:
    """Whole lines from a non-blocking file descriptor (stdin)."""

    def __init__(self, fd):
        self.fd = fd
        self.partial = bytearray()
        self.polled = False     # a file the selector refused: the loop reads it each turn
        self.terminal = os.isatty(fd)
        os.set_blocking(fd, False)

    def read(self):
        """Return (complete lines, True at end of input).

        A line longer than MAX_LINE is cut there, so that endless input
        without a newline cannot fill our memory.
        """
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return [], False
        self.partial += data
        lines = []
        while b'\n' in self.partial or len(self.partial) >= MAX_LINE or \
                (not data and self.partial):
            end = self.partial.find(b'\n')
            end = min(MAX_LINE, len(self.partial)) if end < 0 else end
            lines.append(self.partial[:end].decode('utf-8', 'replace').rstrip('\r'))
            del self.partial[:end + 1]
        return lines, not data


class RawChat:
    """Plain lines over UDP, one datagram each: the article's netcat demo.

    ``nc -u -p 17000 PEER 17000`` at both ends; this speaks the same way,
    with no rendezvous and no header, so it can talk to a real netcat.
    """

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
            stdin.polled = True     # a file or /dev/null: always ready, as in Client.run
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


def split_utf8(text, limit):
    """Cut text into pieces of at most limit bytes of UTF-8, on characters."""
    data = text.encode('utf-8')
    pieces = []
    while data:
        cut = min(limit, len(data))
        while cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut -= 1        # don't split inside a multi-byte character
        pieces.append(data[:cut].decode('utf-8'))
        data = data[cut:]
    return pieces


def udp_port(text):
    """An argparse type: a UDP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f'{port} is not a port: give 0-65535')
    return port


def seconds(text):
    """An argparse type: a time in seconds, 0 or more (a negative interval means nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f'{text} is not allowed: give 0 or more seconds')
    return value


def parse_args(argv):
    """The command line."""
    parser = argparse.ArgumentParser(
        description='Chat peer to peer through NATs: a rendezvous server introduces '
                    'the peers, UDP hole punching connects them directly.')
    parser.add_argument('name', nargs='?',
                        help='your name: 1-32 bytes, printable, no spaces')
    parser.add_argument('--server', action='append', metavar='HOST[:PORT]',
                        help=f'a rendezvous server; give several to register with all '
                             f'(default: 127.0.0.1:{wire.DEFAULT_PORT})')
    parser.add_argument('--port', type=udp_port, default=0, metavar='UDP_PORT',
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
    parser.add_argument('--downloads', default='.', metavar='DIR',
                        help='where files that peers send are saved (default: here)')
    parser.add_argument('--punch-timeout', type=seconds, default=punch.PUNCH_TIMEOUT,
                        metavar='SECONDS',
                        help=f'give up punching and relay after this long '
                             f'(default: {punch.PUNCH_TIMEOUT:.0f})')
    parser.add_argument('--allow', action='append', default=[], metavar='PEER',
                        help="accept PEER's requests to connect without asking; may be "
                             "given several times; '*' accepts anyone (for scripts and demos)")
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
    return args


def main(argv=None):
    """Run the client; exit 0 on /quit or end of input, 1 on a fatal error."""
    args = parse_args(argv)
    if args.raw:
        return run_raw(args)
    try:
        key = identity.load_key(args.key or identity.default_key_path())
    except (OSError, ValueError) as error:
        print(f'* cannot use the key file: {error}')
        return 1
    client = Client(args.name, args.server, args.port, args.keepalive, args.punch_timeout,
                    args.downloads, args.transport, key=key, allow=args.allow)
    if args.verbose:
        client.narrator = narrate.Narrator(args.name, sys.stderr)
    try:
        client.start()
        if args.connect:
            client.connect(args.connect)
        client.run()
    except Fatal as error:
        client.say(str(error))
        return 1
    except KeyboardInterrupt:
        client.quit()
    return 0


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


if __name__ == '__main__':
    sys.exit(main())
