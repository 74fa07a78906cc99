"""Run the real rendezvous server and clients inside a NAT lab.

The server runs on the lab's public host, one client on each side; every
step waits for the line the user would see.
"""

import functools

from procs import command, start

SERVER_PORT = 7777
# birthday.py's search with bounds that never miss, for tests that must
# not flake: 900 sockets and 400 probes a second for 6 s leave a symmetric
# NAT's port unmet with probability exp(-900 * 2400 / 64,512), 1 in 10^14.
# (The defaults, 512 sockets and 600 probes, miss 1 time in 100:
# bench/birthday.py measures them.)  900 sockets fit in the 1,024
# descriptors a process may open by default.
SURE_BIRTHDAY = ('--birthday-sockets', '900', '--birthday-rate', '400')
CONNECTED = (r'^\* connected to {} '
             r'(?:at (\S+) \((direct(?:, tcp)?), (\d+) ms\)|\((relayed) through)')
# After 'relayed': a direct path after all, or punching gave up (UDP; TCP with --tcp-only).
SETTLED = (r'^\* (?:connected to {peer} at (\S+) \((direct(?:, tcp)?), (\d+) ms\)'
           r'|no direct path to {peer}: chat stays on the relay$|no TCP path to {peer}$)')


class LabRun:
    """A rendezvous server in a lab, and the clients started in it."""

    def __init__(self, lab, *server_args):
        self.lab = lab
        self.procs = []
        self.server = self.start('server', command('rendezvous.py', '--port', SERVER_PORT,
                                                   *server_args), 'rendezvous')
        self.server.expect_log(r'listening on')

    def start(self, node, argv, label):
        """Start a program in node's namespace, with pipes for its terminal."""
        proc = start(argv, label, functools.partial(self.lab.popen, node))
        self.procs.append(proc)
        return proc

    def client(self, node, name, *args, server=None, transport='--udp-only'):
        """Start p2pclient.py NAME on node; wait until it has registered.

        UDP only unless told otherwise: most lab tests are about UDP hole
        punching through the NAT types, which the TCP attempt would only delay.
        """
        server = server or f'{self.lab.SERVER_ADDRS[0]}:{SERVER_PORT}'
        options = [transport] if transport else []
        proc = self.start(node, command('p2pclient.py', name, '--server', server, *options,
                                        *args), name)
        proc.expect(rf'^\* registered as {name} ', timeout=30)     # TCP under loss is slow
        return proc

    def stop(self):
        """Stop every program; return what any of them wrote to stderr."""
        errors = []
        for proc in self.procs:
            proc.stop()
            # Servers log to stderr, and so do clients that narrate (-v); others must not.
            logs = 'rendezvous' in proc.label or '-v' in proc.popen.args
            if any('Traceback' in line for line in proc.err.lines) or \
                    (proc.err.lines and not logs):
                errors.append(proc.transcript())
        return errors

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        errors = self.stop()
        if exc[0] is None:
            assert not errors, '\n'.join(errors)


def connect(alice, bob, timeout=20):
    """alice asks bob, bob says yes; return how each side says it is connected.

    Each is ('direct', endpoint, ms) or ('relayed', None, None).
    """
    alice.send(f'/connect {bob.label}')
    consent(alice, bob, timeout)
    return how(alice, bob.label, timeout), how(bob, alice.label, timeout)


def consent(alice, bob, timeout=20):
    """bob is asked about alice's /connect and says yes."""
    bob.expect(rf'^\* {alice.label} asks to connect', timeout)
    bob.send(f'/connect {alice.label}')


def how(proc, peer, timeout=20):
    """Wait for the path that the session with peer settles on; return (mode, endpoint, ms).

    mode is 'direct' (UDP), 'direct, tcp' or 'relayed'.  A session starts
    on the relay when no punch has proven a path within half a second
    (upgrade.py): it is 'relayed' only once punching gave up, and direct
    if a punch proves a path later.
    """
    match = proc.expect(CONNECTED.format(peer), timeout)
    if match.group(2):
        return match.group(2), match.group(1), int(match.group(3))
    match = proc.expect(SETTLED.format(peer=peer), timeout)
    if match.group(2):
        return match.group(2), match.group(1), int(match.group(3))
    return 'relayed', None, None


def on_tcp(proc, peer, first=None, timeout=20):
    """Wait until the session with peer is on a punched TCP connection; return where.

    UDP and TCP are raced: a status line says so when TCP takes over, or
    the first one (``first``, as ``how`` returned it) was TCP already.
    """
    if first is not None and first[0] == 'direct, tcp':
        return first[1]
    return proc.seen(rf'^\* connected to {peer} at (\S+) \(direct, tcp, \d+ ms\)$',
                     timeout).group(1)


def chat_both_ways(alice, bob, text='hello', timeout=20):
    """One line each way; both must arrive."""
    alice.send(f'{text} from alice')
    bob.expect(rf'^<alice> {text} from alice$', timeout)
    bob.send(f'{text} from bob')
    alice.expect(rf'^<bob> {text} from bob$', timeout)
