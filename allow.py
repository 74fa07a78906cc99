"""``--allow NAME``: say yes to NAME's requests to connect without asking.

Consent (article point 4: the mediator asks the target) costs a person at
the other end; scripts, demos and a peer one always talks to need none.
``--allow '*'`` says yes to anyone.
"""

import p2pcommon as wire


class AllowMixIn:
    """Answer the asks of the peers allowed with our own CONNECT, at once."""

    def __init__(self, *args, allow=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.allow = set(allow)     # peers whose requests we accept unasked; '*': anyone

    def asked_by(self, link, name):
        """An allowed peer is accepted, and the user only told."""
        if name in self.allow or '*' in self.allow:
            self.say(f'{name} asks to connect; accepted (--allow)')
            link.send(wire.CONNECT, target=name)
            return
        super().asked_by(link, name)
