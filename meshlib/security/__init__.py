"""Mesh identity: SPIFFE certificates, the control service's CA, join tokens and TLS.

The submodules are imported on demand (`meshlib.security.certificates`, `.ca`, `.tokens`):
importing this package pulls in nothing heavy.
"""
