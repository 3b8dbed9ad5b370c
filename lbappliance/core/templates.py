"""The one jinja2 environment for every rendered file (haproxy.cfg, keepalived.conf, frr.conf):
templates shipped in the package, StrictUndefined so a missing value is an error, not an empty
string, and whitespace control that keeps the output byte-stable."""

from __future__ import annotations

from functools import cache

import jinja2


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("lbappliance", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
