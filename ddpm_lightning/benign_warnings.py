"""The one place where known-benign messages of third-party libraries are filtered, each narrowly: a warning by its
message and the module it is raised from, a log record by its logger and message. Nothing raised by this package,
and no other message of those modules, is hidden. `filter_benign_messages()` is called by `tasks.train` and
`tasks.evaluate`; it is idempotent. One message is filtered per run instead, where it is benign
(`hide_locked_modules_notice`, called by a ControlNet's training)."""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, module regex, category, why it is benign)
WARNINGS = (
    (
        r"'set_vital' is deprecated",
        r"torchdata\.stateful_dataloader\.",
        UserWarning,
        "torchdata's StatefulDataLoader calls torch.set_vital, a no-op that torch deprecated; nothing to fix on our side",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        r"lightning\.pytorch\.utilities\._pytree",
        FutureWarning,
        "Lightning's own pytree helper uses torch's deprecated LeafSpec; it still works",
    ),
)

# (logger name, message regex, why)
LOG_RECORDS = (
    (
        "lightning.pytorch.utilities.rank_zero",
        r"Tip: .*litlogger",
        "an advertisement for a cloud logging service, printed by every Trainer",
    ),
    (
        "torch.utils.cpp_extension",
        r"No CUDA runtime is found",
        "printed when the CPU kernels are built on a machine with a CUDA toolkit but no GPU; they are CPU kernels",
    ),
)


# Filtered only in the runs it is benign in, with the count it is benign at (`hide_locked_modules_notice`):
# Lightning's fit loop warns when modules are in eval mode as training starts; a ControlNet's base network is, on
# purpose (locked: its dropout must stay off while the control branch trains). Another module left in eval mode
# changes the count, and the warning is shown.
LOCKED_MODULES = (r"Found {count} module\(s\) in eval mode at the start of training\.", r"lightning\.pytorch\.loops\.fit_loop")


def hide_locked_modules_notice(count: int) -> None:
    """Hide Lightning's "Found `count` module(s) in eval mode at the start of training" (LOCKED_MODULES), raised by
    its fit loop, for a run whose `count` modules in eval mode are those of a network locked on purpose."""
    message, module = LOCKED_MODULES
    warnings.filterwarnings("ignore", message=message.format(count=int(count)), category=UserWarning, module=module)


class _DropMatching(logging.Filter):
    """Drops the records of one logger whose message matches a regex."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def filter_benign_messages() -> None:
    """Install the filters of WARNINGS and LOG_RECORDS (once per process)."""
    for message, module, category, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, pattern, _ in LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
