"""pip install: only p2pnat's own names land in site-packages, and the commands run.

The build runs without build isolation (no download from a package
index): setuptools and wheel come from the machine (`make dev-deps` and
CI install wheel).
"""

import glob
import os
import shutil
import subprocess
import sys

from procs import ROOT, start


def install(tmp_path):
    """A fresh virtual environment with p2pnat installed; its bin and site-packages."""
    source = tmp_path / 'source'
    source.mkdir()
    for name in ['setup.py', 'setup.cfg', 'README.md', *glob.glob('*.py', root_dir=ROOT)]:
        shutil.copy(os.path.join(ROOT, name), source)     # the build writes beside its source
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', venv], check=True)
    site = next(venv.glob('lib/python*/site-packages'))
    before = set(os.listdir(site))
    subprocess.run([venv / 'bin' / 'pip', 'install', '--quiet', '--no-build-isolation',
                    '--no-deps', '--no-index', source], check=True, capture_output=True)
    return venv / 'bin', set(os.listdir(site)) - before


def test_pip_install_adds_only_p2pnat_and_its_commands_work(tmp_path):
    bin, added = install(tmp_path)
    assert {name.split('-')[0] for name in added} == {'p2pnat'}, added
    server = start([bin / 'p2pnat-rendezvous', '--port', '0'], 'rendezvous')
    try:
        port = server.expect_log(r'listening on \S+:(\d+)').group(1)
        alice = start([bin / 'p2pnat-client', 'alice', '--server', f'127.0.0.1:{port}'],
                      'alice')
        try:
            alice.expect(r'^\* registered as alice ')
            alice.send('/quit')
            assert alice.wait() == 0
        finally:
            alice.stop()
    finally:
        server.stop()
    assert not [line for line in server.err.lines if 'Traceback' in line]
