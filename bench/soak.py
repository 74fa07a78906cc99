"""Soak the rendezvous server with a churning crowd of real clients.

    python bench/soak.py [--minutes 10] [--clients 200] [--seed 1]

Starts one ``rendezvous.py`` on a free loopback port pair, its limits
raised (``--mapping-rate 0 --connect-rate 0 --max-per-address 100000``
and no accept, request or list rate: every client comes from 127.0.0.1),
and keeps about ``--clients``
``p2pclient.py`` processes alive against it for ``--minutes``.  Each client
registers, waits a random while (during which others may connect to it),
then types ``/connect`` to a random idle registered client, exchanges a
few chat lines with it both ways, and types ``/quit``; a new client takes
its place.  Starts are paced (``--spawn-rate`` a second): this is a
two-core machine, and a Python start-up costs about 90 ms of CPU.

Which peer a chat line goes to is "the one connected last", so the driver
keeps each client in at most one conversation at a time: both ends of a
conversation are reserved from the ``/connect`` until the last line has
arrived.  A few conversations (``--leave-rate``) have their target type
``/quit`` right after the ``/connect`` (a peer leaving mid-connect), and
a few new clients (``--collide-rate``) take the name of a live one (a name
collision); both are legitimate, and are counted, not failed.

Every 30 s it prints the server's resident memory (VmRSS), its open file
descriptors, the clients registered (as the driver sees them, and as the
server's LIST answers an observer connection), and the chat lines sent and
received so far.  At the end, after every client has quit, a table: memory
over time, lines sent and received, connects done, time to connect (from
typing ``/connect`` to the ``* connected to`` line) at p50 and p99.

Exit status 1 if a chat line sent on an established conversation never
arrived, the server crashed (a Traceback in its log, or it exited), or a
client crashed (a Traceback, or an exit status other than 0 after /quit
or 1 after a name collision); 0 otherwise.
"""

import argparse
import collections
import heapq
import math
import os
import platform
import random
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]
import p2pcommon as wire  # noqa: E402
from common import encode  # noqa: E402
from procs import start_server  # noqa: E402  (the tests' driver)

HOST = '127.0.0.1'
SERVER_ARGS = ('--mapping-rate', '0', '--connect-rate', '0', '--max-per-address', '100000',
               '--accept-rate', '0', '--request-rate', '0', '--list-rate', '0')
SAMPLE_EVERY = 30.0         # seconds between progress lines and memory samples
REGISTER_TIMEOUT = 20.0     # from start to "* registered"; start-up under load is slow
CONNECT_TIMEOUT = 30.0      # the punch gives up after 5 s and relays: this is generous
DELIVERY_TIMEOUT = 45.0     # the reliable layer retries for about 30 s
LEAVE_TIMEOUT = 15.0        # for the initiator to notice a target that left
DRAIN_TIMEOUT = 90.0        # after the run, for conversations under way to end
EXIT_TIMEOUT = 20.0         # for every client to exit after /quit

RE_REGISTERED = re.compile(r'^\* registered as (\S+) with ')
RE_TAKEN = re.compile(r"^\* name '.*' is taken$")
# "(direct, 3 ms)" over UDP; "(direct, tcp, 3 ms)" where TCP punching won.
RE_CONNECTED = re.compile(
    r'^\* connected to (\S+)(?: at \S+ \(direct, (?:(tcp), )?(\d+) ms\)'
    r'| \((relayed) through )')
RE_CHAT = re.compile(r'^<([^>]+)> (.*)$')
RE_LINE_ID = re.compile(r'^m(\d+) ')
RE_LEFT = re.compile(r'^\* (\S+) left$')
RE_ERROR = re.compile(r'^\* error from the rendezvous server: (.*)$')
RE_NOT_DELIVERED = re.compile(r'^\* not delivered to (\S+): (.*)$')
WORDS = ('punch', 'hole', 'nat', 'mapping', 'rendezvous', 'keepalive', 'relay', 'ümlaut',
         'token', 'session', 'cone', 'symmetric', '名前', 'udp', 'tcp')


class Client:
    """One p2pclient.py process, as the driver sees it."""

    def __init__(self, serial, name, popen, now):
        self.serial = serial
        self.name = name
        self.popen = popen
        self.out = popen.stdout.fileno()
        self.inp = popen.stdin.fileno()
        self.buffer = b''
        self.state = 'starting'         # starting, idle, busy, leaving, gone
        self.started = now
        self.initiate_at = None
        self.conversation = None
        self.collided = False
        self.crashed = False
        self.tail = collections.deque(maxlen=20)    # its last lines, for reports

    def __repr__(self):
        """name#serial: names repeat (collisions, reuse), serials do not."""
        return f'{self.name}#{self.serial}'


class Conversation:
    """One conversation: a typed /connect b; both are reserved until it ends."""

    def __init__(self, a, b, now, chaos):
        self.a = a
        self.b = b
        self.started = now
        self.chaos = chaos              # b quits right after the /connect
        self.connected = {}             # client -> when it said "connected to"
        self.phase = 'connecting'
        self.deadline = now + (LEAVE_TIMEOUT if chaos else CONNECT_TIMEOUT)
        self.to_send = 0                # lines scheduled but not typed yet


class Soak:
    """The driver: one selector loop over every client's output, and timers."""

    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        # Each client process its own name key: a name collision is then a
        # stranger's, which the server refuses, not the owner coming back.
        self.keys = tempfile.TemporaryDirectory(prefix='p2pnat-soak-keys-')
        self.selector = selectors.DefaultSelector()
        self.clients = {}               # stdout fd -> Client
        self.by_name = {}               # registered name -> Client
        self.idle = set()
        self.timers = []
        self.timer_serial = 0
        self.serial = 0
        self.line_serial = 0
        self.pending = {}               # line id -> (sender, receiver, sent at, conversation)
        self.delivered_ids = set()
        self.counts = collections.Counter()
        self.others = collections.Counter()     # status lines of no interest, by kind
        self.errors = collections.Counter()     # server errors, by text
        self.connect_ms = []            # driver-measured, /connect to "connected"
        self.client_ms = []             # as the client reports it: "(direct, N ms)"
        self.line_ms = []               # typed to printed at the other end
        self.samples = []
        self.problems = []
        self.server = None
        self.port = None
        self.observer = None
        self.mean_life = max(1.0, args.clients / args.spawn_rate)
        self.next_scan = 0.0
        self.next_initiate = 0.0

    # -- the run -------------------------------------------------------------

    def run(self):
        """Start the server, churn clients until the time is up, drain, report."""
        self.started = time.monotonic()
        self.server, self.port = start_server(*SERVER_ARGS)
        print(f'rendezvous.py pid {self.server.popen.pid} on {HOST}:{self.port}, '
              f'{self.args.clients} clients for {self.args.minutes:g} min', flush=True)
        self.observer = Observer(self.port)
        self.sample('start')
        end = self.started + self.args.minutes * 60
        next_sample = self.started + SAMPLE_EVERY
        next_spawn = self.started
        while time.monotonic() < end and self.server_alive():
            now = time.monotonic()
            spawning = self.alive() < self.args.clients
            if spawning and now >= next_spawn:
                self.spawn(now)
                # Paced, but a backlog of at most one second is caught up.
                next_spawn = max(next_spawn + 1 / self.args.spawn_rate, now - 1)
            self.initiate_due(now)
            if now >= next_sample:
                self.sample(f'{now - self.started:.0f} s')
                next_sample += SAMPLE_EVERY
            wait = max(0.0, next_spawn - now) if spawning else 0.1
            self.poll(min(0.1, wait))
        self.drain()
        return self.finish()

    def drain(self):
        """Let conversations under way end, then /quit everyone and wait."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.conversations() and time.monotonic() < deadline and self.server_alive():
            self.poll(0.05)
        for conversation in self.conversations():
            self.problems.append(f'conversation {conversation.a}->{conversation.b} '
                                 f'still {conversation.phase} at the end')
            self.end(conversation, 'unfinished at the end')
        for client in list(self.clients.values()):
            if client.state not in ('leaving', 'gone'):
                self.quit(client)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while self.clients and time.monotonic() < deadline:
            self.poll(0.05)
        for client in list(self.clients.values()):
            self.problems.append(f'{client} did not exit within {EXIT_TIMEOUT:.0f} s '
                                 f'of /quit; killed')
            self.counts['clients killed'] += 1
            client.popen.kill()
            self.gone(client)

    def poll(self, timeout):
        """Read what the clients printed, then run the timers that are due.

        The checks that scan every client run ten times a second at most:
        with 200 clients printing, a scan per wake-up would cost more CPU
        than the clients themselves.
        """
        for key, _ in self.selector.select(timeout):
            self.read(self.clients[key.fd])
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, action, args = heapq.heappop(self.timers)
            action(*args)
        if now < self.next_scan:
            return
        self.next_scan = now + 0.1
        for conversation in self.conversations():
            if now >= conversation.deadline:
                self.timed_out(conversation, now)
        for client in [c for c in self.clients.values() if c.state == 'starting']:
            if now - client.started > REGISTER_TIMEOUT:
                self.problems.append(f'{client} not registered after {REGISTER_TIMEOUT:.0f} s')
                self.counts['register timeouts'] += 1
                self.quit(client)

    def at(self, when, action, *args):
        """Run action(*args) at the monotonic time when."""
        self.timer_serial += 1
        heapq.heappush(self.timers, (when, self.timer_serial, action, args))

    def alive(self):
        """Clients that count toward --clients: not leaving, not gone."""
        return sum(c.state in ('starting', 'idle', 'busy') for c in self.clients.values())

    def conversations(self):
        """Conversations under way (each has its initiator in it)."""
        return [c.conversation for c in self.clients.values()
                if c.conversation and c.conversation.a is c]

    def server_alive(self):
        """False once the server has exited."""
        if self.server.popen.poll() is None:
            return True
        if 'server exited' not in self.counts:
            self.counts['server exited'] = 1
            self.problems.append(f'the server exited with {self.server.popen.returncode}')
        return False

    # -- clients -------------------------------------------------------------

    def spawn(self, now):
        """Start one client; a few take the name of a live one, on purpose."""
        self.serial += 1
        name = f'c{self.serial}'
        if self.by_name and self.rng.random() < self.args.collide_rate:
            name = self.rng.choice(sorted(self.by_name))
            self.counts['name collisions tried'] += 1
        popen = subprocess.Popen(
            [sys.executable, '-u', os.path.join(ROOT, 'p2pclient.py'), name,
             '--server', f'{HOST}:{self.port}', '--allow', '*',     # a load test: no one asks
             '--key', os.path.join(self.keys.name, f'{self.serial}.key')],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            bufsize=0)
        os.set_blocking(popen.stdout.fileno(), False)
        os.set_blocking(popen.stdin.fileno(), False)
        client = Client(self.serial, name, popen, now)
        self.clients[client.out] = client
        self.selector.register(client.out, selectors.EVENT_READ)
        self.counts['clients started'] += 1

    def type(self, client, line):
        """Type one line at a client; False if it cannot take it."""
        try:
            os.write(client.inp, (line + '\n').encode())
            return True
        except (BrokenPipeError, BlockingIOError, OSError) as error:
            if client.state != 'gone':
                self.problems.append(f'could not type at {client}: {error}')
            return False

    def quit(self, client):
        """Type /quit and end its input: it is leaving."""
        if client.state in ('leaving', 'gone'):
            return
        self.set_state(client, 'leaving')
        self.type(client, '/quit')
        try:
            client.popen.stdin.close()
        except OSError:
            pass

    def set_state(self, client, state):
        """Move a client to a state, keeping the idle set and name index right."""
        client.state = state
        if state == 'idle':
            self.idle.add(client)
        else:
            self.idle.discard(client)
        if state in ('leaving', 'gone') and self.by_name.get(client.name) is client:
            del self.by_name[client.name]

    def read(self, client):
        """Take what a client printed; act on each whole line."""
        try:
            data = os.read(client.out, 65536)
        except BlockingIOError:
            return
        if not data:
            self.gone(client)
            return
        client.buffer += data
        *lines, client.buffer = client.buffer.split(b'\n')
        for line in lines:
            self.line(client, line.decode('utf-8', 'replace'))

    def gone(self, client):
        """Its output ended: collect its exit status."""
        self.selector.unregister(client.out)
        del self.clients[client.out]
        try:
            code = client.popen.wait(5)
        except subprocess.TimeoutExpired:
            client.popen.kill()
            code = client.popen.wait()
        for pipe in (client.popen.stdout, client.popen.stdin):
            try:
                pipe.close()
            except OSError:
                pass
        was = client.state
        self.set_state(client, 'gone')
        expected = 1 if client.collided else 0
        if code != expected or client.crashed or was not in ('leaving', 'starting'):
            self.counts['client crashes'] += 1
            # A traceback ends with the error; the last frame in our own code
            # says where it happened.
            ours = [line.strip() for line in client.tail if ROOT in line and 'File "' in line]
            self.problems.append(f'{client} exited with {code} while {was}: '
                                 + ' | '.join(ours[-1:] + list(client.tail)[-1:]))
        if client.conversation:
            self.partner_gone(client)

    # -- what the clients print ------------------------------------------------

    def line(self, client, text):
        """Act on one line of a client's output."""
        client.tail.append(text)
        now = time.monotonic()
        if 'Traceback' in text:
            client.crashed = True
        if match := RE_CHAT.match(text):
            self.chat_arrived(client, match.group(1), match.group(2), now)
        elif match := RE_CONNECTED.match(text):
            self.connected(client, match.group(1), match.group(3),
                           'relayed' if match.group(4) else match.group(2) or 'udp', now)
        elif match := RE_REGISTERED.match(text):
            self.registered(client, now)
        elif RE_TAKEN.match(text):
            client.collided = True
            self.counts['name collisions (name taken)'] += 1
        elif match := RE_LEFT.match(text):
            self.left(client, match.group(1))
        elif match := RE_ERROR.match(text):
            self.server_error(client, match.group(1))
        elif match := RE_NOT_DELIVERED.match(text):
            self.counts['"not delivered" reports'] += 1
            self.others['not delivered to a peer'] += 1
        else:
            self.others[re.sub(r'\S*\d\S*', '…', text)[:60]] += 1

    def registered(self, client, now):
        """A client has its name: it may be connected to, and will connect later."""
        if client.state != 'starting':
            return
        self.counts['clients registered'] += 1
        self.by_name[client.name] = client
        self.set_state(client, 'idle')
        client.initiate_at = now + self.rng.uniform(0.5, 2 * self.mean_life)

    def initiate_due(self, now):
        """Start a conversation for each idle client whose time has come."""
        if now < self.next_initiate:
            return
        self.next_initiate = now + 0.1
        for client in sorted((c for c in self.idle if c.initiate_at <= now),
                             key=lambda c: c.serial):
            if client not in self.idle:
                continue            # became the target of one started just now
            targets = [c for c in self.idle if c is not client]
            if not targets:
                client.initiate_at = now + 0.5
                continue
            target = self.rng.choice(sorted(targets, key=lambda c: c.serial))
            self.start_conversation(client, target, now)

    def start_conversation(self, a, b, now):
        """a types /connect b; with --leave-rate, b then quits at once."""
        chaos = self.rng.random() < self.args.leave_rate
        conversation = Conversation(a, b, now, chaos)
        for client in (a, b):
            client.conversation = conversation
            self.set_state(client, 'busy')
        self.counts['connects typed'] += 1
        if not self.type(a, f'/connect {b.name}'):
            self.end(conversation, 'initiator gone')
            return
        if chaos:
            self.counts['targets told to leave mid-connect'] += 1
            b.conversation = None
            self.quit(b)

    def connected(self, client, peer, direct_ms, path, now):
        """A client says it is connected to peer (direct or relayed)."""
        conversation = client.conversation
        if conversation is None or conversation.phase != 'connecting':
            self.counts['"connected" outside a connect'] += 1
            return
        other = conversation.b if client is conversation.a else conversation.a
        if peer != other.name:
            self.problems.append(f'{client} connected to {peer}, expected {other.name}')
            return
        if client not in conversation.connected:
            conversation.connected[client] = now
        if client is conversation.a and not conversation.chaos:
            self.connect_ms.append((now - conversation.started) * 1000)
            if direct_ms is not None:
                self.client_ms.append(int(direct_ms))
            self.counts[f'connects {path}'] += 1
        if conversation.chaos:
            return                  # waits for "left" or an error instead
        if len(conversation.connected) == 2:
            self.start_chat(conversation, now)

    def start_chat(self, conversation, now):
        """Both ends are connected: schedule lines both ways."""
        conversation.phase = 'chatting'
        self.counts['connects done'] += 1
        count = self.args.lines
        conversation.to_send = 2 * count
        for i in range(count):
            for sender, receiver in ((conversation.a, conversation.b),
                                     (conversation.b, conversation.a)):
                when = now + i * 0.3 + self.rng.uniform(0, 0.2)
                self.at(when, self.send_line, conversation, sender, receiver)
        conversation.deadline = now + count * 0.3 + DELIVERY_TIMEOUT

    def send_line(self, conversation, sender, receiver):
        """Type one numbered chat line at sender, meant for receiver."""
        if sender.conversation is not conversation or conversation.phase != 'chatting':
            return
        self.line_serial += 1
        number = self.line_serial
        words = ' '.join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 12)))
        text = f'm{number} {sender.name}>{receiver.name} {words}'
        conversation.to_send -= 1
        if self.type(sender, text):
            self.pending[number] = (sender, receiver, time.monotonic(), conversation)
            self.counts['lines sent'] += 1
        self.check_done(conversation)

    def chat_arrived(self, client, sender_name, text, now):
        """A chat line arrived at client; match it to the one typed."""
        match = RE_LINE_ID.match(text)
        number = int(match.group(1)) if match else None
        if number in self.pending:
            sender, receiver, sent, conversation = self.pending.pop(number)
            if receiver is not client or sender.name != sender_name:
                self.counts['lines misdirected'] += 1
                self.problems.append(f'line {number} from {sender} to {receiver} '
                                     f'arrived at {client} as from {sender_name}')
            self.counts['lines received'] += 1
            self.delivered_ids.add(number)
            self.line_ms.append((now - sent) * 1000)
            self.check_done(conversation)
        elif number in self.delivered_ids:
            self.counts['lines duplicated'] += 1
            self.problems.append(f'line {number} arrived twice (at {client})')
        else:
            self.counts['lines unexpected'] += 1
            self.problems.append(f'{client} printed a line nobody typed: <{sender_name}> '
                                 f'{text[:60]}')

    def check_done(self, conversation):
        """End a chatting conversation once every line is typed and has arrived."""
        if conversation.phase != 'chatting' or conversation.to_send:
            return
        if any(p[3] is conversation for p in self.pending.values()):
            return
        self.end(conversation, 'chatted')

    def left(self, client, name):
        """A client says a peer left."""
        conversation = client.conversation
        if conversation is None or client is not conversation.a:
            return                  # a former partner quitting: expected
        if name != conversation.b.name:
            return
        if conversation.chaos:
            when = 'after' if conversation.connected else 'before'
            self.end(conversation, f'target left mid-connect, {when} "connected"')
        else:
            self.problems.append(f'{conversation.b} left during the conversation with {client}')
            self.end(conversation, 'target left unexpectedly')

    def server_error(self, client, text):
        """An ERROR from the server, shown by a client."""
        self.errors[re.sub(r"'[^']*'", '…', text)] += 1
        conversation = client.conversation
        if conversation and client is conversation.a and conversation.phase == 'connecting':
            if conversation.chaos:
                self.end(conversation, 'target left mid-connect, before the introduction')
            else:
                self.problems.append(f'{client} /connect {conversation.b.name}: {text}')
                self.end(conversation, f'connect refused: {text}')

    def timed_out(self, conversation, now):
        """A conversation ran past its deadline: say what was missing."""
        if conversation.chaos:
            self.problems.append(f'{conversation.a} never heard that {conversation.b.name} '
                                 f'left ({LEAVE_TIMEOUT:.0f} s)')
            self.end(conversation, 'target left mid-connect, initiator never told')
        elif conversation.phase == 'connecting':
            missing = [str(c) for c in (conversation.a, conversation.b)
                       if c not in conversation.connected]
            self.problems.append(f'{conversation.a}->{conversation.b}: no "connected" from '
                                 f'{", ".join(missing)} within {CONNECT_TIMEOUT:.0f} s')
            self.end(conversation, 'connect timed out')
        else:
            self.end(conversation, 'lines lost')

    def partner_gone(self, client):
        """A client in a conversation exited (a crash: gone() has counted it)."""
        conversation = client.conversation
        self.end(conversation, 'a client exited during the conversation')

    def end(self, conversation, outcome):
        """Close a conversation: count lost lines, free the target, retire a."""
        if conversation.phase == 'done':
            return
        conversation.phase = 'done'
        self.counts[f'conversations: {outcome}'] += 1
        for number, pending in list(self.pending.items()):
            if pending[3] is conversation:
                del self.pending[number]
                self.counts['lines lost'] += 1
                self.problems.append(f'line {number} from {pending[0]} to {pending[1]} '
                                     f'never arrived')
        a, b = conversation.a, conversation.b
        if b.conversation is conversation:
            b.conversation = None
            if b.state == 'busy':
                self.set_state(b, 'idle')
        a.conversation = None
        self.quit(a)

    # -- measurements --------------------------------------------------------

    def sample(self, label):
        """One memory sample and progress line."""
        pid = self.server.popen.pid
        rss = proc_status(pid, 'VmRSS')
        fds = count_fds(pid)
        cpu = cpu_seconds(pid)
        listed = self.observer.count() if self.observer else None
        registered = sum(c.state in ('idle', 'busy') for c in self.clients.values())
        row = dict(label=label, rss=rss, fds=fds, cpu=cpu, registered=registered,
                   listed=listed, alive=len(self.clients),
                   started=self.counts['clients started'], connects=self.counts['connects done'],
                   sent=self.counts['lines sent'], received=self.counts['lines received'])
        self.samples.append(row)
        print(f'{label:>8}: server rss {fmt(rss)} kB, {fmt(fds)} fds, cpu {fmt(cpu)} s; '
              f'registered {registered} (server lists {fmt(listed)}), '
              f'{row["alive"]} processes, {row["started"]} started; '
              f'{row["connects"]} connects; lines sent {row["sent"]}, '
              f'received {row["received"]}', flush=True)

    def finish(self):
        """After the drain: last samples, stop the server, print the table."""
        # The server needs a moment to process the last BYEs and closes.
        deadline = time.monotonic() + 5
        while self.observer.count() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.sample('end')
        leaked = self.samples[-1]['listed']
        self.observer.close()
        alive = self.server_alive()
        if alive:
            self.server.popen.send_signal(signal.SIGTERM)
        try:
            code = self.server.wait(15)
        except subprocess.TimeoutExpired:
            code = 'killed: no exit 15 s after SIGTERM'
        self.server.stop()
        tracebacks = sum('Traceback' in line for line in self.server.err.lines)
        if tracebacks or code != 0:
            self.problems.append('server log:\n' + '\n'.join(self.server.err.lines[-30:]))
        if leaked:
            self.problems.append(f'the server still lists {leaked} clients after all quit')
        self.report(alive, code, tracebacks, leaked)
        failed = (self.counts['lines lost'] or self.counts['lines misdirected']
                  or self.counts['client crashes'] or tracebacks or not alive or code != 0)
        return 1 if failed else 0

    def report(self, alive, code, tracebacks, leaked):
        """The final tables."""
        c = self.counts
        elapsed = time.monotonic() - self.started
        print('\nmemory over time (server):')
        headers = ('at', 'VmRSS kB', 'fds', 'cpu s', 'registered', 'server lists',
                   'processes', 'started', 'connects', 'lines sent', 'received')
        keys = ('label', 'rss', 'fds', 'cpu', 'registered', 'listed', 'alive', 'started',
                'connects', 'sent', 'received')
        rows = [[fmt(s[k]) for k in keys] for s in self.samples]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print('  ' + '  '.join(h.rjust(w) for h, w in zip(headers, widths)))
        for row in rows:
            print('  ' + '  '.join(v.rjust(w) for v, w in zip(row, widths)))
        warm = [s['rss'] for s in self.samples[1:-1] if s['rss']]
        growth = (f'{warm[-1] - warm[0]:+d} kB from the first sample after warm-up to the last '
                  f'under load' if len(warm) >= 2 else 'too short a run to say')
        outcomes = sorted((k.split(': ', 1)[1], n) for k, n in c.items()
                          if k.startswith('conversations: '))
        rows = [
            ('machine', f'{os.cpu_count()} cpus, Python {platform.python_version()}, '
                        f'{platform.system()} {platform.release()}'),
            ('command', 'python bench/soak.py ' + ' '.join(
                f'--{k.replace("_", "-")} {v}' for k, v in vars(self.args).items())),
            ('elapsed', f'{elapsed:.0f} s'),
            ('clients started / registered', f'{c["clients started"]} / '
                                             f'{c["clients registered"]}'),
            ('name collisions tried / refused', f'{c["name collisions tried"]} / '
                                                f'{c["name collisions (name taken)"]}'),
            ('register timeouts', c['register timeouts']),
            ('connects typed', c['connects typed']),
            ('connects done (both ends connected)', c['connects done']),
            ('  direct udp / direct tcp / relayed',
             f'{c["connects udp"]} / {c["connects tcp"]} / {c["connects relayed"]}'),
            ('targets told to leave mid-connect', c['targets told to leave mid-connect']),
            ('time to connect p50 / p99 / max', ms(self.connect_ms)),
            ('  as the client reports it (direct)', ms(self.client_ms)),
            ('chat lines sent', c['lines sent']),
            ('chat lines received', c['lines received']),
            ('chat lines lost', c['lines lost']),
            ('chat lines misdirected / duplicated', f'{c["lines misdirected"]} / '
                                                    f'{c["lines duplicated"]}'),
            ('line latency p50 / p99 / max', ms(self.line_ms)),
            ('server memory growth', growth),
            ('server lists after all quit', fmt(leaked)),
            ('client crashes', c['client crashes']),
            ('server alive at the end', 'yes' if alive else 'no'),
            ('server exit status after SIGTERM', code),
            ('tracebacks in the server log', tracebacks),
        ]
        width = max(len(k) for k, _ in rows)
        print()
        for key, value in rows:
            print(f'{key:<{width}}  {value}')
        print('\nconversations, by outcome:')
        for outcome, n in outcomes:
            print(f'  {n:6d}  {outcome}')
        if self.errors:
            print('\nserver errors shown by clients:')
            for text, n in self.errors.most_common(5):
                print(f'  {n:6d}  {text}')
        print('\nother client status lines (top 8):')
        for text, n in self.others.most_common(8):
            print(f'  {n:6d}  {text}')
        if self.problems:
            print(f'\nPROBLEMS ({len(self.problems)}, first 20):')
            for problem in self.problems[:20]:
                print(f'  - {problem}')


class Observer:
    """A registered raw control connection that asks the server for LIST.

    It never sends MAPPING, so it has no public endpoint: the server leaves
    it out of LIST and nobody can connect to it.
    """

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.reader = wire.FrameReader()
        self.send(wire.REGISTER, name=f'observer{os.getpid()}', private=[])
        self.receive()

    def send(self, type, **fields):
        """One control message."""
        self.sock.sendall(encode(type, **fields))

    def receive(self):
        """The next message from the server."""
        while True:
            for frame in self.reader.frames():
                return wire.decode(frame)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError('the server closed the observer connection')
            self.reader.feed(data)

    def count(self):
        """How many clients the server lists; None if it does not answer."""
        try:
            self.send(wire.LIST)
            reply = self.receive()
            return len(reply.names) if reply.type == wire.PEERS else None
        except (OSError, wire.ProtocolError):
            return None

    def close(self):
        """Close the connection."""
        self.sock.close()


def proc_status(pid, field):
    """A kB figure from /proc/PID/status (VmRSS, ...); None if gone."""
    try:
        with open(f'/proc/{pid}/status') as status:
            for line in status:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def count_fds(pid):
    """Open file descriptors of a process; None if gone."""
    try:
        return len(os.listdir(f'/proc/{pid}/fd'))
    except OSError:
        return None


def cpu_seconds(pid):
    """User plus system CPU seconds of a process; None if gone."""
    try:
        with open(f'/proc/{pid}/stat') as stat:
            fields = stat.read().rsplit(')', 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK'), 1)
    except (OSError, IndexError, ValueError):
        return None


def percentile(values, p):
    """The p-th percentile by nearest rank: a value that really happened."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def ms(values):
    """'p50 / p99 / max' in milliseconds, or 'none'."""
    if not values:
        return 'none'
    return (f'{percentile(values, 50):.0f} / {percentile(values, 99):.0f} / '
            f'{max(values):.0f} ms ({len(values)} samples)')


def fmt(value):
    """A table cell: '-' for a missing value."""
    return '-' if value is None else str(value)


def raise_descriptor_limit():
    """Three pipes per client, and 200 clients: lift our soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--minutes', type=float, default=10.0,
                        help='how long to churn clients (default 10)')
    parser.add_argument('--clients', type=int, default=200,
                        help='client processes kept alive (default 200)')
    parser.add_argument('--seed', type=int, default=1, help='random seed (default 1)')
    parser.add_argument('--spawn-rate', type=float, default=4.0,
                        help='client starts a second at most (default 4)')
    parser.add_argument('--lines', type=int, default=3,
                        help='chat lines each way per conversation (default 3)')
    parser.add_argument('--leave-rate', type=float, default=0.03,
                        help='share of conversations whose target quits mid-connect '
                             '(default 0.03)')
    parser.add_argument('--collide-rate', type=float, default=0.02,
                        help='share of new clients that take a live name (default 0.02)')
    args = parser.parse_args(argv)
    if args.clients < 2 or args.spawn_rate <= 0 or args.minutes <= 0:
        parser.error('need at least 2 clients, a positive spawn rate and duration')
    return args


def main(argv=None):
    """Run the soak; exit 1 on a lost line or a crash."""
    args = parse_args(argv)
    raise_descriptor_limit()
    soak = Soak(args)
    try:
        return soak.run()
    finally:
        for client in list(soak.clients.values()):
            if client.popen.poll() is None:
                client.popen.kill()
        if soak.server and soak.server.popen.poll() is None:
            soak.server.stop()


if __name__ == '__main__':
    sys.exit(main())
