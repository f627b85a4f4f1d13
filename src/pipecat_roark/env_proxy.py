"""Which proxy a request to Roark goes through: the standard environment variables.

``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (either case) are read
once, when a client is made, and the answer per host is kept. The client resolves them
itself rather than through aiohttp's ``trust_env``, which also reads ``~/.netrc`` on a
worker thread for every request and would add Basic credentials from it: that is loop
time for each chunk, and a credential that no request of ours asked for.
"""

from __future__ import annotations

import urllib.request

__all__ = ["EnvProxies"]


class EnvProxies:
    """The proxy URL for a scheme and host, or None to connect directly."""

    def __init__(self) -> None:
        self._proxies = urllib.request.getproxies_environment()
        self._chosen: dict[tuple[str, str], str | None] = {}

    def for_url(self, scheme: str, host: str) -> str | None:
        """The proxy for a request to ``host`` over ``scheme``, chosen once per host.

        Returns:
            The proxy URL, or None when ``NO_PROXY`` names the host or no proxy is set.
        """
        key = (scheme, host)
        if key not in self._chosen:
            self._chosen[key] = self._choose(scheme, host)
        return self._chosen[key]

    def _choose(self, scheme: str, host: str) -> str | None:
        proxy = self._proxies.get(scheme) or self._proxies.get("all")
        if not proxy or urllib.request.proxy_bypass(host):
            return None
        return proxy
