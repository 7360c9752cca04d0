"""The gRPC contract of trio_sign (DESIGN.md section 4) and its generated protobuf modules.

``sign_service.proto`` is the source of truth; ``sign_service_pb2.py`` and ``.pyi`` are generated
by ``scripts/gen-proto`` and checked in (a test fails if they drift).
"""
