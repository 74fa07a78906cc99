"""The real programs across real NATs, built by the NAT lab (needs root)."""

import pytest

import natlab
from labpeers import LabRun, chat_both_ways, connect

# RFC 4787 behaviour of each router type; what hole punching can open:
# every pair of cone NATs, and a symmetric NAT against a peer whose
# filtering does not care about the port (full-cone, restricted).  Linux
# picks symmetric ports at random, so port prediction (point 6) has
# nothing to predict and the rest must be relayed.
CONES = ('full-cone', 'restricted', 'port-restricted')


def expected(nat_a, nat_b):
    """'direct' or 'relayed', for a pair of NAT types."""
    if 'symmetric' not in (nat_a, nat_b):
        return 'direct'
    other = nat_b if nat_a == 'symmetric' else nat_a
    return 'direct' if other in ('full-cone', 'restricted') else 'relayed'


@pytest.fixture(autouse=True)
def lab_required():
    """Skip (fail in CI) when this machine cannot build the lab."""
    natlab.require_lab()


def test_two_port_restricted_nats_connect_directly():
    with natlab.Lab('port-restricted', 'port-restricted') as lab, LabRun(lab) as run:
        alice, bob = run.client('a1', 'alice'), run.client('b1', 'bob')
        (mode_a, endpoint, _), (mode_b, _, _) = connect(alice, bob)
        assert (mode_a, mode_b) == ('direct', 'direct')
        assert endpoint.startswith(lab.public_addr('b') + ':')
        chat_both_ways(alice, bob)


@pytest.mark.parametrize('nat_a', natlab.NAT_TYPES)
@pytest.mark.parametrize('nat_b', natlab.NAT_TYPES)
def test_matrix(nat_a, nat_b):
    with natlab.Lab(nat_a, nat_b) as lab, LabRun(lab) as run:
        alice, bob = run.client('a1', 'alice', '--punch-timeout', '3'), \
            run.client('b1', 'bob', '--punch-timeout', '3')
        (mode_a, _, _), (mode_b, _, _) = connect(alice, bob)
        want = expected(nat_a, nat_b)
        assert (mode_a, mode_b) == (want, want), (alice.transcript(), bob.transcript())
        chat_both_ways(alice, bob)
