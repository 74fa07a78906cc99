#!/usr/bin/env python3
"""Drive portmap.PortMapper inside a lab host: JSON requests on stdin, one answer each.

tests/test_portmap.py runs this in a host's namespace (lab.popen), where
the router's miniupnpd is the default gateway, and steps it through a
scenario while the lab's other hosts send at the mapping.  The requests:

* ``{"op": "start", "port": P, ...}``: bind the application's UDP socket to
  P and make a PortMapper for it (other keys: PortMapper's arguments).
* ``{"op": "map", "timeout": s}``: ``map()``; the mapping, or the error.
* ``{"op": "recv", "wait": s}``: the first datagram on the application's
  socket within ``wait`` s, or none.
* ``{"op": "renewals", "count": n, "wait": s}``: run an event loop as the
  client would (selector, ``tick``, ``receive``) until ``n`` renewals
  arrived or ``wait`` s passed; each renewal with the time it came.
* ``{"op": "tick", "ahead": s}``: ``tick()`` as if ``s`` seconds had passed,
  then the answers within a second (renewal without waiting for it).
* ``{"op": "close"}``: ``close()``, and how long it took.
"""

import json
import os
import select
import selectors
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import portmap  # noqa: E402  (the checkout, one folder up)


def as_json(mapping):
    """A Mapping as a JSON object (expires made relative to now), or None."""
    if mapping is None:
        return None
    return dict(protocol=mapping.protocol, transport=mapping.transport,
                internal_port=mapping.internal_port, external=list(mapping.external),
                lifetime=mapping.lifetime, expires_in=mapping.expires - time.monotonic())


class Driver:
    """One application socket and its PortMapper, stepped by requests."""

    def __init__(self):
        self.app = None
        self.mapper = None

    def start(self, port, **options):
        """Bind the application socket; make the mapper."""
        self.app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.app.bind(('0.0.0.0', port))
        self.mapper = portmap.PortMapper(port, **options)
        return {'client_ip': self.mapper.client_ip, 'gateway': self.mapper.gateway}

    def map(self, timeout):
        """Ask, blocking, as the client does at start-up."""
        started = time.monotonic()
        try:
            mapping, error = self.mapper.map(timeout), None
        except portmap.PortMapError as e:
            mapping, error = None, str(e)
        return {'mapping': as_json(mapping), 'error': error,
                'external_address': self.mapper.external_address,
                'tcp_mapping': as_json(self.mapper.tcp_mapping),
                'elapsed': time.monotonic() - started}

    def recv(self, wait):
        """The first datagram within ``wait`` s on the application socket."""
        self.app.settimeout(wait)
        try:
            data, source = self.app.recvfrom(2048)
        except socket.timeout:
            return {'data': None}
        return {'data': data.decode(errors='replace'), 'from': list(source)}

    def renewals(self, count, wait):
        """The client's event loop until ``count`` renewals (or ``wait`` s)."""
        selector = selectors.DefaultSelector()
        selector.register(self.mapper, selectors.EVENT_READ)
        started = time.monotonic()
        deadline = started + wait
        got = []
        now = started
        while len(got) < count and now < deadline:
            wakeup = min(self.mapper.tick(now) or deadline, deadline)
            if selector.select(max(0.0, wakeup - now)):
                for mapping in self.mapper.receive(time.monotonic()):
                    got.append(dict(as_json(mapping), at=time.monotonic() - started))
            now = time.monotonic()
        selector.close()
        return {'renewals': got, 'mapping': as_json(self.mapper.mapping)}

    def tick(self, ahead):
        """tick() as if ``ahead`` s had passed; what the router answers within a second."""
        now = time.monotonic() + ahead
        self.mapper.tick(now)
        ready, _, _ = select.select([self.mapper], [], [], 1.0)
        return {'renewed': [as_json(m) for m in self.mapper.receive(now)] if ready else []}

    def close(self):
        """Delete the mappings; how long that took."""
        started = time.monotonic()
        self.mapper.close()
        return {'elapsed': time.monotonic() - started, 'mapping': as_json(self.mapper.mapping)}


def main():
    """Answer each request line with one JSON line; errors are answers too."""
    driver = Driver()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop('op')
        try:
            answer = getattr(driver, op)(**request)
        except Exception as e:      # the test shows it; the driver lives on
            answer = {'exception': '%s: %s' % (type(e).__name__, e)}
        print(json.dumps(answer), flush=True)


if __name__ == '__main__':
    main()
