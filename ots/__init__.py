"""ots: a one-time secret service. Store a secret behind a passphrase, read it once.

Importing this package does no I/O: `ots.app.make_app` builds an application
and `ots.server.main` runs one from the environment.
"""

__version__ = "0.1.0"
