"""Persistent backend (placeholder until the persistent kernels land)."""


def supports(B, H, dtype, device):
    return False


def check_supported(B, H, dtype, device):
    raise NotImplementedError("backend='persistent' is not implemented yet")
