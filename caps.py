"""Bounds on what a server or a peer can make the client hold.

The article trusts its server and its peers.  On the open internet one
hostile server could introduce us to thousands of peers, or flood us with
asks, and each costs sockets, memory and screen lines: the client keeps
at most so many of each, and says so.
"""

import time

import identity

MAX_SESSIONS = 32           # peers at once: each costs sockets, and a server could flood us
MAX_ASKS = 16               # requests to connect shown and waiting for an answer
ASKS_KEPT = 60.0            # seconds we keep one (the server's default --ask-timeout)


class CapsMixIn:
    """At most MAX_SESSIONS sessions and MAX_ASKS asks; a session's numbers end it."""

    def asked_by(self, link, name):
        """Forget asks older than ASKS_KEPT; a flood beyond MAX_ASKS is not shown."""
        now = time.monotonic()
        self.asks = {n: ask for n, ask in self.asks.items() if now - ask[1] < ASKS_KEPT}
        if name not in self.asks and len(self.asks) >= MAX_ASKS:
            return      # the server caps asks too
        super().asked_by(link, name)

    def may_introduce(self, link, message):
        """No role but 0 and 1, no session beyond MAX_SESSIONS, none with another's token."""
        if message.role not in (0, 1):      # the MAC key is made from it (identity.py)
            self.say(f'{link} introduced {message.name} with role {message.role}, '
                     f'neither 0 nor 1: ignored')
            self.request_ended(message.name)
            return False
        if len(self.sessions) >= MAX_SESSIONS and self.session_named(message.name) is None:
            self.say(f'introduced to {message.name}, but {MAX_SESSIONS} sessions are open: '
                     f'ignored')
            self.request_ended(message.name)
            return False
        clash = self.sessions.get(identity.session_id(message.session))
        if clash is not None and clash.name != message.name:
            # Another peer's token: taking it would orphan that session, sockets and all.
            self.say(f'{link} introduced {message.name} with the session of {clash.name}: '
                     f'ignored')
            return False
        return super().may_introduce(link, message)

    def check_session(self, session, now):
        """A session whose 4 billion message numbers are used up ends with a word."""
        if session.channel.exhausted:
            self.say(f'the session with {session.name} used up its 4 billion message numbers; '
                     f'/connect {session.name} for a new one')
            self.end_session(session, 'the session ended')
            return
        super().check_session(session, now)
