"""A local Roark-compatible server: the demo's Roark and the tests' real HTTP peer.

Same paths, headers, status codes and bodies as roark-api.md, plus the object storage
behind the presigned URLs (with expiry and signatures), idempotency by key, state kept
on disk, a read API under ``/_dev`` and fault injection. It is a faithful stand-in,
not a mock: our client and drainer talk to it exactly as they talk to Roark.

It also keeps, per call, the order in which its requests arrived (``arrivals`` in
``GET /_dev/calls/{id}``), and with ``strict_order`` it refuses with 409 what arrives
out of the order Roark expects (chunks before call-started, call-ended before the
chunks whose URLs were minted, anything of a call after its call-ended): the tests
assert the per-call order directly instead of inferring it from side effects.

    pipecat-roark dev-server --port 8787 --data ./roark-dev --fail-rate 0.3
"""

from .faults import Faults
from .server import DevServer, serve, spawn

__all__ = ["DevServer", "Faults", "serve", "spawn"]
