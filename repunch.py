"""Both sides punch again when the direct path dies (article point 9).

The article keeps the hole open with keepalives, "or punch again".  One
side alone punching again opens only its own NAT: the peer's NAT still
drops what we send.  So the side that notices the dead path also asks the
peer, through the server's relay (the one path still there), to punch
too: a PUNCH sealed for the session inside a RELAY.
"""

import time

import p2pcommon as wire
import punch

REPUNCH_EVERY = 5.0         # seconds between punch rounds a peer may ask of us over the relay


class RePunchMixIn:
    """Ask the peer to punch again over the relay; do so when it asks."""

    def punch_again(self, session, now):
        """Punch again, and ask the peer to, via the relay."""
        super().punch_again(session, now)
        session.link.send(wire.RELAY, session=session.token,
                          message=session.key.seal(wire.PUNCH, nonce=punch.NO_NONCE))

    def session_message(self, session, message, source):
        """A PUNCH that came another way than UDP is the peer's request to punch again.

        It costs the peer a few bytes and us a punch round: one per
        REPUNCH_EVERY seconds at the most.
        """
        if source is not None or message.type != wire.PUNCH:
            super().session_message(session, message, source)
            return
        now = time.monotonic()
        if session.punching or now - session.started < REPUNCH_EVERY:
            return
        self.say(f'{session.name} lost the direct path; punching again')
        session.started = now
        session.start_punch(now)
