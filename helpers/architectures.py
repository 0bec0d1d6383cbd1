"""The model architectures the series builds, in one table: where each one's classes, presets and loaders live.

``ARCHITECTURES`` maps a name (``"gpt2"``: Part 06's ``GPTModel``; ``"modern"``: Part 10's
``ModernModel``) to an ``Architecture``, which names its module, model class, config class, named
sizes, initialisation and weight loaders as strings. Whatever must build or recognise a model of
any architecture (a checkpoint, the pretraining command) asks this table, so it never imports a
model by hand, and a Part 07 module never imports Part 10's at import time: a module is imported
the first time one of its names is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType

from torch import nn

from helpers.runtime import unwrap_model

__all__ = ["ARCHITECTURES", "Architecture", "UnknownArchitectureError", "architecture_of", "get_architecture",
           "model_from_config", "preset_architecture"]


class UnknownArchitectureError(ValueError):
    """An architecture name this version of helpers does not know; the message lists the known ones."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One architecture: the notebook that builds it and the names of what it provides, in ``module``.

    ``loaders`` are ``"module:function"`` names of functions that read published weights into the model.
    """

    name: str
    part: str
    module: str
    model_class: str
    config_class: str
    presets: str
    init: str
    loaders: tuple[str, ...] = ()

    def _module(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def model(self) -> type[nn.Module]:
        """The model class (``GPTModel``, ``ModernModel``)."""
        return getattr(self._module(), self.model_class)

    @property
    def config(self) -> type:
        """The config class (``GPTConfig``, ``ModernConfig``)."""
        return getattr(self._module(), self.config_class)

    @property
    def preset_configs(self) -> Mapping[str, object]:
        """Named sizes of published models, name -> config (``GPT_CONFIGS``, ``MODERN_CONFIGS``)."""
        return getattr(self._module(), self.presets)

    @property
    def init_weights(self) -> Callable[[nn.Module], nn.Module]:
        """The architecture's own initialisation (GPT-2's scheme for both)."""
        return getattr(self._module(), self.init)

    def loader(self, name: str) -> Callable[..., nn.Module]:
        """The weight loader called ``name`` (``"load_gpt2"``, ``"load_qwen3"``...), imported on first use."""
        for entry in self.loaders:
            module, function = entry.split(":")
            if function == name:
                return getattr(importlib.import_module(module), function)
        known = ", ".join(entry.split(":")[1] for entry in self.loaders) or "none"
        raise UnknownArchitectureError(f"architecture {self.name!r} has no loader {name!r} (it has: {known})")

    def owns(self, config: object) -> bool:
        """True if ``config`` is an instance of this architecture's config class (checked without importing it)."""
        cls = type(config)
        return (cls.__module__, cls.__name__) == (self.module, self.config_class)


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture("gpt2", "part06_gpt_architecture", "helpers.model", "GPTModel", "GPTConfig",
                         "GPT_CONFIGS", "init_gpt2_weights", ("helpers.weights:load_gpt2",)),
    "modern": Architecture("modern", "part10_modern_llm", "helpers.modern", "ModernModel", "ModernConfig",
                           "MODERN_CONFIGS", "init_modern_weights",
                           ("helpers.modern_weights:load_qwen3", "helpers.modern_weights:load_llama")),
}
"""Architecture name -> ``Architecture``; a checkpoint's ``arch`` metadata is one of these names."""


def get_architecture(name: str) -> Architecture:
    """The ``Architecture`` called ``name``; ``UnknownArchitectureError`` (listing the known ones) otherwise."""
    if name not in ARCHITECTURES:
        raise UnknownArchitectureError(f"unknown architecture {name!r}; the known ones are {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def architecture_of(model_or_config: object) -> str | None:
    """The name of the architecture of a model (by its ``cfg``) or of a config; None for any other kind."""
    target = unwrap_model(model_or_config) if isinstance(model_or_config, nn.Module) else model_or_config
    config = getattr(target, "cfg", target)
    return next((name for name, arch in ARCHITECTURES.items() if arch.owns(config)), None)


def model_from_config(config: Mapping, arch: str = "gpt2") -> nn.Module:
    """A new model of architecture ``arch`` built from a config dict (as ``cfg.to_dict()`` or a checkpoint saves it)."""
    architecture = get_architecture(arch)
    return architecture.model(architecture.config.from_dict(config))


def preset_architecture(preset: str) -> str | None:
    """The architecture whose named sizes include ``preset`` (``"gpt2-medium"`` -> ``"gpt2"``); None if none does."""
    return next((name for name, arch in ARCHITECTURES.items() if preset in arch.preset_configs), None)
