r"""`pipecat-roark`: deliver what is queued, and see offline what is stuck and why.

A thin click layer over the library. Every command takes ``--dir`` (default
``PIPECAT_ROARK_DIR``, else the user state dir) and ``--json``. Exit codes: 0 ok,
1 something is left undelivered, dead or unhealthy, 2 a usage or configuration error.
Errors are one line on stderr, never a traceback.

What we print is data, never markup: the consoles have rich markup and emoji codes
off (a call id ``[/]`` or ``[link=…]`` is printed as it is), our own colours are
``Text`` styles, and every stored string goes through ``shown()``, which makes control
characters visible (``\x1b``) so stored data cannot drive the terminal.
"""

from ..devserver_command import dev_server
from . import drain_command, inspect_commands, maintenance_commands  # noqa: F401 (registers)
from .group import main

main.add_command(dev_server)

__all__ = ["main"]
