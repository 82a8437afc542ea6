"""An explicit end-of-turn hook between an event loop's owner and the transport.

A loop whose owner runs callbacks at the end of each turn (the sync ``Publisher``'s shared loop
does, just before it polls) registers how to queue one. The pika transport asks for it when it
opens a connection: frames written during a turn then go out at the end of that turn, without a
turn of their own. Loops nobody registered get ``None`` and the transport uses ``call_soon``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

TurnEnd = Callable[[Callable[[], object]], None]

_hooks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TurnEnd] = weakref.WeakKeyDictionary()


def register(loop: asyncio.AbstractEventLoop, at_turn_end: TurnEnd) -> None:
    """Declare that ``at_turn_end(callback)`` runs ``callback`` at the end of ``loop``'s turn."""
    _hooks[loop] = at_turn_end


def hook_for(loop: asyncio.AbstractEventLoop) -> TurnEnd | None:
    return _hooks.get(loop)
