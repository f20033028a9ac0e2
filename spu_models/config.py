"""What a model *is* (architecture configs, as its checkpoint says) and how it *runs* (``Execution``).

The architecture configs (``llama.LlamaConfig``, ``bert.BertConfig``) hold only what an HF
``config.json`` holds, and round-trip to it unchanged; :class:`ArchConfig` is their shared home
(validation, ``from_hf`` / ``to_hf``). :class:`Execution` holds the execution options a policy
chooses and a checkpoint never stores: the approximation of each non-linear op, the attention
kind, its random-feature settings and the layers that keep softmax. Every model takes both.
"""
from __future__ import annotations

import dataclasses

from .approx import Approx
from .rfa import RFAConfig

ATTENTION_KINDS = ("softmax", "rfa")


class ConfigError(ValueError):
    """An architecture or execution setting that cannot work (the message names it)."""


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read as a supported model."""


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a model runs under a policy (never stored with the weights).

    ``attention``: "softmax", or "rfa" (random feature attention, ``rfa``) in every layer but
    ``softmax_layers``; ``rfa``: its settings (for kind "learned" the width and window must be the
    checkpoint's maps: :meth:`for_model` sets them). ``scan_layers``: runs of softmax layers go
    through one ``lax.scan`` (a program holds one layer body: compiles in seconds); False unrolls
    them, for an op census that counts every layer."""

    approx: Approx = Approx()
    attention: str = "softmax"
    rfa: RFAConfig = RFAConfig()
    softmax_layers: tuple = ()
    scan_layers: bool = True

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention kind {self.attention!r}; choose from {ATTENTION_KINDS}")

    def layer_attention(self, layer: int) -> str:
        """The attention kind of one layer ("softmax" or "rfa")."""
        return "softmax" if self.attention == "softmax" or layer in self.softmax_layers else "rfa"

    def for_model(self, config) -> "Execution":
        """This execution fitted to ``config``'s checkpoint: a learned map's width and window are
        the checkpoint's; checked with :meth:`check`."""
        ex = self
        if self.attention == "rfa" and self.rfa.kind == "learned":
            maps = getattr(config, "feature_maps", 0)
            if not maps:
                raise ConfigError("this execution runs learned feature maps, and the model has none: convert it "
                                  "first (secptune convert-attention --model ... --out DIR; then --model DIR)")
            ex = dataclasses.replace(self, rfa=dataclasses.replace(self.rfa, features=maps,
                                                                   window=getattr(config, "feature_window", 0)))
        ex.check(config)
        return ex

    def check(self, config) -> None:
        """Raise ConfigError where this execution cannot run ``config``."""
        bad = [i for i in self.softmax_layers if not 0 <= int(i) < config.num_hidden_layers]
        if bad:
            raise ConfigError(f"softmax_layers {bad} out of range for {config.num_hidden_layers} layers")
        self.approx.activation(config.hidden_act)  # fail early on an unsupported activation
        if self.attention != "rfa" or self.rfa.kind != "learned":
            return
        if config.family != "llama":
            raise ConfigError("learned RFA feature maps are implemented for llama-family decoders only")
        if self.rfa.features != getattr(config, "feature_maps", 0):
            raise ConfigError(f"learned RFA with {self.rfa.features} features, but the model carries "
                              f"{getattr(config, 'feature_maps', 0) or 'no'} learned feature maps "
                              "(run secptune convert-attention)")
        if self.rfa.window != getattr(config, "feature_window", 0):
            raise ConfigError(f"learned RFA with window {self.rfa.window}, but the maps were fitted with window "
                              f"{config.feature_window}")


class ArchConfig:
    """Shared by the architecture dataclasses: head checks and the HF ``config.json`` round trip.

    Subclasses set ``family``, ``HF_EXTRA`` (constant keys ``to_hf`` adds) and may override
    ``_check_hf`` (what ``from_hf`` refuses) and ``_hf_defaults`` (keys HF may leave out)."""

    family = ""
    HF_EXTRA: dict = {}

    def _check_heads(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def _check_hf(cls, d: dict) -> None:
        pass

    @classmethod
    def _hf_defaults(cls, d: dict) -> dict:
        return {}

    @classmethod
    def from_hf(cls, d: dict, **overrides):
        """Build from an HF ``config.json`` dict; unknown keys are ignored."""
        cls._check_hf(d)
        keys = {f.name for f in dataclasses.fields(cls)}
        kw = {**cls._hf_defaults(d), **{k: v for k, v in d.items() if k in keys}}
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """The HF ``config.json`` dict: every field, plus the family's constant keys."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **self.HF_EXTRA,
                **self._hf_extra()}

    def _hf_extra(self) -> dict:
        return {}
