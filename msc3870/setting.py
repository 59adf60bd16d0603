"""How one setting of the app is declared (the settings themselves are in ``conf.py``).

A ``Setting`` is a class attribute of ``conf.MSC3870Settings``: its ``Kind`` (the type its
value must have), default, whether None is allowed, whether a misread weakens a defence,
the bounds the value checks hold it to, and the ``Env`` variable the deployable project
reads it from. Read on an instance it gives the typed value, taken from the ``MSC3870``
dict of Django settings on every access (so ``override_settings`` works in tests).

A ``Kind`` says three things of a type: how a value is checked (``manage.py check``, one
check id per kind, ``checks.py``), how it is read (the typed value the code uses) and how
it is parsed from the text of an environment variable.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, Literal, Never, TypedDict, TypeVar, Unpack, overload

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

T = TypeVar("T")
V = TypeVar("V")

# Text of an environment variable and the setting's default -> the value put in MSC3870.
EnvParser = Callable[[str, Any], Any]
# Name of the setting and its raw value -> the typed value the code uses.
Reader = Callable[[str, Any], T]


# ---------------------------------------------------------------------- reading


def str_list(name: str, value: Any) -> list[str]:
    """A list of strings. A bare string would be read as a list of its characters (an
    allowlist of "image/*" allowing everything matching "*"): refused, so screening fails
    (and is retried) rather than passing on a misread policy."""
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ImproperlyConfigured(f"MSC3870[{name!r}] must be a list of strings.")
    return list(value)


def cidr_list(name: str, value: Any) -> list[str]:
    """A list of CIDRs; a bare string would be read as a list of characters."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ImproperlyConfigured(f"MSC3870[{name!r}] must be a list of CIDR strings.")
    return [str(item) for item in value]


def imported(name: str, path: Any) -> Any:
    try:
        return import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"MSC3870[{name!r}] = {path!r} could not be imported: {exc}"
        ) from exc


def imported_list(name: str, value: Any) -> list[Callable[..., Any]]:
    found = []
    for path in str_list(name, value):
        try:
            found.append(import_string(path))
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"MSC3870[{name!r}] entry {path!r} could not be imported: {exc}"
            ) from exc
    return found


def aware_datetime(name: str, value: Any) -> datetime:
    """An aware datetime or an ISO 8601 string with a time zone. A naive time would be
    compared in whatever zone the process runs in."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            value = None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ImproperlyConfigured(f"MSC3870[{name!r}] must be None or a timezone-aware datetime.")
    return value


def key_servers(name: str, value: Any) -> list[dict[str, Any]]:
    servers = value or []
    if not isinstance(servers, list | tuple) or not all(
        isinstance(s, dict)
        and isinstance(s.get("server_name"), str)
        and isinstance(s.get("verify_keys"), dict)
        and s["verify_keys"]
        for s in servers
    ):
        raise ImproperlyConfigured(
            f"MSC3870[{name!r}] must be a list of "
            '{"server_name": str, "verify_keys": {key_id: base64 key}}.'
        )
    return list(servers)


def oembed_providers(name: str, value: Any) -> list[dict[str, Any]]:
    if not is_oembed_providers(value):
        raise ImproperlyConfigured(
            f"MSC3870[{name!r}] must be a list of oEmbed providers: "
            '{"provider_name": str, "endpoints": [{"schemes": [str], "url": str}]}.'
        )
    return list(value)


# ----------------------------------------------------------------- type checks


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int too


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_str_list(value: Any) -> bool:
    # A bare string iterates as its characters: "image/*" would allow "*".
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)


def is_import_string(value: Any) -> bool:
    return isinstance(value, str) and "." in value.strip(".")


def is_datetime(value: Any) -> bool:
    if not isinstance(value, str | datetime):
        return False
    try:
        aware_datetime("", value)
    except ImproperlyConfigured:
        return False
    return True


def is_key_servers(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(
        isinstance(s, dict)
        and isinstance(s.get("server_name"), str)
        and isinstance(s.get("verify_keys"), dict)
        and s["verify_keys"]
        and all(isinstance(k, str) and isinstance(v, str) for k, v in s["verify_keys"].items())
        for s in value
    )


def is_oembed_providers(value: Any) -> bool:
    """oembed.com's providers.json: providers, each with endpoints, each with an endpoint
    URL and the URL schemes (globs) it answers for."""

    def endpoint_ok(endpoint: Any) -> bool:
        return (
            isinstance(endpoint, dict)
            and isinstance(endpoint.get("url"), str)
            and is_str_list(endpoint.get("schemes", []))
            and is_str_list(endpoint.get("formats", []))
        )

    return isinstance(value, list | tuple) and all(
        isinstance(provider, dict)
        and isinstance(provider.get("provider_name", ""), str)
        and isinstance(provider.get("endpoints"), list | tuple)
        and all(endpoint_ok(e) for e in provider["endpoints"])
        for provider in value
    )


# ------------------------------------------------------ environment variables


def text(value: str, default: Any) -> str:
    return value


def integer(value: str, default: Any) -> int:
    return int(value)


def number(value: str, default: Any) -> float:
    return float(value)


def flag(value: str, default: Any) -> Any:
    """On with "1", off with "0"; any other text leaves the default (as it always has)."""
    return {"1": True, "0": False}.get(value, default)


def comma_separated(value: str, default: Any) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def json_value(value: str, default: Any) -> Any:
    return json.loads(value)


def zero_is_none(parse: EnvParser) -> EnvParser:
    """Off (None) with "0": a rate, a quota, a bound."""

    def parse_or_none(value: str, default: Any) -> Any:
        parsed = parse(value, default)
        return None if parsed in (0, "0") else parsed

    return parse_or_none


def constant(value: Any) -> EnvParser:
    """Whatever the variable says, this value (a variable that switches another setting)."""
    return lambda text, default: value


# The project's variable for a setting, unless its Env names another.
ENV_PREFIX = "MSC3870_"


@dataclass(frozen=True)
class Env:
    """The environment variable the deployable project reads a setting from: ``var``, by
    default ``MSC3870_<setting name>``.

    Unset (or empty), the setting stays out of the dict and the app's default applies,
    unless ``always`` puts the default in. ``only_with`` names another variable without
    which this one is not read at all.
    """

    var: str = ""
    parse: EnvParser | None = None  # None: the kind's parser
    always: bool = False
    only_with: str | None = None


# ------------------------------------------------------------------------ kinds


@dataclass(frozen=True)
class Kind(Generic[T]):
    """A type a setting can have: the check id reporting a value of another type, how a
    value is read, and how the text of an environment variable is parsed."""

    id: str
    description: str
    accepts: Callable[[Any], bool]
    read: Reader[T]
    parse: EnvParser = text


INT: Kind[int] = Kind("msc3870.E012", "an integer", is_int, lambda _, v: int(v), integer)
NUMBER: Kind[float] = Kind("msc3870.E013", "a number", is_number, lambda _, v: float(v), number)
BOOL: Kind[bool] = Kind(
    "msc3870.E014", "True or False", lambda v: isinstance(v, bool), lambda _, v: bool(v), flag
)
STR: Kind[str] = Kind("msc3870.E015", "a string", lambda v: isinstance(v, str), lambda _, v: str(v))
STR_LIST: Kind[list[str]] = Kind(
    "msc3870.E016", "a list of strings", is_str_list, str_list, comma_separated
)
IMPORT_STRING: Kind[Callable[..., Any]] = Kind(
    "msc3870.E017", "an import string ('package.module.name')", is_import_string, imported
)
IMPORT_STRING_LIST: Kind[list[Callable[..., Any]]] = Kind(
    "msc3870.E018",
    "a list of import strings",
    lambda v: is_str_list(v) and all(is_import_string(item) for item in v),
    imported_list,
    comma_separated,
)
DATETIME: Kind[datetime] = Kind(
    "msc3870.E019",
    "a timezone-aware datetime (or an ISO 8601 string with a time zone)",
    is_datetime,
    aware_datetime,
)
KEY_SERVERS: Kind[list[dict[str, Any]]] = Kind(
    "msc3870.E020",
    'a list of {"server_name": str, "verify_keys": {key id: base64 key}}',
    is_key_servers,
    key_servers,
    json_value,
)
PATH: Kind[str] = Kind(
    "msc3870.E021",
    "a file path (str or os.PathLike)",
    lambda v: isinstance(v, str | os.PathLike),
    lambda _, v: str(v),
)
OEMBED_PROVIDERS: Kind[list[dict[str, Any]]] = Kind(
    "msc3870.E030",
    'a list of oEmbed providers ({"provider_name": str, "endpoints": [{"schemes": [str], '
    '"url": str}]})',
    is_oembed_providers,
    oembed_providers,
    json_value,
)
KINDS = (
    INT,
    NUMBER,
    BOOL,
    STR,
    STR_LIST,
    IMPORT_STRING,
    IMPORT_STRING_LIST,
    DATETIME,
    KEY_SERVERS,
    PATH,
    OEMBED_PROVIDERS,
)


# --------------------------------------------------------------------- settings


class Options(TypedDict, total=False):
    security: bool  # a misread weakens a defence: its type error is under Tags.security
    env: Env
    floor: float  # read as at least this (a value below is taken as the floor, unreported)
    must_be: Literal["positive", "non-negative"]  # else msc3870.E006
    choices: tuple[str, ...]  # else msc3870.E007


class Setting(Generic[T]):
    """One setting: declared once, read typed: by its own ``read`` (given every value, None
    included), else as its kind says (None staying None where it is allowed)."""

    name: str

    @overload
    def __init__(
        self: Setting[V],
        kind: Kind[V],
        default: Any,
        *,
        null: Literal[False] = False,
        read: None = None,
        **options: Unpack[Options],
    ) -> None: ...

    @overload
    def __init__(
        self: Setting[V | None],
        kind: Kind[V],
        default: Any,
        *,
        null: Literal[True],
        read: None = None,
        **options: Unpack[Options],
    ) -> None: ...

    @overload
    def __init__(
        self: Setting[V],
        kind: Kind[Any],
        default: Any,
        *,
        null: bool = False,
        read: Reader[V],
        **options: Unpack[Options],
    ) -> None: ...

    def __init__(
        self,
        kind: Kind[Any],
        default: Any,
        *,
        null: bool = False,
        read: Reader[Any] | None = None,
        **options: Unpack[Options],
    ) -> None:
        self.kind = kind
        self.default = default
        self.nullable = null  # None is allowed (and means "off" or "the default")
        self.reader = read
        self.security = options.get("security", False)
        self.env = options.get("env")
        self.floor = options.get("floor")
        self.must_be = options.get("must_be")
        self.choices = options.get("choices", ())

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        if self.env is not None and not self.env.var:
            self.env = replace(self.env, var=ENV_PREFIX + name)

    def __repr__(self) -> str:
        return f"<Setting {getattr(self, 'name', '?')}>"

    def read(self, raw: Any) -> T:
        """The typed value of ``raw`` (a value given in ``settings.MSC3870``, or the default)."""
        if self.reader is not None:
            value = self.reader(self.name, raw)  # it reads None too: None may mean a default
        elif raw is None and self.nullable:
            return None  # type: ignore[return-value]  # T includes None when nullable
        else:
            value = self.kind.read(self.name, raw)
        if self.floor is not None and value is not None:
            value = max(type(value)(self.floor), value)  # an int stays an int
        return value  # type: ignore[no-any-return]

    @overload
    def __get__(self, instance: None, owner: type) -> Setting[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> Setting[T] | T:
        if instance is None:
            return self
        user = getattr(settings, "MSC3870", None) or {}
        if not isinstance(user, dict):
            raise ImproperlyConfigured("MSC3870 must be a dict.")
        return self.read(user.get(self.name, self.default))

    def __set__(self, instance: object, value: Never) -> None:
        raise AttributeError(f"{self.name} is read from settings.MSC3870: override that.")

    def accepts(self, value: Any) -> bool:
        """The type check: is ``value`` of this setting's kind (or an allowed None)?"""
        return (value is None and self.nullable) or self.kind.accepts(value)

    def from_environment(
        self, environ: Mapping[str, str], default: Any, *, always: bool = False
    ) -> tuple[bool, Any]:
        """(whether the setting goes in the MSC3870 dict, its value) from ``environ``."""
        env = self.env
        if env is None or (env.only_with and not environ.get(env.only_with)):
            return False, None
        given = environ.get(env.var) or None  # empty is unset
        if given is None:
            return env.always or always, copy.deepcopy(default)  # never the defaults' list
        parse = env.parse or self.kind.parse
        try:
            return True, parse(given, default)
        except ValueError as exc:  # json's errors are ValueErrors too
            raise ImproperlyConfigured(
                f"{env.var}={given!r} (MSC3870[{self.name!r}]) is not "
                f"{self.kind.description}: {exc}"
            ) from exc


def settings_of(owner: type) -> dict[str, Setting[Any]]:
    """The settings declared on ``owner``, by name, in the order of declaration."""
    return {name: value for name, value in vars(owner).items() if isinstance(value, Setting)}


def from_environment(
    declared: Iterable[Setting[Any]], environ: Mapping[str, str], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """The MSC3870 dict ``environ`` gives. ``defaults`` replace the app's defaults of
    settings read from the environment, and such a setting is always in the dict."""
    declared = list(declared)
    unknown = set(defaults) - {s.name for s in declared if s.env is not None}
    if unknown:
        raise ImproperlyConfigured(
            f"Defaults for settings not read from the environment: {', '.join(sorted(unknown))}"
        )
    result: dict[str, Any] = {}
    for setting in declared:
        present, value = setting.from_environment(
            environ,
            defaults.get(setting.name, setting.default),
            always=setting.name in defaults,
        )
        if present:
            result[setting.name] = value
    return result
