"""cert-manager's ``Certificate`` (cert-manager.io/v1), checked structurally.

kubernetes-validate has no schema for cert-manager's kinds (as for the Prometheus Operator's),
so the fields amp4ec writes are checked here against cert-manager's API reference: names and
types of the spec fields, the enums of ``privateKey`` and ``usages``, no unknown spec field (a
typo would be pruned by the API server and silently change the leaf), and the rules the
cert-manager webhook enforces that concern us (a name, a secretName, an issuerRef name,
commonName at most 64 characters, Go durations, renewBefore under duration).
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema

_STRINGS = {"type": "array", "items": {"type": "string"}}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]  # fmt: skip
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": _LABELS,
                "ownerReferences": {"type": "array"},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": _STRINGS,
                "uris": _STRINGS,
                "ipAddresses": _STRINGS,
                "emailAddresses": _STRINGS,
                "duration": {"type": "string"},
                "renewBefore": {"type": "string"},
                "isCA": {"type": "boolean"},
                "usages": {"type": "array", "items": {"enum": _USAGES}},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "size": {"type": "integer"},
                    },
                },
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"type": "string"},
                        "group": {"type": "string"},
                    },
                },
                "secretTemplate": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"labels": _LABELS, "annotations": _LABELS},
                },
            },
        },
    },
}
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")


def go_duration_s(text: str) -> float:
    """Seconds of a Go ``time.ParseDuration`` string (``720h``, ``1h30m``); ValueError otherwise."""
    if not text or _PART.sub("", text):
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))


def validate_certificate(obj: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` or ``ValueError`` when cert-manager would refuse ``obj``."""
    jsonschema.Draft7Validator(SCHEMA).validate(obj)
    spec = obj["spec"]
    duration = go_duration_s(spec.get("duration", "2160h"))
    renew = go_duration_s(spec.get("renewBefore", "0s"))
    if duration < 3600 or (spec.get("renewBefore") and not 300 <= renew < duration):
        raise ValueError(f"duration {spec.get('duration')} / renewBefore {spec.get('renewBefore')}")
