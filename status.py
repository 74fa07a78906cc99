"""``/status``: where the user stands, in a few lines.

A new user behind two routers wants to know what happened: is the server
there, is bob connected, directly or through the relay, and to whom does
what I type go?
"""

import time

import p2pcommon as wire


class StatusMixIn:
    """/status (or /peers): our endpoint, each server, each peer and its path."""

    def do_status(self, arg):
        """/status         where you stand: servers, peers, paths, who you type to"""
        if self.mapping is not None:
            self.say(f'you are {self.name}, public endpoint '
                     f'{wire.format_endpoint(self.mapping.public)} ({self.mapping.describe()})')
        for link in self.links:
            self.say(f'server {link}: {link.state(time.monotonic())}')
        for session in self.sessions.values():
            rtt = session.channel.srtt
            rtt = f', round trip {rtt * 1000:.0f} ms' if rtt is not None else ''
            typing = ' <- what you type goes here' if session.name == self.chosen else ''
            self.say(f'{session.name}: {session.path}{rtt}{typing}')
        if self.chosen is not None and self.session_named(self.chosen) is None:
            self.say(f'what you type goes to {self.chosen}, not connected yet')
        for name in self.asks:
            self.say(f'{name} asks to connect: /connect {name} or /reject {name}')
        if not self.sessions and not self.asks:
            self.say('no peers yet: /connect PEER')

    do_peers = do_status
