"""The front door: the Open Inference Protocol (KServe/Triton "v2") over the data-plane client.

``model.py`` holds what a model looks like to v2 clients and the checks every request passes;
``tensors.py`` converts v2 tensors (JSON, binary extension, gRPC raw and typed contents) to
torch and back; ``rest.py`` and ``grpc.py`` are thin adapters. The front door is a client of
the pipelines' entry stages with a client identity (mutual TLS, see docs/security.md); its own
listeners are plaintext, on loopback unless told otherwise.
"""
