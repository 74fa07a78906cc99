"""The peer's NAT gives it a new mapping: follow it, but never a replay.

The article's punch locks onto one endpoint.  A home router may map the
peer's traffic to a new port mid-session (a reboot, a mapping that timed
out, a conntrack clash), and the peer's messages then come from there.
We follow: a message newer than any before, proven by its MAC, moves the
path.  An old one from a new place is a replay by someone who saw it
(or a late punch), and moves nothing.
"""

import p2pcommon as wire


class RoamingMixIn:
    """Move a session's path to where the peer's newer messages come from."""

    def session_message(self, session, message, source):
        """A proven message from elsewhere than the locked endpoint moves it if newer."""
        newer = session.key.newer(message)      # notes the newest of every path
        if source is not None and session.endpoint is not None and \
                not wire.same_endpoint(source, session.endpoint):
            if not newer or message.flags & wire.FLAG_PUNCHING or \
                    message.type == wire.PUNCH_ACK:
                return      # an old copy replayed from elsewhere, or a late punch
            session.punch.locked = source
            self.say(f'{session.name} now reaches us from {wire.format_endpoint(source)}')
        super().session_message(session, message, source)
