"""One registry type for every pluggable part: crossovers, mutations, aggregations, skills.

A part registers itself where it is defined, by decorator, with the source it follows
(mergekit's ``easy_define`` style; ``mergekit/merge_methods/registry.py`` keeps one dict)::

    @CROSSOVERS.register("linear", source="CycleQD paper §3.2; official ModelwiseLinearMerge",
                         svd_genome=True)
    def linear(mu: float = 0.0, sigma: float = 0.01) -> LinearCrossover: ...

and is looked up by name only through its :class:`Registry`:

* :meth:`Registry.check` -- the name exists and the parameters fit, without building anything
  heavy (``cycleqd validate``): unknown keys (with a did-you-mean), missing required ones,
  paths that do not exist, and the part's own checker (operators: built once without any
  tensor, which runs their range checks; lm-eval: the task name).
* :meth:`Registry.build` -- the object, given the parameters from the config and the context
  the caller supplies (experts, base weights, skill name ...).

Both raise :class:`ConfigError` whose message names the config field
(``operators.mutation.rate: must be >= 0, got -0.1``).

Importing this module (and :mod:`cycleqd.ops`, which fills the operator registries) does not
import torch: the operator modules bind torch lazily (:mod:`cycleqd._lazy`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cycleqd._lazy import _LazyModule
from cycleqd.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    """One registered part.

    Attributes:
        name: the name configs use.
        kind: the registry's kind (``crossover``, ``mutation``, ``aggregation``, ``skill``).
        factory: a callable (function or class) building the part from keyword arguments.
        source: what it follows (paper section, official file, mergekit, AgentBench ...).
        svd_genome: operators only: it keeps every child in the compact SVD genome family
            (:mod:`cycleqd.ops.genome`): a crossover whose child is ``sum_i w_i tau_i`` with
            the weights from ``prepare``, or a mutation along the experts' SVD bases.
        context: parameters the builder supplies (experts, base weights, skill name ...),
            never set in a config.
        preset: parameters fixed by the registration (``CodingSkill`` as ``mbpp``:
            ``dataset="mbpp"``).
        paths: parameters that name files or folders that must exist when given.
        checker: ``checker(params)`` raising ValueError for a value the signature cannot
            express, without building anything heavy (e.g. an unknown lm-eval task).
        dry_build: build the part once with its config parameters only (no context) to run
            its own range checks: for parts whose construction allocates nothing (operators).
        dry_context: stand-ins for context parameters that construction insists on (slerp's
            base weights: ``{}``), used by that dry build only.
        extra: the keys a factory's ``**kwargs`` accepts (``("lambda",)``); None: any.
    """

    name: str
    kind: str
    factory: Callable[..., Any]
    source: str
    svd_genome: bool = False
    context: tuple[str, ...] = ()
    preset: Mapping[str, Any] = field(default_factory=dict)
    paths: tuple[str, ...] = ()
    checker: Callable[[Mapping[str, Any]], None] | None = None
    dry_build: bool = False
    dry_context: Mapping[str, Any] = field(default_factory=dict)
    extra: tuple[str, ...] | None = None

    def accepts(self) -> tuple[dict[str, Any], bool]:
        """(named parameters a config may set, whether any other key is accepted): a factory
        with ``**kwargs`` accepts exactly ``extra`` when declared (``lambda``, a Python
        keyword), anything when not."""
        sig = self.parameters()
        named = {k: p for k, p in sig.items() if p.kind is not p.VAR_KEYWORD}
        if len(named) < len(sig) and self.extra is not None:
            named.update({k: types.SimpleNamespace(name=k, default=None) for k in self.extra})
            return named, False
        return named, len(named) < len(sig)

    def hints(self) -> dict[str, Any]:
        """Parameter -> annotation, evaluated without importing torch (a lazily bound
        module's names read as ``typing.Any``; an annotation that fails to evaluate: Any)."""
        fn = self.factory.__init__ if isinstance(self.factory, type) else self.factory
        fn = inspect.unwrap(fn)
        ns = {k: (_AnyNames() if isinstance(v, _LazyModule) else v)
              for k, v in getattr(fn, "__globals__", {}).items()}
        out: dict[str, Any] = {}
        for k, p in inspect.signature(self.factory).parameters.items():
            ann = p.annotation
            if isinstance(ann, str):
                try:
                    ann = eval(ann, ns)  # noqa: S307 - the factory's own annotation text
                except Exception:
                    ann = Any
            out[k] = Any if ann is inspect.Parameter.empty else ann
        return out

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The parameters a config may set: the factory's, less ``self``, context and preset."""
        skip = set(self.context) | set(self.preset) | {"self"}
        return {k: p for k, p in inspect.signature(self.factory).parameters.items()
                if k not in skip and p.kind not in (p.VAR_POSITIONAL,)}


class _AnyNames:
    """Stands for a lazily imported module while annotations are evaluated: every name is Any."""

    def __getattr__(self, name: str) -> Any:
        return Any


#: ``<op>.<param>=<value>: <why>``: how operator constructors word a bad value
_OP_MSG = re.compile(r"^[\w.]*?\.?(?P<param>[A-Za-z_]\w*)=(?P<value>.*?): (?P<why>.*)$", re.S)


class Registry(Mapping[str, Callable[..., Any]]):
    """Name -> :class:`Entry` for one kind of part; read as a mapping it gives the factories
    (``registry["linear"](sigma=0.1)``, ``"ties" in registry``, ``sorted(registry)``).

    Args:
        kind: what is registered (used in messages).
        modules: modules whose import registers the built-in parts; imported on the first
            lookup, so a registry is complete however it is reached.
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._modules = modules
        self._loaded = not modules
        self._entries: dict[str, Entry] = {}

    # --- registration --------------------------------------------------------------------
    def register(self, name: str, *, source: str, svd_genome: bool = False,
                 context: tuple[str, ...] = (), preset: Mapping[str, Any] | None = None,
                 paths: tuple[str, ...] = (), checker: Callable[[Mapping[str, Any]], None] | None = None,
                 dry_build: bool | None = None, dry_context: Mapping[str, Any] | None = None,
                 extra: tuple[str, ...] | None = None) -> Callable[[Callable], Callable]:
        """Decorator: register the decorated factory (function or class) under ``name``.

        ``dry_build`` defaults to True for operators (crossover, mutation, aggregation) and
        False otherwise. See :class:`Entry` for the other arguments.

        Raises:
            ValueError: ``name`` is already registered, or ``source`` is empty.
        """
        if not source:
            raise ValueError(f"{self.kind} {name!r}: give the source it follows")
        dry = self.kind != "skill" if dry_build is None else dry_build

        def deco(factory: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, self.kind, factory, source, svd_genome, tuple(context),
                                        dict(preset or {}), tuple(paths), checker, dry,
                                        dict(dry_context or {}), None if extra is None else tuple(extra))
            return factory

        return deco

    def pop(self, name: str, default: Any = None) -> Any:
        """Unregister ``name``; its factory, or ``default`` when not registered (tests, plugins)."""
        self._load()
        e = self._entries.pop(name, None)
        return default if e is None else e.factory

    # --- lookup ----------------------------------------------------------------------------
    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for m in self._modules:
                importlib.import_module(m)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def entry(self, name: str, field: str | None = None) -> Entry:
        """The entry of ``name``.

        Raises:
            ConfigError: unknown name (``<field>.name: unknown ...; did you mean ...``).
        """
        self._load()
        if name not in self._entries:
            where = f"{field or self.kind}.name"
            raise ConfigError(f"{where}: unknown {self.kind} {name!r}{_did_you_mean(name, self._entries)}; "
                              f"registered: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def declares_svd_genome(self, name: str | None) -> bool:
        """``name`` is registered with ``svd_genome=True`` (False for an unknown name)."""
        self._load()
        return name in self._entries and self._entries[name].svd_genome

    def __getitem__(self, name: str) -> Callable[..., Any]:
        self._load()
        return self._entries[name].factory

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

    # --- check and build -------------------------------------------------------------------
    def check(self, name: str, params: Mapping[str, Any] | None = None, /, *,
              field: str | None = None) -> None:
        """Check that ``name`` is registered and ``params`` fit it, building nothing heavy.

        Checks, in order: the name; every key is a parameter (did-you-mean for a misspelt
        one); values of parameters annotated with plain bool/int/float/str (or unions of them,
        None included) have such a type; no required parameter is missing; every path
        parameter exists; the entry's ``checker``; for operators, one build without context
        (their own range checks).

        Raises:
            ConfigError: the first problem, as ``<field>.<param>: <why>``.
        """
        e = self.entry(name, field)
        params = dict(params or {})
        where = field or self.kind
        named, accepts_any = e.accepts()
        for key in params:
            if key not in named and not accepts_any:
                raise ConfigError(f"{where}.{key}: {name!r} takes no argument {key!r}"
                                  f"{_did_you_mean(key, named)}; it takes {', '.join(named) or 'none'}")
        hints = e.hints()
        for key, value in params.items():
            want = _simple_types(hints.get(key, Any))
            if want is not None and not _is_instance(value, want):
                names = " | ".join("None" if t is type(None) else t.__name__ for t in want)
                raise ConfigError(f"{where}.{key}: expected {names}, got {value!r} ({type(value).__name__})")
        missing = [k for k, p in named.items() if p.default is inspect.Parameter.empty and k not in params]
        if missing:
            raise ConfigError(f"{where}.{missing[0]}: {name!r} needs this parameter")
        for key in e.paths:
            value = params.get(key)
            if value is not None and not Path(str(value)).expanduser().exists():
                raise ConfigError(f"{where}.{key}: {str(value)!r} does not exist")
        try:
            if e.checker is not None:
                e.checker(params)
            if e.dry_build:
                e.factory(**e.preset, **params, **e.dry_context)
        except (TypeError, ValueError) as err:
            msg = str(err).splitlines()[0] if str(err) else ""
            key = re.split(r"[\s:]", msg, maxsplit=1)[0]
            if field and key in params:   # a checker's "<param> must be ...": name the param's field
                raise ConfigError(f"{where}.{key}: {msg.removeprefix(key + ': ')}") from None
            raise ConfigError(_field_message(where, name, err, field)) from None

    def build(self, name: str, params: Mapping[str, Any] | None = None, /, *, field: str | None = None,
              **context: Any) -> Any:
        """Build ``name`` from config ``params`` plus ``context`` (the entry's context
        parameters that the factory takes; others are ignored).

        Raises:
            ConfigError: unknown name or parameters that do not fit (field path named), or a
                ValueError/TypeError of the factory, reworded with the field path.
        """
        e = self.entry(name, field)
        params = dict(params or {})
        where = field or self.kind
        sig = inspect.signature(e.factory).parameters
        named, accepts_any = e.accepts()
        for key in params:
            if key in e.context or key in e.preset:
                raise ConfigError(f"{where}.{key}: set by cycleqd, not in a config")
            if key not in named and not accepts_any:
                raise ConfigError(f"{where}.{key}: {name!r} takes no argument {key!r}"
                                  f"{_did_you_mean(key, named)}; it takes {', '.join(named) or 'none'}")
        given = {k: v for k, v in context.items() if k in sig and k in e.context}
        try:
            return e.factory(**e.preset, **params, **given)
        except TypeError as err:
            raise ConfigError(_field_message(where, name, err, field)) from None
        except ValueError as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(_field_message(where, name, err, field)) from None


_SIMPLE = (bool, int, float, str, type(None))


def _simple_types(tp: Any) -> tuple[type, ...] | None:
    """The types an annotation made only of bool/int/float/str/None (and unions of them)
    admits; None for anything richer (sequences, paths, objects: left to the part)."""
    if tp in _SIMPLE:
        return (tp,)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if all(a in _SIMPLE for a in args):
            return tuple(args)
    return None


def _is_instance(value: Any, want: tuple[type, ...]) -> bool:
    if isinstance(value, bool):               # a bool is an int in Python, not in a config
        return bool in want
    if isinstance(value, int) and float in want:
        return True
    return isinstance(value, want)


def _did_you_mean(word: str, choices: Mapping[str, Any] | list[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_message(where: str, name: str, err: Exception, field: str | None) -> str:
    """With a config ``field``: ``<field>.<param>: <why>, got <value>`` for an operator's
    ``<op>.<param>=<value>: <why>`` message; else ``<where>: <message>``."""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not field:
        return f"{where} {name!r}: {msg}"
    m = _OP_MSG.match(msg)
    if m:
        return f"{where}.{m['param']}: {m['why']}, got {m['value']}"
    return f"{where}: {msg}"


#: crossover operators (:mod:`cycleqd.ops.crossover`): parents' task vectors -> child's
CROSSOVERS = Registry("crossover", ("cycleqd.ops.crossover",))
#: mutation operators (:mod:`cycleqd.ops.mutation`): child's task vector -> mutated one
MUTATIONS = Registry("mutation", ("cycleqd.ops.mutation",))
#: model aggregation methods (:mod:`cycleqd.ops.aggregation`): the archives' bests -> one model
AGGREGATIONS = Registry("aggregation", ("cycleqd.ops.aggregation",))
#: skill evaluators by config ``type`` (:mod:`cycleqd.skills`)
SKILLS = Registry("skill", ("cycleqd.skills.coding.skill", "cycleqd.skills.agentbench.dbbench",
                            "cycleqd.skills.agentbench.os_interaction", "cycleqd.skills.lmeval",
                            "cycleqd.skills.synthetic"))


def svd_genome_compatible(crossover: str | None, mutation: str | None) -> bool:
    """True when crossover ``crossover`` and mutation ``mutation`` (registered names) keep
    every child in the compact SVD genome family, as declared at registration
    (``svd_genome``). The one place that decides it; an unknown name: False."""
    return CROSSOVERS.declares_svd_genome(crossover) and MUTATIONS.declares_svd_genome(mutation)
