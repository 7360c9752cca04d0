"""AWS Nitro Enclaves: attestation documents, the NSM, and the local stand-ins used off AWS."""

__all__: list[str] = []
