"""Ask for a reconciliation of one deployment now: the ``reconcile.amp4ec.io/requested`` annotation.

Setting it to a new value fires the deployment's update handler (``inferencedeployment.requested``)
through kopf's own queue, with its retries (the pattern of Flux's ``reconcile.fluxcd.io/requestedAt``).
Its domain is not kopf's ``amp4ec.io`` prefix, whose annotations kopf leaves out of the diff it
reacts to. Used by ``watch.py`` (a shard Pod or a Node changed) and ``reconcile.py`` (a
higher-priority deployment asks lower ones to make room).
"""

from __future__ import annotations

import itertools
import logging

from amp4ec.operator.k8s import Kube, KubeError
from amp4ec.operator.status import now_iso

__all__ = ["REQUEST_ANNOTATION", "request"]

REQUEST_ANNOTATION = "reconcile.amp4ec.io/requested"
_seq = itertools.count()
log = logging.getLogger(__name__)


async def request(kube: Kube, namespace: str, name: str, why: str) -> None:
    """Ask for a reconciliation of one deployment now (a no-op when it is gone)."""
    value = f"{now_iso()} #{next(_seq)} {why}"[:250]
    try:
        await kube.patch(
            "InferenceDeployment", namespace, name, {"metadata": {"annotations": {REQUEST_ANNOTATION: value}}}
        )
    except KubeError as exc:  # the API is down: the timer reconciles later anyway
        log.warning("%s/%s: reconcile request not written: %s", namespace, name, exc)
