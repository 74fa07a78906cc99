"""The installed commands, p2pnat-rendezvous and p2pnat-client.

The listings import one another by their plain names (``import
p2pcommon``), as the article's C files include one header, so that
``python rendezvous.py`` runs straight from a checkout.  Installed, they
live together in one folder, ``p2pnat``, and not at the top of
site-packages, where names as plain as ``control`` or ``p2pclient`` would
shadow other packages.  So each command puts that folder on the module
path first, and then runs the listing's ``main``.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def rendezvous():
    """p2pnat-rendezvous: the server (Listing 1)."""
    sys.path.insert(0, HERE)
    import rendezvous as listing
    return listing.main()


def client():
    """p2pnat-client: the peer (Listing 3)."""
    sys.path.insert(0, HERE)
    import p2pclient as listing
    return listing.main()
