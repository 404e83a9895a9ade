"""Registration of `model_type: "slimmoe"` with transformers' Auto classes, without importing torch on
`import hf_slimmoe`.

`AutoConfig.register` and `AutoModelForCausalLM.register` need the classes, and the classes need torch and
transformers' modeling code (seconds of imports, which `slimmoe --help` should not pay). So `import hf_slimmoe` only
arranges the registration: an import hook watches the modules of `transformers` and `hf_slimmoe`, and as soon as
transformers' Auto modules are loaded, it registers

- `SlimMoeConfig` with `AutoConfig` (once `transformers.models.auto.configuration_auto` is loaded),
- `SlimMoeForCausalLM` with `AutoModelForCausalLM`, and Phi-3.5-MoE's per-expert checkpoint layout for "slimmoe"
  (once `transformers.models.auto.modeling_auto` is loaded).

A registration runs when the outermost import of a watched module has finished, never while one is half-executed
(importing `SlimMoeForCausalLM` imports transformers model code, which may be what loaded the Auto module), so
`AutoModelForCausalLM` always has "slimmoe" by the time user code can call it. If the Auto modules were already
loaded before `import hf_slimmoe`, the registration runs at once, as a plain eager registration would.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

WATCHED_PACKAGES = ("transformers", "hf_slimmoe")
CONFIG_AUTO_MODULE = "transformers.models.auto.configuration_auto"
MODEL_AUTO_MODULE = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    """Register `SlimMoeConfig` with `AutoConfig` under its `model_type`."""
    from transformers import AutoConfig

    from .configuration_slimmoe import SlimMoeConfig

    AutoConfig.register(SlimMoeConfig.model_type, SlimMoeConfig, exist_ok=True)


def register_model() -> None:
    """Register `SlimMoeForCausalLM` with `AutoModelForCausalLM`, and Phi-3.5-MoE's checkpoint key layout."""
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    from .configuration_slimmoe import SlimMoeConfig
    from .modeling_slimmoe import SlimMoeForCausalLM

    AutoModelForCausalLM.register(SlimMoeConfig, SlimMoeForCausalLM, exist_ok=True)
    register_checkpoint_conversion_mapping(
        SlimMoeConfig.model_type, get_checkpoint_conversion_mapping("phimoe"), overwrite=True
    )


class AutoRegistrationHook(importlib.abc.MetaPathFinder):
    """
    A `sys.meta_path` finder that runs each pending registration once its trigger module is loaded and no watched
    module is still executing (in this thread); it removes itself when nothing is pending.
    """

    def __init__(self, pending: dict[str, Callable[[], None]]):
        self.pending = dict(pending)  # trigger module -> registration
        self.local = threading.local()  # .depth: watched modules executing in this thread
        self.running = False

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".", 1)[0] not in WATCHED_PACKAGES:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :] if self in sys.meta_path else ():
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ExecTracker(spec.loader, self)
                return spec
        return None

    def run_ready(self) -> None:
        """Run every registration whose trigger module is loaded, unless a watched module is mid-execution."""
        if self.running or getattr(self.local, "depth", 0) > 0:
            return
        self.running = True
        try:  # a registration may load another trigger module: loop until none is ready
            while ready := [name for name in self.pending if name in sys.modules]:
                registration = self.pending.pop(ready[0])
                try:
                    registration()
                except Exception:  # never break the user's import of transformers
                    logger.warning("hf_slimmoe could not register model_type 'slimmoe' with transformers' Auto "
                                   "classes (%s failed).", registration.__name__, exc_info=True)
        finally:
            self.running = False
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


class _ExecTracker(importlib.abc.Loader):
    """Wraps a watched module's loader for one import: counts the modules executing, then restores the loader."""

    def __init__(self, loader, hook: AutoRegistrationHook):
        self.loader = loader
        self.hook = hook

    def __getattr__(self, name: str):  # get_code, get_source, get_resource_reader, ... (runpy uses get_code)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        local = self.hook.local
        local.depth = getattr(local, "depth", 0) + 1
        module.__loader__ = self.loader  # the module keeps its real loader (resources, inspect.getsource, ...)
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        try:
            self.loader.exec_module(module)
        finally:
            local.depth -= 1
        self.hook.run_ready()


def install() -> None:
    """Register now what transformers has already loaded; hook the rest to run when its Auto module loads."""
    if any(isinstance(finder, AutoRegistrationHook) for finder in sys.meta_path):
        return
    hook = AutoRegistrationHook({CONFIG_AUTO_MODULE: register_config, MODEL_AUTO_MODULE: register_model})
    sys.meta_path.insert(0, hook)
    hook.run_ready()
