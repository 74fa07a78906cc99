"""Settings for every test: the programs keep their name keys in a folder of this run.

A client creates its secret key (identity.py) in the user's config folder
on first use.  The tests' clients share one such folder, made for the run
and removed after it, so that a test run never writes to the real one.
"""

import os
import shutil
import tempfile


def pytest_configure(config):
    """Point XDG_CONFIG_HOME, which every started program inherits, at a fresh folder."""
    config.p2pnat_config = tempfile.mkdtemp(prefix='p2pnat-config-')
    os.environ['XDG_CONFIG_HOME'] = config.p2pnat_config


def pytest_unconfigure(config):
    """Remove the folder again."""
    shutil.rmtree(getattr(config, 'p2pnat_config', ''), ignore_errors=True)
