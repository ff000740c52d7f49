"""A registry ``HEAD`` sent straight through urllib3, for the tag check every cache hit makes.

requests spends about 1 ms of CPU on a ``HEAD`` that urllib3 alone sends in 0.4 (its
environment, cookie and hook handling around the same urllib3 call); a cache hit makes
one, on a host busy with them. :func:`head` answers only when nothing requests would add
applies — no proxy for the URL, the same certificate trust — and only with what needs no
interpretation: 200 or 404 for a request that was not redirected. Anything else (another
status, a redirect, a refused connection) returns None and the caller sends the request
through requests, which says what went wrong in its own words; a timeout is raised
(``urllib3.exceptions.TimeoutError``), since sending again would wait as long again.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit

import certifi
import requests
import urllib3
from requests.structures import CaseInsensitiveDict

#: Statuses answered here; a 401 goes through requests (its challenge, a ~/.netrc login).
ANSWERED = (200, 404)
#: The environment requests reads for proxies and certificate trust.
_ENVIRONMENT = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")

_lock = threading.Lock()
_pools: dict[tuple[str | None, ...], urllib3.PoolManager] = {}
_proxied: dict[tuple[str | None, ...], bool] = {}


def _forget_pools() -> None:
    # A forked child must not share its parent's open connections: two processes reading
    # one socket would take each other's answers.
    global _lock, _pools
    _lock = threading.Lock()
    _pools = {}


os.register_at_fork(after_in_child=_forget_pools)


def head(url: str, headers: dict[str, str],
         timeout: tuple[float, float]) -> requests.Response | None:
    """The response to ``HEAD url`` when it is 200 or 404 and requests would have sent the
    same request; None: send it through requests. Raises urllib3's TimeoutError."""
    environment = tuple(os.environ.get(name) for name in _ENVIRONMENT)
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https") or _through_proxy(url, scheme, environment):
        return None
    try:
        raw = _pool(scheme, environment).request(
            "HEAD", url, headers=headers, redirect=False, retries=False,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
    except urllib3.exceptions.TimeoutError:
        raise
    except urllib3.exceptions.HTTPError:
        return None
    if raw.status not in ANSWERED:
        return None
    response = requests.Response()
    response.status_code = raw.status
    response.reason = raw.reason or ""
    response.headers = CaseInsensitiveDict(raw.headers)
    response.url = url
    response._content = b""
    return response


def _through_proxy(url: str, scheme: str, environment: tuple[str | None, ...]) -> bool:
    # Per scheme and host: HTTP_PROXY and HTTPS_PROXY may differ for the same host.
    key = (scheme, urlsplit(url).netloc, *environment)
    found = _proxied.get(key)
    if found is None:
        proxies = requests.utils.get_environ_proxies(url)
        found = _proxied[key] = bool(proxies.get(scheme) or proxies.get("all"))
    return found


def _pool(scheme: str, environment: tuple[str | None, ...]) -> urllib3.PoolManager:
    # requests' trust: its CA bundle variables, else certifi's bundle.
    bundle = (environment[-2] or environment[-1] or certifi.where()) if scheme == "https" else None
    key = (scheme, bundle)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            if bundle is None:
                pool = urllib3.PoolManager(maxsize=4)
            elif os.path.isdir(bundle):
                pool = urllib3.PoolManager(maxsize=4, cert_reqs="CERT_REQUIRED", ca_cert_dir=bundle)
            else:
                pool = urllib3.PoolManager(maxsize=4, cert_reqs="CERT_REQUIRED", ca_certs=bundle)
            _pools[key] = pool
        return pool
