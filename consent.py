"""Consent: a request to connect waits for the target's yes (the server's side).

Why this exists: on a public server anyone who knows a name can ask for
its owner, and an introduction sends each peer the other's addresses, at
which it then punches.  The article's mediator "asks the target to send a
request" (point 4); so here a CONNECT only records an ask, the server
sends the target an ASK that names the asker and nothing else, and only
the target's own CONNECT back makes the introduction.  A DECLINE, or no
answer within the timeout, ends it.  The client's side is
p2pclient.Client.asked_by and .refused.
"""

import collections


class Asks:
    """Requests to connect that wait for the target's consent (point 4).

    The article's mediator "asks the target to send a request" of its own:
    a CONNECT records an ask, and only the target's CONNECT back makes the
    introduction.  Each ask runs out after ``timeout`` seconds, and one
    target has at most ``per_target`` waiting, or anyone could bury a
    user's screen in requests.
    """

    def __init__(self, timeout, per_target):
        self.timeout = timeout
        self.per_target = per_target
        # Every ask lives equally long, so insertion order is expiry order:
        # the timer looks at the head only.
        self.pending = {}           # (asker, target) -> when it runs out
        self.to = collections.defaultdict(set)      # target -> its askers
        self.by = collections.defaultdict(set)      # asker -> whom it asked

    def __contains__(self, pair):
        return pair in self.pending

    def full(self, target):
        """True when target has as many asks waiting as it may have."""
        return len(self.to.get(target, ())) >= self.per_target

    def add(self, asker, target, now):
        """Note that asker waits for target's answer."""
        self.pending[asker, target] = now + self.timeout
        self.to[target].add(asker)
        self.by[asker].add(target)

    def take(self, asker, target):
        """Remove one ask; True if it was waiting."""
        if self.pending.pop((asker, target), None) is None:
            return False
        for index, key, value in ((self.to, target, asker), (self.by, asker, target)):
            index[key].discard(value)
            if not index[key]:
                del index[key]
        return True

    def expired(self, now):
        """Remove and return the asks that ran out, as (asker, target) pairs."""
        done = []
        for pair, deadline in self.pending.items():
            if deadline > now:
                break
            done.append(pair)
        for pair in done:
            self.take(*pair)
        return done

    def forget(self, peer):
        """Remove every ask to or from a peer that leaves; return those *to* it."""
        to_it = [(asker, peer) for asker in self.to.get(peer, ())]
        for pair in to_it + [(peer, target) for target in self.by.get(peer, ())]:
            self.take(*pair)
        return to_it
