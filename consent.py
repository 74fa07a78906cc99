"""Consent: asks that run out, are capped, and can be declined (the server's side).

Why this exists: on a public server anyone who knows a name can ask for
its owner, and an introduction sends each peer the other's addresses, at
which it then punches.  The article's mediator "asks the target to send a
request" (point 4), and rendezvous.py does that: a CONNECT records an ask,
the target gets an ASK that names the asker and nothing else, and only the
target's own CONNECT back makes the introduction.  What the article does
not say is what happens when the target does not want to, or is not
there: here a DECLINE ends the ask, and so does no answer within
--ask-timeout; either way the asker hears so.  One target has at most
--max-asks waiting, or anyone could bury a user's screen in requests.  The
client's side is p2pclient.Client.asked_by and .refused.

Plugged into the server as a mix-in, composed in rendezvous.py:

    class Server(..., ConsentMixIn, NameOwnersMixIn, Rendezvous): ...
"""

import logging
import time

import p2pcommon as wire

log = logging.getLogger('rendezvous')


class ConsentMixIn:
    """The server's asks (Rendezvous.asks) run out, are capped per target, can be declined."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Every ask lives equally long, so insertion order is expiry order:
        # the timer looks at the head only.  An ask answered meanwhile stays
        # here until its time, and is skipped then.
        self.deadlines = {}         # (asker, target) -> when the ask runs out

    def handle(self, peer, message):
        """DECLINE, consent's own message, from a registered peer; the rest as the server's."""
        if message.type == wire.DECLINE and peer.name is not None:
            log.debug('< DECLINE from %s (tcp)', peer)
            self.decline(peer, message.name)
        else:
            super().handle(peer, message)

    def ask(self, peer, target):
        """Ask the target, unless it has --max-asks waiting; the ask runs out in time."""
        if len(self.asks.get(target, ())) >= self.limits.max_asks:
            self.send_error(peer, wire.E_TOO_MANY,
                            f'{target} has {self.limits.max_asks} requests waiting; '
                            f'try again later', 'too many asks')
            return
        super().ask(peer, target)
        self.deadlines.pop((peer, target), None)        # asked again: to the end
        self.deadlines[peer, target] = time.monotonic() + self.limits.ask_timeout

    def decline(self, peer, asker_name):
        """The target says no: the asker hears so, and nothing else about it."""
        asker = self.find(asker_name)
        if asker is None or not self.withdraw(asker, peer):
            self.send_error(peer, wire.E_UNKNOWN_PEER, f'no request from {asker_name!r}',
                            'decline without ask')
            return
        self.send(asker, wire.DECLINE, name=peer.name, why=wire.DECLINED)
        log.info('%s declined %s', peer, asker)

    def check_timers(self, now):
        """Asks that ran out end: each asker hears that the target did not answer."""
        super().check_timers(now)
        while self.deadlines:
            (asker, target), deadline = next(iter(self.deadlines.items()))
            if deadline > now:
                break
            del self.deadlines[asker, target]
            if self.withdraw(asker, target):
                self.send(asker, wire.DECLINE, name=target.name, why=wire.NO_ANSWER)

    def forget(self, peer):
        """A target that leaves answers no one: its askers hear so at once."""
        for asker in list(self.asks.get(peer, ())):
            self.send(asker, wire.DECLINE, name=peer.name, why=wire.NO_ANSWER)
        super().forget(peer)
