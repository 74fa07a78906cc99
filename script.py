"""Stdin that is a script, and a terminal's limit on one line.

People feed the client scripts (``p2pclient.py alice < commands.txt``, or a
pipe), and those end: ``ScriptMixIn`` makes the end of input a /quit that
waits until what the input asked for is done, instead of one that drops
the last line typed, or the answer to the last /list.
"""

import time

import p2pcommon as wire

# A terminal in its usual (canonical) mode hands us at most 4,095 bytes of
# one line (Linux's N_TTY_BUF_SIZE less the newline) and drops the rest of
# it, before we see any of it: all we can do is say so.
TERMINAL_LINE = 4095
# After the end of input the client quits once what the input asked for is
# done (ScriptMixIn.finished), or after this long: an unanswered request to
# connect takes the server's --ask-timeout (60 s), then punching (3 s TCP,
# 5 s UDP) and the chat's resends (30 s) may follow.
END_WAIT = 120.0


class ScriptMixIn:
    """The client's stdin as a script: end of input quits once the script is done.

    A script's last lines are often '/connect bob' and a line for bob, or
    '/list': quitting at once would send the line to nobody, or leave
    before the answer.  So the loop quits when finished() says that
    nothing the input asked for is still under way.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ending = None          # when the input ended: quit once what it asked is done
        self.listing = 0            # /list requests the server has not answered yet

    def command(self, line):
        """Say so when a terminal has cut the line (see TERMINAL_LINE)."""
        if self.stdin is not None and self.stdin.terminal and \
                len(line.encode('utf-8')) >= TERMINAL_LINE:
            self.say(f'your terminal cut that line at {TERMINAL_LINE:,} bytes, its limit; '
                     f'the rest was not sent (send long text in pieces, or as a file)')
        super().command(line)

    def input_ended(self):
        """End of input (Ctrl-D, the end of a file or pipe) is /quit, once the input is done."""
        if self.stdin.fd in self.selector.get_map():
            self.selector.unregister(self.stdin.fd)     # at its end a pipe is always readable
        self.stdin.polled = False
        self.ending = time.monotonic()
        if not self.finished(self.ending):
            self.say('end of input: quitting once what it asked for is done (Ctrl-C: now)')

    def check_timers(self, now):
        """After the end of input, quit when finished."""
        super().check_timers(now)
        if self.ending is not None and self.running and self.finished(now):
            self.do_quit('')

    def finished(self, now):
        """True when what the input asked for is done, or END_WAIT has passed.

        Done: every /list answered, every /connect introduced or refused
        (lines held for a peer wait on its /connect), no session still
        punching, every chat line acknowledged (or given up) and every
        file we send ended (busy).
        """
        if now - self.ending > END_WAIT:
            self.say(f'end of input {END_WAIT:.0f} s ago, and still not done: quitting')
            return True
        if self.listing or self.asked or self.busy():
            return False
        return all(session.channel.idle for session in self.sessions.values())

    def do_list(self, arg):
        """/list           the names registered with the server"""
        link = super().do_list(arg)
        if link is not None:
            self.listing += 1
        return link

    def control_peers(self, link, message):
        """A /list answered."""
        self.listing = max(0, self.listing - 1)
        super().control_peers(link, message)

    def control_error(self, link, message):
        """A /list refused for its rate is answered too (when no CONNECT waits for one)."""
        if message.code == wire.E_RATE_LIMITED and not link.connects:
            self.listing = max(0, self.listing - 1)
        super().control_error(link, message)
