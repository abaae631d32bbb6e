"""icu-peft: parameter-efficient machine unlearning as detachable PEFT forget adapters."""

__version__ = "0.1.0"

from .config import ICUConfig  # noqa: E402
from .errors import ICUError  # noqa: E402
from .offline import quiet_refused_kernel  # noqa: E402

quiet_refused_kernel()


def forget(*args, **kwargs):
    """Run one forget request; see :func:`icu_peft.unlearner.forget`."""
    from .unlearner import forget as _forget

    return _forget(*args, **kwargs)


__all__ = ["ICUConfig", "ICUError", "forget", "__version__"]
