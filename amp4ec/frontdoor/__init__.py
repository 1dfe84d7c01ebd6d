"""The front door: the Open Inference Protocol (KServe/Triton "v2") over a backend.

``model.py`` holds what a model looks like to v2 clients and the checks every request passes;
``tensors.py`` converts v2 tensors (JSON, binary extension, gRPC raw and typed contents) to
torch and back; ``rest.py`` and ``grpc.py`` are thin adapters; ``door.py`` ties them to a
backend (the data-plane client in ``amp4ec serve``, the entry stage's own agent in a cluster:
``amp4ec.node_agent.entry``); ``listen.py`` starts both listeners, over TLS (optionally
requiring a client certificate) or explicitly plaintext (see docs/security.md).
"""
