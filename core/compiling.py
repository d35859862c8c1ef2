"""``torch.compile`` per engine: every engine's compiled functions have code objects of their own.

Dynamo keeps its compiled graphs on the code object of the function it compiles, and caps how many it
keeps per code object (``torch._dynamo.config.recompile_limit``, 8). The step's phases are closures made
by ``make_*`` functions (core/step.py, core/reducers.py), so every engine's closures share one code
object, and each new engine's guards (its own ``forward``, plan and layouts) fail on the graphs of the
ones before it: the 9th engine in a process hit the limit, which ``fullgraph=True`` turns into
``FailOnRecompileLimitHit``. Compiling a copy of the function with a fresh code object gives each engine
its own cache, which dies with the engine (the copy is only referenced through its compiled wrapper).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch


def private_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a function or a bound method) with a code object nothing else shares."""
    if isinstance(fn, types.MethodType):
        return types.MethodType(private_copy(fn.__func__), fn.__self__)
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"expected a Python function, got {type(fn).__name__}")
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    copy.__dict__.update(fn.__dict__)
    return copy


def compile_private(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(fn, **options)`` over a private copy of ``fn``: its graphs, guards and
    recompile budget belong to this call's result alone and are freed with it."""
    private = private_copy(fn)
    compiled = torch.compile(private, **options)
    code = (private.__func__ if isinstance(private, types.MethodType) else private).__code__
    weakref.finalize(compiled, _release_code, code)
    return compiled


def _release_code(code: types.CodeType) -> None:
    """Drop dynamo's graphs and guards for ``code`` once its compiled function is gone.

    Without this they would never be freed (torch 2.11-2.13): dynamo maps every transformed code back to
    its original in ``torch._dynamo.utils.orig_code_map``, whose values are strong, while the original's
    cache entries (attached in C, where the garbage collector cannot see them) hold the transformed code,
    a cycle; and each graph's guard manager is kept alive by finalizers it puts on the objects its guards
    match by identity (modules, classes, functions that live as long as the process)."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code
        from torch._dynamo import convert_frame
    except ImportError:  # another torch layout: keep its graphs rather than fail
        return
    with convert_frame.compile_lock:  # re-entrant: safe if a collection runs this mid-compilation
        managers = {id(entry.guard_manager) for entry in _debug_get_cache_entry_list(code)}
        reset_code(code)
    if not managers:
        return
    registry = getattr(weakref.finalize, "_registry", {})
    for finalizer, info in list(registry.items()):
        callback = getattr(info, "func", None)  # functools.partial(manager.invalidate, obj_str=...)
        owner = getattr(getattr(callback, "func", None), "__self__", None)
        if id(getattr(owner, "guard_manager", None)) in managers:
            finalizer.detach()
