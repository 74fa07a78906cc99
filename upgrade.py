"""Start on the relay, and move to a direct path once one is proven.

The article relays only when punching has failed (point 11), so a user
behind two hostile NATs waits out the whole punch before a line goes
anywhere.  Tailscale starts every connection on its relay (DERP) and moves
to a direct path when one works.  So do we: a session with no direct path
RELAY_AFTER seconds after its introduction sends through the relay while
punching goes on.  A proof later moves it (one status line for each
move), and the reliable layer sends what is unacknowledged once more on
the new path, so nothing is lost, and the peer shows nothing twice.
"""

# Where punching works, a proof comes within about one round trip between
# the peers after the introduction (the first PUNCH each way is dropped,
# the next, 100 ms later, passes): 0.5 s covers peers 250 ms apart, and
# the first line still arrives within a second of /connect.
RELAY_AFTER = 0.5


class UpgradeMixIn:
    """Relay while punching, RELAY_AFTER seconds into an introduction without a path."""

    def check_session(self, session, now):
        """Past RELAY_AFTER with no direct path and the punches still going: relay."""
        super().check_session(session, now)
        waiting = session.punching or session.trying_tcp
        if waiting and not (session.relayed or session.direct or session.relay_gone) and \
                now - session.punch.started >= RELAY_AFTER and \
                self.sessions.get(session.key.id) is session:
            self.relay(session, now)
