"""The client's console: what the user types, commands and chat (Listing 3's part).

The article's client reads stdin in its one loop beside its sockets.  A
line is a command (``/connect bob``) or a chat line for the peer chosen
last.  Commands are ``do_<name>(arg)`` methods, as in the ``cmd`` module:
the first line of each docstring is its line in /help, and an addition
adds a command by defining one.  ``Console`` is the half of the client's
``Peer`` (p2pclient.py) that serves the user.
"""

import os
import time

import p2pcommon as wire

MAX_LINE = 64 * 1024        # an endless stdin line is cut here


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


def help_entry(action):
    """A command's entry in /help: its docstring's first paragraph, if it starts with '/'.

    (An addition that only extends a command says so in a docstring of
    its own, which is not a help entry.)
    """
    first, *more = (action.__doc__ or '').split('\n\n')[0].split('\n')
    if not first.startswith('/'):
        return None
    return '\n'.join(['  ' + first] + [' ' * 18 + line.strip() for line in more if line.strip()])


class Console:
    """The user's side of the client: stdin, commands, chat to the chosen peer."""

    def say(self, text):
        """Print a status line; they all start with '* '."""
        self.out.write(f'* {text}\n')
        self.out.flush()

    def show_chat(self, name, text):
        """Print a peer's chat line, made safe for the terminal."""
        self.out.write(f'<{name}> {wire.safe(text)}\n')
        self.out.flush()

    def our_public(self):
        """Hook: our public endpoint as the registration line says it: 'IP:PORT (how we know)'."""
        return f'{wire.format_endpoint(self.mapping.public)} ({self.mapping.describe()})'

    def read_stdin(self, fd, mask):
        """Act on each complete line the user typed, in order; note the end of input."""
        lines, ended = self.stdin.read()
        for line in lines:
            if self.running:
                self.command(line)
        if ended and self.running:
            self.input_ended()

    def input_ended(self):
        """Hook: end of input (Ctrl-D) is /quit."""
        self.do_quit('')

    def command(self, line):
        """Act on one line: a /command, or chat to the chosen peer ('//text' says '/text')."""
        if not line.startswith('/') or line.startswith('//'):
            self.chat(line[1:] if line.startswith('//') else line)
            return
        word, arg = (line.split(maxsplit=1) + [''])[:2]
        action = getattr(self, 'do_' + word[1:], None)
        if action is None:
            self.say(f'unknown command {wire.safe(line)!r}; /help lists the commands')
            return
        usage = self.usage('do_' + word[1:])
        if not arg and len(usage.split()) > 1 and '[' not in usage:     # '/connect PEER'
            self.say(f'usage: {usage}')
        else:
            action(arg.strip())

    def usage(self, name):
        """How to give a command, '/connect PEER': its help entry's first words."""
        for cls in type(self).__mro__:
            action = vars(cls).get(name)
            if action is not None and help_entry(action):
                return action.__doc__.split('  ')[0]
        return ''

    def do_connect(self, name):
        """/connect PEER   ask PEER to connect (or say yes to PEER's request), then punch

        Point 4.  To the server this is a request to name, or, when name
        asked us first, our consent: both having asked, it introduces us.
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
        self.asked[name] = time.monotonic()
        doing = f'saying yes to {name}' if asker else \
            f'asking the rendezvous server to introduce {name}'
        self.say(f'{doing}; what you type goes to {name}')
        return link

    def do_reject(self, name):
        """/reject PEER    say no to PEER's request to connect"""
        link, _ = self.asks.pop(name, (None, None))
        if link is None:
            self.say(f'{wire.safe(name)} has not asked to connect')
            return
        link.send(wire.DECLINE, name=name, why=wire.DECLINED)
        self.say(f'declined {name}')

    def do_to(self, name):
        """/to PEER        send what you type to PEER, one of the peers you are connected to"""
        self.choose(name)

    def choose(self, name, quiet=False):
        """Typed lines go to name from now on, and nowhere else."""
        if not quiet and self.session_named(name) is None:
            self.say(f'not connected to {wire.safe(name)}: /connect {wire.safe(name)} first')
            return
        self.chosen = name
        if not quiet:
            self.say(f'what you type goes to {name}')

    def do_list(self, arg):
        """/list           the names registered with the server"""
        link = self.registered_link()
        if link is None:
            self.say('not registered with any rendezvous server yet; still trying')
        else:
            link.send(wire.LIST)
        return link

    def do_quit(self, arg):
        """/quit           say goodbye and exit (so does end of input)"""
        for session in self.sessions.values():
            session.send(wire.GOODBYE)
        for link in self.links:
            link.send(wire.BYE)
        self.running = False

    def do_help(self, arg):
        """/help           this text"""
        lines = ['commands:']
        for cls in reversed(type(self).__mro__):    # ours first, then each addition's
            for name, action in vars(cls).items():
                entry = help_entry(action) if name.startswith('do_') else None
                if entry and name == action.__name__ and entry not in lines:
                    lines.append(entry)
        self.out.write('\n'.join(lines) + '\nanything else is a chat message to the peer you '
                       'chose last with /connect or /to; //text says /text\n')
        self.out.flush()

    def chat(self, line):
        """Send a chat line to the chosen peer, in pieces that fit a datagram."""
        if not line:
            return
        if self.chosen is None:
            self.say('not connected: /connect PEER first')
            return
        pieces = split_utf8(line, wire.MAX_TEXT)
        session = self.session_named(self.chosen)
        if session is None:
            self.not_connected(pieces)
            return
        now = time.monotonic()
        for piece in pieces:
            session.channel.send(piece, now)

    def not_connected(self, pieces):
        """Hook: lines typed for the chosen peer before its session: not sent."""
        others = ''.join(f', or /to {s.name}' for s in self.sessions.values())
        self.say(f'not connected to {self.chosen}: /connect {self.chosen} first{others}')

    def session_named(self, name):
        """The newest session with the peer called name, or None."""
        for session in reversed(self.sessions.values()):
            if session.name == name:
                return session
        return None

    def registered_link(self):
        """The first server we are registered with, or None."""
        return next((link for link in self.links if link.token is not None), None)
