"""One lock for the blocks that swap process-wide state for a while (``warnings.catch_warnings``,
which replaces the filters and ``showwarning`` of the whole process, a patched ``torch._C``
function): threads running them at once take turns, else one leaving restores what another had
swapped in, and the process keeps a muted log or warnings recorded into a dead list. Reentrant:
a block may run inside another in the same thread."""
from __future__ import annotations

import threading

__all__ = ["PROCESS_STATE_LOCK"]

PROCESS_STATE_LOCK = threading.RLock()
