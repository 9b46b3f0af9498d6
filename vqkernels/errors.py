"""The public exceptions of vqkernels, in one module that imports nothing of the package.

Everything else imports its errors from here, so no two modules need each other for them.
"""


class BackendUnavailableError(RuntimeError):
    """A backend was requested (argument or VQKERNELS_BACKEND) that cannot run the given tensors,
    or no backend can run them at all; the message lists every backend's reason."""


class UnknownLayoutError(ValueError):
    """A state dict in none of the layouts in :data:`vqkernels.checkpoints.LAYOUTS`, or one of
    them with parts ``Quantizer`` cannot represent (several heads, affine parameters, index
    remapping). Also importable as ``vqkernels.checkpoints.UnknownLayoutError``."""


__all__ = ["BackendUnavailableError", "UnknownLayoutError"]
