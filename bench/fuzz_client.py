"""In-process fuzz of what a hostile server, or a stranger on a punched TCP connection, sends us.

``python bench/fuzz.py --client-control N`` runs the three sides below, N
inputs each (strangers: until our side has decoded N of their frames; a
stream closes at the first bad one, so more are sent), after the
peer-message fuzz of ``--client-units`` (fuzz.py holds that one; this
module the rest).  Nothing here leaves loopback:

* **control**: messages from the rendezvous server into a real
  ``p2pclient.Client`` through ``Client.handle_control``, as its control
  link delivers them (encoded, then decoded by ``wire.decode``): INTRODUCE
  with every field at its edges, ASK and DECLINE with and without the
  reply flag, RELAY carrying nothing, garbage, or peer messages sealed
  with the key of a session the fuzz itself introduced, PEERS of 0 to
  1,000 names, ERROR of any code and text, REGISTERED, ALIVE, and valid
  messages of types a server never sends, from two servers (the second
  not registered yet).  The user types a /connect or a line now and
  then, and on a client that punches UDP only time jumps (punches give
  up, sessions relay; TCP punches would connect out).  A
  crash is any exception out of handle_control; a status line must be
  printable; the client's sessions (32), TCP punches (4), punch targets
  (16 per session) and descriptors must stay bounded, and a client that is
  closed must give back every descriptor it opened.  Punches go nowhere: a
  hostile server names any address, so the client's UDP sends are counted,
  and only those to 127.0.0.0/8 really leave (on a real socket).
* **stranger**: a real ``tcppunch.TcpPunch`` listening on 127.0.0.1 and a
  stranger that connects, reads our CHALLENGE and sends fuzzed frames
  (random bytes, broken CHALLENGE, PUNCH and DATA frames, peer messages
  sealed with a wrong key or with the right key but the wrong nonce, our
  own PUNCH reflected back, CHALLENGE floods, lengths up to 65535), then
  half-closes; the selector is driven by hand until our side closes.  The
  stranger must never be locked onto, and must receive nothing but one
  CHALLENGE and at most one sealed PUNCH, the answer to its first
  CHALLENGE, that echoes that nonce.
* **register**: ``control.ServerLink.wait_registered`` reading fuzzed
  frames from a socket pair whose far end then closes: each input ends in
  REGISTERED or in one printable line (``control.Fatal``).

A crash is shrunk to the fewest steps that still make it, and printed.
"""

import collections
import io
import ipaddress
import os
import random
import selectors
import socket
import struct
import time

import caps
import control
import identity
import p2pclient
import p2pcommon as wire
import interfaces
import punch
import tcppunch
from fuzz import UDP_MUTATORS, fuzz_message, int_edges, valid_raw

# ---------------------------------------------------------------------------
# Shared: shrinking and counting.


def shrink(steps, key_of):
    """The fewest of steps that still end in the crash key_of(steps) gives.

    key_of replays steps on a fresh target and returns the crash's key (or
    None).  Tails of growing length first (a crash often needs the state
    made just before it), then steps dropped one by one.
    """
    key = key_of(steps)
    if key is None:
        return steps
    for n in (1, 2, 3, 5, 10, 20, 50, 200, len(steps)):
        tail = steps[-n:]
        if key_of(tail) == key:
            i = 0
            while i < len(tail) - 1:
                shorter = tail[:i] + tail[i + 1:]
                if key_of(shorter) == key:
                    tail = shorter
                else:
                    i += 1
            return tail
    return steps


def crash_key(error):
    """What tells one crash from another: the exception's class and text."""
    return error.__class__.__name__, str(error)[:120]


def open_fds():
    """How many descriptors this process has open."""
    return len(os.listdir('/proc/self/fd'))


class Side:
    """What one side's fuzz counts: inputs, outcomes, crashes with their shrunk inputs."""

    def __init__(self, title):
        self.title = title
        self.counts = collections.Counter()
        self.by_type = collections.Counter()
        self.crashes = collections.Counter()
        self.examples = {}
        self.problems = collections.Counter()   # a check that failed -> count
        self.problem_examples = {}
        self.elapsed = 0.0

    def crash(self, error, steps, key_of):
        """Count one exception; keep the shortest steps for the first of its kind."""
        key = crash_key(error)
        self.crashes[key] += 1
        if key not in self.examples:
            self.examples[key] = shrink(steps, key_of)

    def problem(self, what, example):
        """Count a failed check (not an exception), with its first example."""
        self.problems[what] += 1
        self.problem_examples.setdefault(what, example)

    @property
    def failed(self):
        """True if anything raised or a check failed."""
        return bool(self.crashes or self.problems)


# ---------------------------------------------------------------------------
# control: a hostile server's messages into a real Client.

OUR_NAME = 'alice'
CONTROL_RESET = 1000            # inputs before a fresh client, so early states get fuzz too
PEER_NAMES = ['b', 'bob', 'x' * 32, 'é' * 16, 'ñandú', '名前', OUR_NAME, 'mallory']
TEXTS = ['', 'x', 'some error', '\x1b[2J\x1b[H* registered as alice', 'a\r\nb', '\x00\x07',
         '\u202eevil', '\x9b31m', 'é' * 500, 'x' * wire.MAX_TEXT]
PRIVATE = [('127.0.0.2', 9), ('10.0.0.1', 1), ('192.168.1.1', 65535), ('198.51.100.9', 53),
           ('172.16.0.1', 0), ('0.0.0.0', 0), ('255.255.255.255', 65535), ('::1', 9),
           ('fe80::1', 9), ('2001:db8::9', 9), ('::', 0), ('100.64.0.1', 9)]
PUBLIC = [('0.0.0.0', 0), ('::', 0), ('127.0.0.1', 9), ('198.51.100.7', 4000),
          ('255.255.255.255', 65535), ('2001:db8::7', 4001), ('ffff:' * 7 + 'ffff', 65535)]
UNEXPECTED = [wire.REGISTER, wire.MAPPING, wire.LIST, wire.CONNECT, wire.BYE, wire.ALIVE,
              wire.CHALLENGE, *sorted(wire.PEER_TYPES)]
# Where the fuzz's UDP may really go; the rest is only counted.
LOOPBACK = ipaddress.ip_network('127.0.0.0/8')


class ControlLink:
    """A control connection to a server that the fuzz plays: records what we send."""

    def __init__(self, client):
        self.client = client
        self.sent = collections.Counter()
        self.connects = collections.deque()
        self.token = b'r' * wire.TOKEN_SIZE
        self.local = ('127.0.0.1', 0)    # TCP punches listen on a free port
        self.lost_count = 0

    def __str__(self):
        return 'the fuzzing server'

    def send(self, type, **fields):
        """Encode one message to the server (a field that does not fit would raise)."""
        wire.encode(type, **fields)
        self.sent[type] += 1

    def tick(self, now):
        """No reconnects here."""

    def registered(self, token, now):
        """REGISTERED: registered (again)."""
        self.token = token

    def lost(self, why):
        """What ServerLink.lost does to the client; registered again at once, to go on."""
        self.lost_count += 1
        self.client.relay_lost(self)
        self.token = b'r' * wire.TOKEN_SIZE


class ControlUnit:
    """One client under a hostile server: a real Client, a recording link, a real UDP socket."""

    def __init__(self, transport):
        self.fds = open_fds()                       # before: a closed client gives all back
        self.out = io.StringIO()
        self.client = p2pclient.Client(OUR_NAME, [('127.0.0.1', 9)], out=self.out,
                                       transport=transport, downloads=os.devnull)
        # Two servers: an unknown peer at the first is asked of the second,
        # which has not registered us yet (an ERROR there refuses us).
        self.client.links = [ControlLink(self.client), ControlLink(self.client)]
        self.client.links[1].token = None
        self.client.udp = wire.UDPSocket(0, '127.0.0.1')
        self.client.udp.setblocking(False)
        self.client.networks = interfaces.our_networks()
        self.real_send = self.client.send_udp
        self.client.send_udp = self.send_udp
        self.datagrams = collections.Counter()     # 'loopback' / 'elsewhere (not sent)'
        self.read = 0                               # where in out the last check stopped
        self.tokens = {}                            # session token -> our role, as introduced
        self.peer_keys = {}                         # (token, our role) -> the peer's key
        self.relays = collections.Counter()         # RELAYs by what they carry

    def send_udp(self, data, endpoint):
        """The client's UDP send: counted; only loopback really goes."""
        if ipaddress.ip_address(endpoint[0]) in LOOPBACK:
            self.datagrams['loopback'] += 1
            self.real_send(data, endpoint)
        else:
            self.datagrams['elsewhere (not sent)'] += 1

    def step(self, step):
        """One input: a server message's bytes (from either server), a typed line, or time."""
        kind, value = step
        if kind in ('control', 'second server'):
            message = wire.decode(value)
            if message.type == wire.INTRODUCE and message.role in (0, 1):
                self.tokens[message.session] = message.role
            if message.type == wire.RELAY:
                self.relays[self.relay_kind(message)] += 1
            link = self.client.links[kind == 'second server']
            self.client.handle_control(link, message)
        elif kind == 'type':
            self.client.command(value)
        else:
            self.client.check_timers(time.monotonic() + value)

    def relay_kind(self, message):
        """What a RELAY carries, as the client will see it: for the table."""
        session = self.client.sessions.get(identity.session_id(message.session))
        if session is None:
            return 'RELAY of no session we hold'
        if not message.message:
            return 'RELAY, empty (the peer left the server)'
        try:
            inner = wire.decode(message.message)
        except wire.ProtocolError:
            return 'RELAY of garbage'
        if inner.type in wire.PEER_TYPES and session.key.check(inner):
            return f'RELAY, sealed {wire.TYPE_NAMES[inner.type]}, taken'
        return 'RELAY, not sealed by the peer'

    def new_lines(self):
        """The lines printed since the last call."""
        text = self.out.getvalue()
        lines, self.read = text[self.read:].splitlines(), len(text)
        return lines

    def close(self):
        """Close everything the client opened, as its end would."""
        for session in list(self.client.sessions.values()):
            self.client.end_session(session, 'the fuzz ended')
        self.client.udp.close()
        self.client.selector.close()


def endpoint_list(rng):
    """Private endpoints: none, a few, or 16."""
    n = rng.choice([0, 1, 3, wire.MAX_ENDPOINTS])
    return [rng.choice(PRIVATE) for _ in range(n)]


def a_name(rng, unit):
    """A peer name: from the pool, or one the client already knows."""
    if rng.random() < 0.3:
        return f'p{rng.randrange(2 * caps.MAX_SESSIONS)}'    # enough to reach the caps
    known = [s.name for s in unit.client.sessions.values()] + list(unit.client.asks)
    return rng.choice(PEER_NAMES + known * 2)


def introduce(rng, unit):
    """An INTRODUCE with its fields at their edges; sometimes a token in use."""
    tokens = list(unit.tokens)
    token = rng.choice(tokens) if tokens and rng.random() < 0.2 else rng.randbytes(16)
    return wire.reply(
        wire.INTRODUCE, name=a_name(rng, unit), session=token,
        role=rng.choice([0, 1, 0, 1, 2, 255]),
        public=rng.choice(PUBLIC), port_delta=rng.choice(int_edges('h') + [0, 0, 3, -3]),
        private=endpoint_list(rng), tcp_public=rng.choice(PUBLIC),
        tcp_port=rng.choice([0, 0, 1, 65535, rng.randrange(65536)]))


def peer_fields(rng, type, session=None):
    """Fields for a peer message of type (seal adds session, counter and MAC).

    seq sits next to what the session expects half the time, so that chat
    lines and chunks are taken, not only refused as out of the window.
    """
    fields = {}
    for field, fmt in wire.LAYOUTS[type]:
        if field in ('session', 'counter', 'mac'):
            continue
        if fmt is wire.TEXT:
            fields[field] = rng.choice(TEXTS)
        elif fmt is wire.BLOB:
            fields[field] = rng.choice([b'', b'x', rng.randbytes(rng.randrange(1200))])
        elif fmt.endswith('s'):
            size = struct.calcsize('!' + fmt)
            fields[field] = rng.choice([bytes(size), rng.randbytes(size)])
        elif field in ('seq', 'oldest') and session and rng.random() < 0.5:
            fields[field] = max(0, session.channel.expected + rng.choice([-1, 0, 0, 1]))
        else:
            bits = 8 * struct.calcsize('!' + fmt)
            fields[field] = rng.choice(int_edges(fmt) + [rng.randrange(2 ** bits)])
    return fields


def relay(rng, unit):
    """A RELAY: empty, garbage, or a sealed peer message of a live session (or of none).

    The fuzz seals as the peer would, one key per session, so that its
    counters grow; also with our own role (a reflection) and a wrong key.
    """
    live = list(unit.client.sessions.values())
    session = rng.choice(live) if live and rng.random() < 0.8 else None
    token = session.token if session else rng.randbytes(16)
    role = session.key.role if session else 0
    peer = unit.peer_keys.setdefault((token, role), identity.SessionKey(token, 1 - role))
    type = rng.choice(sorted(wire.PEER_TYPES))
    sealed = peer.seal(type, **peer_fields(rng, type, session))
    inner = rng.choice([
        b'', rng.randbytes(rng.randrange(64)), sealed, sealed, sealed, sealed, sealed[:-1],
        identity.SessionKey(token, role).seal(type, **peer_fields(rng, type)),   # reflected
        identity.SessionKey(rng.randbytes(16), 1 - role).seal(type, **peer_fields(rng, type)),
        wire.encode(wire.CHALLENGE, nonce=rng.randbytes(16))])
    return wire.reply(wire.RELAY, session=token, message=inner)


def server_message(rng, unit):
    """One message a hostile server sends, as bytes: (type name, bytes)."""
    flags = rng.choice([0, wire.FLAG_REPLY])
    pick = rng.random()
    if pick < 0.25:
        return 'INTRODUCE', introduce(rng, unit)
    if pick < 0.45:
        return 'RELAY', relay(rng, unit)
    if pick < 0.55:
        return 'ASK', wire.encode(wire.ASK, flags, name=a_name(rng, unit))
    if pick < 0.65:
        return 'DECLINE', wire.encode(wire.DECLINE, flags, name=a_name(rng, unit),
                                      why=rng.choice([0, 1, 255]))
    if pick < 0.73:
        code = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 65535, rng.randrange(65536)])
        return 'ERROR', wire.reply(wire.ERROR, code=code, text=rng.choice(TEXTS))
    if pick < 0.78:
        n = rng.choice([0, 1, 2, wire.MAX_PEERS_LISTED])
        return 'PEERS', wire.reply(wire.PEERS, names=[rng.choice(PEER_NAMES) for _ in range(n)])
    if pick < 0.82:
        return 'REGISTERED', wire.reply(wire.REGISTERED, token=rng.randbytes(16))
    if pick < 0.86:
        return 'ALIVE', wire.encode(wire.ALIVE, flags)
    if pick < 0.93:
        return 'mutated (server fuzz)', fuzz_message(rng, UDP_MUTATORS, True)[1]
    type = rng.choice(UNEXPECTED)
    raw = valid_raw(rng, type)
    raw.flags |= flags
    return 'unexpected ' + wire.TYPE_NAMES[type], raw.pack()


def control_step(rng, unit):
    """The next input: mostly a server message; a typed command; now and then time passes."""
    pick = rng.random()
    if pick < 0.05:
        return 'user', ('type', rng.choice(['/connect ' + a_name(rng, unit), 'a line',
                                            '/reject ' + a_name(rng, unit), '/list']))
    if pick < 0.07 and unit.client.transport == 'udp':    # a TCP punch would connect out
        return 'time', ('time', rng.choice([1.0, 5.0, 60.0, 3600.0]))
    label, data = server_message(rng, unit)
    return label, ('second server' if rng.random() < 0.1 else 'control', data)


def control_replay(steps, transport):
    """The crash key these steps make on a fresh client, or None."""
    unit = ControlUnit(transport)
    try:
        for step in steps:
            unit.step(step)
    except Exception as error:  # noqa: BLE001  (what we look for: anything at all)
        return crash_key(error)
    finally:
        unit.close()
    return None


def decodable(step):
    """False for a server message that wire.decode refuses: the link closes, nothing acts.

    Any other exception from decode is a crash: the link catches only ProtocolError.
    """
    try:
        if step[0] in ('control', 'second server'):
            wire.decode(step[1])
    except wire.ProtocolError:
        return False
    return True


def check_bounds(unit, side, baseline, step):
    """The client's own caps hold, and its descriptors stay within them."""
    client = unit.client
    if len(client.sessions) > caps.MAX_SESSIONS:
        side.problem(f'more than {caps.MAX_SESSIONS} sessions', step)
    if sum(1 for s in client.sessions.values() if s.tcp is not None) > tcppunch.MAX_TCP_PUNCHES:
        side.problem(f'more than {tcppunch.MAX_TCP_PUNCHES} TCP punches', step)
    if any(len(s.targets) > wire.MAX_ENDPOINTS for s in client.sessions.values()):
        side.problem(f'more than {wire.MAX_ENDPOINTS} punch targets', step)
    punches = sum(1 for s in client.sessions.values() if s.tcp is not None)
    extra = open_fds() - baseline
    if extra > tcppunch.MAX_TCP_PUNCHES + 4:
        side.problem('descriptors beyond the TCP punches\' (a leak)', step)
    for what, n in [('sessions at once (most)', len(client.sessions)),
                    ('TCP punches at once (most)', punches),
                    ('descriptors over a new client\'s (most)', extra)]:
        side.counts[what] = max(side.counts[what], n)
    for line in unit.new_lines():
        side.counts['lines printed'] += 1
        side.counts['lines printed, chat (<peer> text)'] += line.startswith('<')
        if not line.isprintable():
            side.problem('status line not printable', line)


def control_fuzz(count, seed):
    """count server messages (and a few typed lines) into real clients; return the Side."""
    rng = random.Random(f'control{seed}')
    side = Side('server -> client (Client.handle_control)')
    started = time.monotonic()
    before = open_fds()
    transports = ['udp', 'both']
    epoch = 0
    unit, history = None, []
    for i in range(count):
        if i % CONTROL_RESET == 0:
            if unit:
                finish_control(unit, side)
            epoch += 1
            unit, history = ControlUnit(transports[epoch % 2]), []
            baseline = open_fds()
        label, step = control_step(rng, unit)
        side.by_type[label] += 1
        try:
            if not decodable(step):
                side.counts['not decodable (the link would close)'] += 1
                continue
            history.append(step)
            unit.step(step)
        except Exception as error:  # noqa: BLE001  (what we count: anything at all)
            transport = unit.client.transport
            side.crash(error, history, lambda steps: control_replay(steps, transport))
            finish_control(unit, side)
            unit, history = ControlUnit(transports[epoch % 2]), []    # a crash ends a client
            baseline = open_fds()
            continue
        check_bounds(unit, side, baseline, step)
    finish_control(unit, side)
    count_leaks(side, before, 'descriptors left after every client closed')
    side.elapsed = time.monotonic() - started
    return side


def count_leaks(side, before, what):
    """Count the descriptors opened since ``before`` and still open: any is a problem."""
    leaked = open_fds() - before
    side.counts[what] = leaked
    if leaked > 0:
        side.problem(what, leaked)


def finish_control(unit, side):
    """Add up what a client sent before it is closed."""
    for link in unit.client.links:
        for type, n in link.sent.items():
            side.counts[f'sent to a server: {wire.TYPE_NAMES[type]}'] += n
        side.counts['registrations lost (ERROR before REGISTERED)'] += link.lost_count
    side.counts.update(unit.relays)
    for where, n in unit.datagrams.items():
        side.counts[f'UDP datagrams: {where}'] += n
    unit.close()
    if open_fds() > unit.fds:
        side.problem('descriptors a closed client left open', open_fds() - unit.fds)


# ---------------------------------------------------------------------------
# stranger: fuzzed frames into a punched TCP connection's challenge-response.

PUNCH_TOKEN = bytes(range(16, 32))
PUNCH_ROLE = 1
# Frames per connection, picked at random: mostly few, since a stream closes
# at the first frame that is not the peer's, and the rest are never read.
STRANGER_FRAMES = [1, 1, 1, 1, 2, 2, 3, 10]
DECODE = wire.decode                    # the real one, while drive counts its calls
CHALLENGE_FIRST = 'challenge first'     # a pick: the plain CHALLENGE a peer begins with


def frames_for(picks, nonce):
    """A connection's frames: each pick is a seed for stranger_frame, or CHALLENGE_FIRST."""
    return [('CHALLENGE, first', wire.encode(wire.CHALLENGE, nonce=bytes(16)))
            if pick == CHALLENGE_FIRST else stranger_frame(random.Random(pick), nonce)
            for pick in picks]


def stranger_frame(rng, nonce):
    """One frame a stranger sends, knowing our CHALLENGE's nonce: (label, bytes)."""
    ours = identity.SessionKey(PUNCH_TOKEN, PUNCH_ROLE)        # our own role: a reflection
    peer = identity.SessionKey(PUNCH_TOKEN, 1 - PUNCH_ROLE)
    wrong = identity.SessionKey(rng.randbytes(16), 1 - PUNCH_ROLE)
    pick = rng.randrange(12)
    if pick == 0:
        return 'random bytes', rng.randbytes(rng.randrange(1, 64))
    if pick == 1:
        return 'CHALLENGE', wire.encode(wire.CHALLENGE, nonce=rng.randbytes(16))
    if pick == 2:
        return 'CHALLENGE flood', wire.encode(wire.CHALLENGE, nonce=rng.randbytes(16)) * 50
    if pick == 3:
        return 'PUNCH, wrong key, our nonce', wrong.seal(wire.PUNCH, nonce=nonce)
    if pick == 4:
        return 'PUNCH, right key, wrong nonce', peer.seal(
            wire.PUNCH, nonce=rng.choice([punch.NO_NONCE, rng.randbytes(16)]))
    if pick == 5:
        return 'PUNCH, our own role (reflected)', ours.seal(wire.PUNCH, nonce=nonce)
    if pick == 6:
        return 'DATA, wrong key', wrong.seal(wire.DATA, seq=0, oldest=0, text='hi')
    if pick == 7:
        return 'DATA, right key, unproven', peer.seal(wire.DATA, seq=0, oldest=0, text='hi')
    if pick == 8:
        return 'huge length', struct.pack('!HBBBxH', wire.MAGIC, wire.VERSION,
                                          rng.choice([wire.DATA, wire.CHALLENGE]), 0,
                                          rng.choice([65535, 65534, 1200, 17]))
    if pick == 9:
        data = bytearray(rng.choice([wire.encode(wire.CHALLENGE, nonce=nonce),
                                     peer.seal(wire.PUNCH, nonce=nonce)]))
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return 'bit flip in CHALLENGE or PUNCH', bytes(data)
    if pick == 10:
        return 'truncated', peer.seal(wire.PUNCH, nonce=nonce)[:rng.randrange(1, 40)]
    return 'mutated (server fuzz)', fuzz_message(rng, UDP_MUTATORS, True)[1]


class Stranger:
    """A TcpPunch listening on loopback, and what strangers did to it."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.locked = []
        self.messages = []
        self.key = identity.SessionKey(PUNCH_TOKEN, PUNCH_ROLE)
        self.punch = tcppunch.TcpPunch(self.selector, ('127.0.0.1', 0), [], self.key,
                                       time.monotonic(), self.locked.append,
                                       lambda stream, message: self.messages.append(message))
        self.address = self.punch.listener.getsockname()
        self.read = 0                   # frames our side decoded (or decode refused)
        self.taken = 0                  # of those, frames that reached TcpPunch.received
        self.received = self.punch.received
        self.punch.received = self.count

    def count(self, stream, message):
        """TcpPunch.received, counted: the frames that got past decoding."""
        self.taken += 1
        self.received(stream, message)

    def drive(self, until, timeout=5.0):
        """Run the selector by hand until until() is true; False on a timeout.

        Meanwhile every frame our side decodes (or refuses) is counted in
        self.read: the stranger's frames that reached our code.
        """
        deadline = time.monotonic() + timeout
        decode, wire.decode = wire.decode, self.decode
        try:
            while not until():
                if time.monotonic() > deadline:
                    return False
                for key, mask in self.selector.select(0.05):
                    if self.selector.get_map().get(key.fd) is key:
                        key.data(key.fileobj, mask)
        finally:
            wire.decode = decode
        return True

    def decode(self, data):
        """wire.decode, counted (FramedStream calls it for each frame it reads)."""
        self.read += 1
        return DECODE(data)

    def close(self):
        """Close the punch and the selector."""
        self.punch.close()
        self.selector.close()


def stranger_connection(target, frames_of):
    """One stranger: connect, read our CHALLENGE, send frames, half-close, read to the end.

    frames_of(nonce) gives the frames (made knowing our nonce).  Sending
    and reading go in turn with our side's loop, one thread for both, so
    that neither waits on a full socket buffer.  Returns (the frames it
    sent, the bytes it received).
    """
    sock = socket.create_connection(target.address, timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    sock.setblocking(False)
    stranger = StrangerSocket(sock)
    # In the selector too, so that the loop wakes when the stranger has mail.
    target.selector.register(sock, selectors.EVENT_READ, lambda sock, mask: None)
    try:
        if not target.drive(lambda: stranger.pump() or stranger.challenged):
            raise AssertionError('no CHALLENGE within 5 s')
        frames = frames_of(stranger.nonce)
        stranger.output = bytearray(b''.join(data for _, data in frames))
        if not target.drive(stranger.pump):
            raise AssertionError('our side kept the stranger\'s connection open')
    finally:
        target.selector.unregister(sock)
        sock.close()
    return frames, bytes(stranger.heard)


class StrangerSocket:
    """The stranger's end: what it still has to send, and what it heard."""

    def __init__(self, sock):
        self.sock = sock
        self.output = None          # None until the frames are known; then sent, then SHUT_WR
        self.heard = bytearray()
        self.done = False           # our side closed the connection

    @property
    def challenged(self):
        """True once our CHALLENGE has arrived whole."""
        return len(self.heard) >= wire.HEADER_SIZE + wire.NONCE_SIZE

    @property
    def nonce(self):
        """Our CHALLENGE's nonce, as the stranger read it."""
        return bytes(self.heard[wire.HEADER_SIZE:wire.HEADER_SIZE + wire.NONCE_SIZE])

    def pump(self):
        """Send what the socket takes, half-close when all is sent, read; True when closed."""
        if self.output is not None and not self.done:
            try:
                if self.output:
                    del self.output[:self.sock.send(self.output)]
                if not self.output:
                    self.sock.shutdown(socket.SHUT_WR)
                    self.output = None
            except BlockingIOError:
                pass
            except OSError:
                self.output = None      # our side closed it: it has read what it needed
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b''
        self.heard.extend(data)
        self.done = self.done or not data
        return self.done


def check_heard(heard, frames, side):
    """The stranger got one CHALLENGE, then only sealed PUNCHes that echo its own nonces."""
    reader = wire.FrameReader()
    reader.feed(heard)
    received = [wire.decode(frame) for frame in reader.frames()]
    if reader.pending:
        side.problem('a cut-short frame', heard[-reader.pending:])
    if not received or received[0].type != wire.CHALLENGE:
        side.problem('the first frame is not CHALLENGE', received[:1])
    side.counts['CHALLENGE received'] += sum(m.type == wire.CHALLENGE for m in received)
    asked = set()
    stream = wire.FrameReader()
    stream.feed(b''.join(data for _, data in frames))
    try:
        for frame in stream.frames():
            message = wire.decode(frame)
            if message.type == wire.CHALLENGE:
                asked.add(message.nonce)
    except wire.ProtocolError:
        pass
    peer = identity.SessionKey(PUNCH_TOKEN, 1 - PUNCH_ROLE)
    for message in received[1:]:
        if message.type == wire.PUNCH and message.nonce in asked and peer.check(message):
            side.counts['PUNCH answers to its own CHALLENGE'] += 1
        else:
            side.problem('the stranger received something else', repr(message)[:200])
    if len(received) > 2:
        side.problem('more than one answer on a stream (a flood would pile up)', len(received))


def stranger_fuzz(count, seed):
    """Strangers' frames into a listening TcpPunch until our side has read count; the Side.

    A stream closes at the first frame that is not the peer's, so frames
    after it in one connection are sent but never read: the table counts
    frames sent, frames read (decoded or refused) and frames taken by
    TcpPunch.received, and the run goes on until count have been read.
    """
    rng = random.Random(f'stranger{seed}')
    side = Side('stranger -> punched TCP (TcpPunch.received)')
    started = time.monotonic()
    before = open_fds()
    target = Stranger()
    while side.counts['frames our side decoded (or decode refused)'] < count:
        picks = [rng.random() for _ in range(rng.choice(STRANGER_FRAMES))]
        if rng.random() < 0.5:
            picks[0] = CHALLENGE_FIRST    # as a peer would begin: so the next frame is read too
        read, taken = target.read, target.taken
        try:
            frames, heard = stranger_connection(target,
                                                lambda nonce: frames_for(picks, nonce))
        except Exception as error:  # noqa: BLE001  (what we count: anything at all)
            side.crash(error, picks, stranger_replay)
            frames = None
        side.counts['frames our side decoded (or decode refused)'] += target.read - read
        side.counts['frames taken by TcpPunch.received'] += target.taken - taken
        if frames is not None:
            side.counts['connections'] += 1
            side.by_type.update(label for label, _ in frames)
            check_heard(heard, frames, side)
            if target.locked or target.messages:
                side.problem('a stranger was locked onto, or its message taken', frames)
        if frames is None or target.locked or target.messages:
            target.close()              # a fresh one: the next stranger meets a clean state
            target = Stranger()
    side.counts['streams open at the end'] = len(target.punch.streams)
    target.close()
    count_leaks(side, before, 'descriptors left at the end')
    side.elapsed = time.monotonic() - started
    return side


def stranger_replay(picks):
    """The crash key one connection of these frames makes on a fresh TcpPunch, or None."""
    target = Stranger()
    try:
        stranger_connection(target, lambda nonce: frames_for(picks, nonce))
    except Exception as error:  # noqa: BLE001
        return crash_key(error)
    finally:
        target.close()
    return None


# ---------------------------------------------------------------------------
# register: a hostile server's answer to REGISTER.

REGISTER_ADDRESS = ('127.0.0.1', 7777)


def register_frame(rng):
    """One frame a server might send before (or instead of) REGISTERED: (label, bytes)."""
    pick = rng.randrange(8)
    if pick == 0:
        return 'REGISTERED', wire.reply(wire.REGISTERED, token=rng.randbytes(16))
    if pick == 1:
        return 'ERROR', wire.reply(wire.ERROR, code=rng.choice(int_edges('H')),
                                   text=rng.choice(TEXTS))
    if pick == 2:
        size = rng.choice([0, 1, 15, 17, 255])
        return 'REGISTERED, wrong size', struct.pack(
            '!HBBBxH', wire.MAGIC, wire.VERSION, wire.REGISTERED, 1, size) + bytes(size)
    if pick == 3:
        return 'random bytes', rng.randbytes(rng.randrange(1, 64))
    if pick == 4:
        return 'huge length', struct.pack('!HBBBxH', wire.MAGIC, wire.VERSION,
                                          rng.choice([wire.REGISTERED, wire.ERROR, 200]),
                                          0, rng.choice([65535, 17, 16]))
    if pick == 5:
        raw = valid_raw(rng, rng.choice(sorted(wire.LAYOUTS)))
        return 'another type', raw.pack()
    if pick == 6:
        data = bytearray(rng.choice([wire.reply(wire.REGISTERED, token=bytes(16)),
                                     wire.reply(wire.ERROR, code=2, text='name taken')]))
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return 'bit flip', bytes(data)
    return 'mutated (server fuzz)', fuzz_message(rng, UDP_MUTATORS, True)[1]


def register_once(frames):
    """wait_registered over a socket pair whose far end sends frames and closes.

    Returns 'REGISTERED' or 'Fatal'; any other exception goes up.  A Fatal's
    text must be one printable line: AssertionError otherwise.
    """
    ours, server = socket.socketpair()
    link = control.ServerLink(client=None, address=REGISTER_ADDRESS)
    link.sock = ours
    try:
        server.sendall(b''.join(frames))
        server.close()
        try:
            link.wait_registered()
        except control.Fatal as fatal:
            if not str(fatal).isprintable():
                raise AssertionError(f'Fatal not one printable line: {str(fatal)!r:.200}')
            return 'Fatal'
        if len(link.token) != wire.TOKEN_SIZE:
            raise AssertionError(f'REGISTERED with a token of {len(link.token)} bytes')
        return 'REGISTERED'
    finally:
        ours.close()
        server.close()


def register_replay(frames):
    """The crash key these frames make, or None."""
    try:
        register_once(frames)
    except Exception as error:  # noqa: BLE001
        return crash_key(error)
    return None


def register_fuzz(count, seed):
    """count hostile registrations (1-5 frames each, counted by kind); return the Side."""
    rng = random.Random(f'register{seed}')
    side = Side('server -> registration (ServerLink.wait_registered)')
    started = time.monotonic()
    before = open_fds()
    for _ in range(count):
        labelled = [register_frame(rng) for _ in range(rng.choice([1, 1, 2, 3, 5]))]
        frames = [data for _, data in labelled]
        side.by_type.update(label for label, _ in labelled)
        side.counts['registrations'] += 1
        try:
            side.counts[f'ended in {register_once(frames)}'] += 1
        except Exception as error:  # noqa: BLE001  (what we count: anything at all)
            side.crash(error, frames, register_replay)
    leaked = open_fds() - before
    if leaked > 0:
        side.problem('descriptors left at the end', leaked)
    side.elapsed = time.monotonic() - started
    return side


# ---------------------------------------------------------------------------


def control_sides(count, seed):
    """Run the three sides, count inputs each; print their tables; 1 if anything failed."""
    sides = [control_fuzz(count, seed), stranger_fuzz(count, seed), register_fuzz(count, seed)]
    print(f'\nin-process client fuzz, hostile server and stranger: '
          f'python bench/fuzz.py --client-control {count} --seed {seed}')
    for side in sides:
        report(side)
    return 1 if any(side.failed for side in sides) else 0


def report(side):
    """Print one side's table."""
    print(f'\n  {side.title}')
    print(f'    {"inputs (sent)":<44}  {sum(side.by_type.values())}')
    for label, n in sorted(side.by_type.items()):
        print(f'      {n:7d}  {label}')
    for key, n in sorted(side.counts.items()):
        print(f'    {key:<44}  {n}')
    print(f'    {"exceptions":<44}  {sum(side.crashes.values())}')
    print(f'    {"failed checks":<44}  {sum(side.problems.values())}')
    print(f'    {"elapsed":<44}  {side.elapsed:.1f} s')
    for key, n in side.crashes.most_common(10):
        print(f'    {n:7d}  {key[0]}: {key[1]}; the shortest inputs that raise:')
        for step in side.examples[key]:
            print(f'               {step!r:.300}')
    for what, n in side.problems.most_common(10):
        print(f'    {n:7d}  {what}, e.g. {side.problem_examples[what]!r:.300}')
