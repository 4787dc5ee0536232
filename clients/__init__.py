"""Client side: Flower NumPyClients and the PyTorch training they wrap."""

import logging


def _import_opacus_without_its_root_handler() -> None:
    """Opacus' `opacus/utils/module_utils.py` calls `logging.basicConfig()` at import, which
    gives the root logger a stderr handler: every Flower log line (Flower's logger propagates)
    then prints twice, once with Flower's format and once with a timestamp. Import it here,
    before any module of this package does, and remove the handler it added (only that one:
    handlers configured before stay)."""
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus.utils.module_utils  # noqa: F401

    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)


_import_opacus_without_its_root_handler()
