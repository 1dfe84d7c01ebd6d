"""Names and labels of a deployment's child objects, and who owns an object.

An InferenceDeployment's name is a DNS-1123 *subdomain* (up to 253 characters, dots allowed);
a Service's name must be a DNS-1035 *label* (up to 63, a letter first, no dots) and a label
value at most 63 characters. Cutting a name is where two deployments used to collide
(``…-canary-a`` and ``…-canary-b`` shared ``name[:40]``), so a name that has to change is cut
and suffixed with a hash of the whole name: unique per deployment, stable across restarts.

The operator only patches or deletes objects whose ``ownerReferences`` name its deployment's
uid (set by ``kopf.adopt``); a name clash with someone else's object is refused, never taken over.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["BASE_MAX", "child_base", "label_value", "owned_by", "owner_names"]

BASE_MAX = 40
"""Longest base name: room for ``-<plan id (8)>-p<i>s<j>`` and a tile Pod's ``-t<k>`` within a
63-character DNS label."""
LABEL_MAX = 63
_HASH = 8
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:_HASH]


def child_base(name: str) -> str:
    """The prefix of every child object's name: ``name`` itself when it is a short DNS-1035
    label (names of existing deployments do not change), else a cut, cleaned name plus a hash."""
    if len(name) <= BASE_MAX and _DNS1035.match(name):
        return name
    clean = re.sub(r"[^a-z0-9-]", "-", name.lower())
    if not clean[:1].isalpha():
        clean = "d-" + clean  # a Service name must start with a letter
    head = clean[: BASE_MAX - _HASH - 1].rstrip("-")
    return f"{head}-{_digest(name)}"


def label_value(name: str) -> str:
    """``name`` as a label value (at most 63 characters, alphanumeric at both ends)."""
    if len(name) <= LABEL_MAX:
        return name
    return f"{name[: LABEL_MAX - _HASH - 1].rstrip('-.')}-{_digest(name)}"


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether ``obj`` is a child of the object with ``uid`` (one of its ownerReferences)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or ()
    return bool(uid) and any(r.get("uid") == uid for r in refs)


def owner_names(obj: Mapping[str, Any]) -> str:
    """The owners of ``obj`` for a message: ``InferenceDeployment/x`` or ``no owner``."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or ()
    return ", ".join(f"{r.get('kind')}/{r.get('name')}" for r in refs) or "no owner"
