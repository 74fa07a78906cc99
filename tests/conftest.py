"""Settings for every test, and the fixtures of the server tests.

A client creates its secret key (identity.py) in the user's config folder
on first use.  The tests' clients share one such folder, made for the run
and removed after it, so that a test run never writes to the real one.
"""

import os
import shutil
import tempfile

import pytest

from procs import start_server
from test_server import RawPeer


def pytest_configure(config):
    """Point XDG_CONFIG_HOME, which every started program inherits, at a fresh folder."""
    config.p2pnat_config = tempfile.mkdtemp(prefix='p2pnat-config-')
    os.environ['XDG_CONFIG_HOME'] = config.p2pnat_config


def pytest_unconfigure(config):
    """Remove the folder again."""
    shutil.rmtree(getattr(config, 'p2pnat_config', ''), ignore_errors=True)


@pytest.fixture
def server(request):
    """The real server, with -v so that its log shows every message.

    A test may pass it options with @pytest.mark.server_args.
    """
    marker = request.node.get_closest_marker('server_args')
    proc, port = start_server('-v', *(marker.args if marker else ()))
    yield proc, port
    proc.stop()
    assert not [line for line in proc.err.lines if 'Traceback' in line], proc.transcript()


@pytest.fixture
def peers(server):
    """A factory for raw peers (test_server.RawPeer) of that server, closed at the end."""
    made = []

    def peer(name=None):
        made.append(RawPeer(server[1], name))
        return made[-1]

    yield peer
    for p in made:
        p.close()
