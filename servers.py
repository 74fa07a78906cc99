"""Several rendezvous servers (the article's future work: "for failover").

``--server`` given several times registers with every one of them.  One
that cannot be reached at start-up is retried in the loop (control.py),
and a server that does not know the peer we ask for passes the request
on to the next: the peer may be registered only there.
"""

import time

import p2pcommon as wire
from control import Fatal

# The ERRORs that answer a CONNECT instead of an INTRODUCE or an ASK.
CONNECT_REFUSALS = frozenset({wire.E_UNKNOWN_PEER, wire.E_NOT_REGISTERED, wire.E_RATE_LIMITED,
                              wire.E_TOO_MANY})


class SeveralServersMixIn:
    """Register with each server; ask the next one for a peer the first does not know."""

    def register(self):
        """Register with every server we can reach now; the others are retried."""
        reached = []
        for link in self.links:
            try:
                link.open()
            except OSError as error:
                why = f'cannot reach the rendezvous server at {link}: {error.strerror or error}'
                if len(self.links) == 1:
                    raise Fatal(why) from None
                self.say(f'{why}; will keep trying')
                link.retry_at = time.monotonic() + link.backoff
                continue
            link.wait_registered()
            reached.append(link)
        if not reached:
            raise Fatal('no rendezvous server reached')
        return reached

    def do_connect(self, name):
        """Note which server we asked: its ERROR may be the answer."""
        link = super().do_connect(name)
        if link is not None:
            link.connects.append(name)
        return link

    def control_ask(self, link, message):
        """The server asked the peer for us: the next answer is another's."""
        self.answered(link, message)
        super().control_ask(link, message)

    def control_introduce(self, link, message):
        """The answer to our request, or to the peer's."""
        self.answered(link, message)
        super().control_introduce(link, message)

    @staticmethod
    def answered(link, message):
        """The server answered our CONNECT to message.name."""
        if message.name in link.connects and (message.type == wire.INTRODUCE or
                                              message.flags & wire.FLAG_REPLY):
            link.connects.remove(message.name)

    def control_error(self, link, message):
        """A refused CONNECT: ask the next server for an unknown peer, else it is over.

        The server answers requests in order, so a refusal is for the
        oldest CONNECT it has not answered yet.
        """
        refused = None
        if link.token is not None and message.code in CONNECT_REFUSALS and link.connects:
            refused = link.connects.popleft()
            if message.code == wire.E_UNKNOWN_PEER and self.ask_next_server(link, refused):
                return
        super().control_error(link, message)
        if refused is not None and self.session_named(refused) is None:
            self.request_ended(refused)

    def relay_lost(self, link):
        """With no server left, none holds our requests to connect: none will be introduced.

        A server forgets a peer's requests with its control connection,
        and registering again does not renew them; so the lines held for
        the chosen peer are reported now, not kept for ever.
        """
        super().relay_lost(link)
        if self.registered_link() is None:
            for name in list(self.asked):
                self.say(f'the request to connect to {name} went with the server; '
                         f'/connect {name} again once registered')
                self.request_ended(name)

    def ask_next_server(self, link, name):
        """Ask the servers after link to introduce name; False if none is left."""
        for other in self.links[self.links.index(link) + 1:]:
            if other.token is not None:
                other.send(wire.CONNECT, target=name)
                other.connects.append(name)
                return True
        return False
