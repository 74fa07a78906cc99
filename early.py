"""Nothing typed is lost while the path is made, nor sent to the wrong peer.

The article's client chats once the punch has locked.  Users type at once:
after ``/connect bob`` the next line is for bob, before the server has
even asked him.  Such lines are held until bob's session exists, then go
out with the punches (early data: see Session.send), so the first line
needs no round trip of its own; if the request ends without a session,
each held line is reported, never dropped without a word.  A PUNCH that
arrives before our own INTRODUCE (the peer heard first) is kept until it
does, and a session that a new introduction replaces hands its lines on.
"""

import p2pcommon as wire

MAX_EARLY_PUNCHES = 16      # PUNCHes kept for sessions we have not been introduced to yet


class EarlyLinesMixIn:
    """Hold lines for the chosen peer, early punches, and a replaced session's lines."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held = []              # lines typed for the chosen peer before its session
        self.early_punches = []     # (message, source) before their INTRODUCE
        self.carried = []           # the unacknowledged lines of a replaced session

    def not_connected(self, pieces):
        """Hold the lines for a peer we asked for; they go once it is introduced."""
        if self.chosen in self.asked:
            self.held += pieces
        else:
            super().not_connected(pieces)

    def choose(self, name, quiet=False):
        """Lines held for another peer will not go there now."""
        if name != self.chosen:
            self.drop_held()
        super().choose(name, quiet)

    def request_ended(self, name):
        """No introduction: the lines held for name cannot go."""
        super().request_ended(name)
        if name == self.chosen and self.session_named(name) is None:
            self.drop_held()

    def drop_held(self):
        """The lines held for the chosen peer will not go: say what is lost."""
        for piece in self.held:
            self.say(f'not delivered to {self.chosen}: {wire.safe(piece)}')
        self.held = []

    def replace_session(self, old):
        """The old session's unacknowledged lines go on the new one.

        The user typed them for this peer, and a new /connect usually means
        the old path is dead.  (One that did arrive, its ACK lost, shows twice.)
        """
        self.carried = old.channel.take_unacknowledged()
        super().replace_session(old)

    def session_started(self, session, now):
        """Answer the punches that came first; send what was carried and held."""
        super().session_started(session, now)
        early, self.early_punches = self.early_punches, []
        for message, source in early:
            self.peer_message(message, source)
        lines, self.carried = self.carried, []
        if session.name == self.chosen:
            lines += self.held      # typed after those, while no session was up
            self.held = []
        for piece in lines:
            session.channel.send(piece, now)

    def peer_message(self, message, source):
        """Keep a PUNCH for a session we do not know yet: its INTRODUCE may be on the way."""
        if message.session not in self.sessions:
            if message.type == wire.PUNCH and len(self.early_punches) < MAX_EARLY_PUNCHES:
                self.early_punches.append((message, source))
            return
        super().peer_message(message, source)
