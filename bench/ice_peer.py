"""One side of an ICE connection with aioice, driven by bench/connect.py.

Runs inside a NAT lab host (lab.popen) and talks to the bench over stdin
and stdout, one JSON object a line; the bench is the signalling channel
and forwards each side's offer to the other, so signalling costs no
network time, as with a pipe:

    bench -> peer   {"go": true}                 start gathering now
    peer -> bench   {"offer": {...}, "gathered_ms": N}
    bench -> peer   {"offer": {...}}             the other side's offer
    peer -> bench   {"connected_ms": N}          ICE completed
    controlling:    sends "hello" over the nominated pair, again after 0.5 s,
                    1 s, 2 s... until the other side acknowledges it (the
                    retransmission schedule of our chat, reliable.py)
    controlled:     {"received": "hello", "received_ms": N}, and "ack" back

All times are in ms from "go".  aioice is a bench-only dependency: it is
not needed, nor imported, by the programs.
"""

import argparse
import asyncio
import json
import sys
import time

import aioice

MESSAGE = b'hello'
ACK = b'ack'
RTO_INITIAL = 0.5       # as reliable.RTO_INITIAL: the same rules for both contenders
RTO_MAX = 4.0


def say(**fields):
    """Write one JSON line to the bench."""
    sys.stdout.write(json.dumps(fields) + '\n')
    sys.stdout.flush()


async def read_line(reader):
    """The next JSON object from stdin; EOF ends the run."""
    line = await reader.readline()
    if not line:
        raise SystemExit(0)
    return json.loads(line)


async def run(args):
    """Gather, exchange offers through the bench, connect, send or receive."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    host, port = args.stun.rsplit(':', 1)
    say(ready=True)
    await read_line(reader)             # "go"
    started = time.monotonic()

    def ms():
        return round((time.monotonic() - started) * 1000, 1)

    conn = aioice.Connection(ice_controlling=args.role == 'controlling',
                             stun_server=(host, int(port)), use_ipv6=False)
    await conn.gather_candidates()
    say(offer={'ufrag': conn.local_username, 'pwd': conn.local_password,
               'candidates': [c.to_sdp() for c in conn.local_candidates]},
        gathered_ms=ms())
    remote = (await read_line(reader))['offer']
    for sdp in remote['candidates']:
        await conn.add_remote_candidate(aioice.Candidate.from_sdp(sdp))
    await conn.add_remote_candidate(None)           # end of candidates
    conn.remote_username, conn.remote_password = remote['ufrag'], remote['pwd']
    try:
        await conn.connect()
    except ConnectionError as error:
        say(failed=str(error), failed_ms=ms())
        return
    say(connected_ms=ms())
    acks = None
    if args.role == 'controlling':
        await send_until_acked(conn)
        say(acked_ms=ms())
    else:
        data = await conn.recv()
        say(received=data.decode(errors='replace'), received_ms=ms())
        acks = asyncio.create_task(ack_every(conn))
    # Stay until the bench closes stdin: a late retransmission is answered.
    await reader.read()
    if acks is not None:
        acks.cancel()
    await conn.close()


async def send_until_acked(conn):
    """Send MESSAGE until ACK comes back, waiting twice as long after each try.

    ICE gives datagrams, not delivery; under loss the first application
    datagram may be lost like any other, and an application retransmits.
    """
    rto = RTO_INITIAL
    while True:
        await conn.send(MESSAGE)
        try:
            while await asyncio.wait_for(conn.recv(), rto) != ACK:
                pass
            return
        except asyncio.TimeoutError:
            rto = min(rto * 2, RTO_MAX)


async def ack_every(conn):
    """Acknowledge every datagram: our ACK may be lost, the retransmission not."""
    while True:
        await conn.send(ACK)
        await conn.recv()


def main():
    """Parse the role and the STUN server; run one connection."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('role', choices=('controlling', 'controlled'))
    parser.add_argument('--stun', required=True, help='HOST:PORT of the STUN server')
    asyncio.run(run(parser.parse_args()))


if __name__ == '__main__':
    main()
