"""The playground page the router serves at `GET /playground` (the HTML lives in `playground.html`).

The page is static: it holds no key and no data, so it is served without auth (it sends the key a person
types in). Its CSP forbids anything but itself and calls to its own origin, which keeps it honest about
working offline: an external script, font or image would not load.
"""

from __future__ import annotations

import functools
from importlib import resources

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.cache
def page() -> str:
    return resources.files("prism_ray").joinpath("playground.html").read_text(encoding="utf-8")
