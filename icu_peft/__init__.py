"""icu-peft: parameter-efficient machine unlearning as detachable PEFT forget adapters."""

__version__ = "0.1.0"

from .config import ICUConfig  # noqa: E402
from .errors import ICUError  # noqa: E402


def _quiet_optional_hub_kernel() -> None:
    """Drop bitsandbytes' warning that its optional hub CPU kernel could not be loaded.

    With `kernels` installed (transformers >= 5 pulls it in), bitsandbytes tries to fetch a faster
    CPU 4-bit kernel from the Hub at import and, offline or unverified, warns and falls back to its
    own kernel: the result is the same, and icu-peft never fetches code at run time anyway. The
    warning only alarmed users, so it is filtered; every other bitsandbytes message still shows.
    """
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in str(record.msg))


_quiet_optional_hub_kernel()


def forget(*args, **kwargs):
    """Run one forget request; see :func:`icu_peft.unlearner.forget`."""
    from .unlearner import forget as _forget

    return _forget(*args, **kwargs)


__all__ = ["ICUConfig", "ICUError", "forget", "__version__"]
