"""Is a peer whose control connection closed still there?  (Article point 7.)

After the punch the server is out of the data path, so a direct session
outlives either peer's control connection.  When the server says (an
empty RELAY) that the peer's connection closed, the peer may be gone
(killed, off the network) or only its TCP mapping: a KEEPALIVE a second,
each bounced by a live peer, tells which within DOUBT_WAIT.
"""

import time

import identity
import p2pcommon as wire

DOUBT_WAIT = 3.0


class PresenceMixIn:
    """Ask a direct peer that left the server whether it is still there."""

    def control_relay(self, link, message):
        """An empty RELAY is the server's word that the peer's control connection closed."""
        session = self.sessions.get(identity.session_id(message.session))
        if session is None or message.message:
            super().control_relay(link, message)
            return
        session.relay_gone = True
        if session.endpoint is not None:    # direct over UDP: is the peer still there?
            session.doubted = time.monotonic()
            session.send(wire.KEEPALIVE)
        if session.relayed:
            self.say(f'{session.name} lost the rendezvous server, and with it the '
                     f'relay; /connect {session.name} to reach them again')
            self.end_session(session, 'the relay went away')

    def relay(self, session, now):
        """A peer we can neither punch nor relay to (the server said so) is gone."""
        if not session.relay_gone:
            super().relay(session, now)
            return
        self.say(f'lost {session.name}: no direct path, and the server no longer '
                 f'relays to them')
        self.end_session(session, f'{session.name} is gone')

    def keep_open(self, session, now):
        """While in doubt, ask once a second instead of the keepalive's pace."""
        if session.doubted is None:
            super().keep_open(session, now)
        elif session.keepalive.last_heard > session.doubted:
            session.doubted = None              # it answered: only its server link died
        elif now - session.doubted > DOUBT_WAIT:
            self.say(f'lost {session.name}: it left the server and stopped answering')
            self.end_session(session, f'{session.name} is gone')
        elif now - session.keepalive.last_sent >= 1.0:
            session.send(wire.KEEPALIVE)
