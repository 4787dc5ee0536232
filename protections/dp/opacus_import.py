"""Importing Opacus without its side effect on logging."""

import logging


def import_opacus_quietly() -> None:
    """Opacus' `opacus/utils/module_utils.py` calls `logging.basicConfig()` at import, which
    gives the root logger a stderr handler: every Flower log line (Flower's logger propagates)
    then prints twice, once with Flower's format and once with a timestamp. protections/dp/dpsgd.py
    (the only module that uses Opacus, imported only for DP-SGD: Opacus costs seconds of
    start-up) calls this before its own imports; it removes the handler Opacus added (only
    that one: handlers configured before stay)."""
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus.utils.module_utils  # noqa: F401

    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)

