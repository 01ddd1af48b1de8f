"""The export definitions: one JSON document, validated as a whole, listing every export this app runs.

```json
{"connections": [{"name": "marketing-eu", "secretName": "autopilot-eu-key", "requestsPerSecond": 5}],
 "exports": [{
  "name": "high-value", "enabled": true, "dataTransferAcknowledged": true,
  "source": {"connection": "EXPORT_STORAGE", "container": "ciexports", "prefix": "", "segment": "HighValueSegment"},
  "destination": {"connection": "marketing-eu", "membership": "list", "list": "High value customers",
                  "onLeave": "remove"},
  "fields": {"Email": "PrimaryEmail", "FirstName": "FirstName"},
  "customFields": [{"name": "Loyalty Points", "type": "integer", "column": "LoyaltyPoints"}],
  "maxProfiles": 100000
}]}
```

`connections` is optional: the connection "default" (the app settings' API key, URL and rate) always exists and
is what an export without `destination.connection` uses. An Ortto connection (`"platform": "ortto"`) may name its
`region`, its `plan` (which sets the rate) and a `phoneRegion` for its exports' local phone numbers; an Ortto export
may name its own `phoneRegion` and, in `destination.newPeople`, the email permission of the people it creates.
Every problem in the document is collected and reported at once, each naming the export and the JSON path, so one
edit fixes them all. `enabled: false` only keeps the export off the timer; an on-demand run still works.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import phonenumbers

from shared.runtime.settings import DEFAULT_BASE_URL
from shared.source import ortto_fields

STANDARD_FIELDS = (
    "Email", "FirstName", "LastName", "Salutation", "Company", "NumberOfEmployees", "Title", "Industry", "Phone",
    "MobilePhone", "Fax", "Website", "MailingStreet", "MailingCity", "MailingState", "MailingPostalCode",
    "MailingCountry", "LeadSource", "Status", "LinkedIn", "Twitter", "owner_name",
)
CUSTOM_TYPES = ("string", "text", "integer", "float", "boolean", "date")  # text: Ortto only (4,000 characters)
DEFAULT_CONNECTION = "EXPORT_STORAGE"
DEFAULT_MAX_PROFILES = 100_000
DEFAULT_MAX_REMOVAL_PERCENT = 20  # a run removing more of the acknowledged members than this stops (unless forced)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# An app setting name (the Functions host also accepts `__` sections, which this allows).
SETTING_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Azure container names: 3-63 of lower-case letters, digits and single hyphens, not starting/ending with one.
CONTAINER_RE = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")

EXPORT_KEYS = ("name", "enabled", "dataTransferAcknowledged", "source", "destination", "fields", "customFields",
               "maxProfiles", "maxRemovalPercent", "phoneRegion")
SOURCE_KEYS = ("connection", "container", "prefix", "segment")
DESTINATION_KEYS = ("connection", "membership", "list", "field", "onLeave", "newPeople")
NEW_PEOPLE_KEYS = ("emailPermission",)
CONNECTION_KEYS = ("name", "platform", "region", "plan", "secretName", "requestsPerSecond", "baseUrl", "phoneRegion")
PLATFORMS = ("autopilot", "ortto")
ORTTO_REGIONS = {"us": "https://api.ap3api.com/v1", "eu": "https://api.eu.ap3api.com/v1",
                 "au": "https://api.au.ap3api.com/v1"}
# A connection's key goes with every request to its baseUrl, and the console's Admins edit the definitions: a
# baseUrl may name the platforms' own APIs over https, or a host the deployer lists in app setting ALLOWED_API_HOSTS
# (a proxy; the simulators, locally), never anywhere else.
PLATFORM_HOSTS = tuple(urlsplit(url).hostname for url in (DEFAULT_BASE_URL, *ORTTO_REGIONS.values()))
# Ortto's plans and their sustained rates, requests/s (docs/api-contracts.md). Sending at
# the sustained rate is safe because the budget spaces requests (1 + margin) / rate apart: with its margin no 1-s
# window ever holds more than the sustained rate, so no 10-s window holds more than 10 x rate and no 60-s window
# more than 60 x rate (a little fewer, by the margin), which keeps every window under the plan's two caps (Free 20
# and 60, Campaigns 100 and 300, Professional 200 and 600, Business 600 and 1,800). The custom-field calls take
# slots of the same budget; another application using the same account is not counted: give requestsPerSecond
# below the plan's rate then.
PLAN_RATES = {"free": 1.0, "campaigns": 5.0, "professional": 10.0, "business": 30.0}
ORTTO_DEFAULT_PLAN = "professional"  # an Ortto connection naming neither plan nor requestsPerSecond: as before
ORTTO_DEFAULT_RATE = PLAN_RATES[ORTTO_DEFAULT_PLAN]
# What new Ortto people get for email permission (destination.newPeople.emailPermission): Ortto's own default
# (subscribed), none, or the value of a consent column.
EMAIL_PERMISSIONS = ("ortto-default", "false", "column")
SECRET_NAME_RE = re.compile(r"[0-9A-Za-z-]{1,127}")  # Key Vault's rule for secret names
CUSTOM_KEYS = ("name", "type", "column")


DEFAULT_ACCOUNT = "default"


@dataclass(frozen=True)
class Connection:
    """One destination account as the definitions name it (`connections`): its platform (Autopilot, or Ortto in a
    region), the Key Vault secret holding its API key, its API's base URL and the request rate it allows; None
    fields take the app settings' values (an Ortto account's URL and rate: its region's and its plan's). The one
    named "default" always exists and is the app settings' Autopilot account, so a document without
    `connections` works as before."""

    name: str = DEFAULT_ACCOUNT
    secret_name: str | None = None
    base_url: str | None = None
    rate: float | None = None
    platform: str = "autopilot"
    region: str | None = None  # Ortto's: us, eu or au
    plan: str | None = None  # Ortto's plan (PLAN_RATES), which sets the rate when requestsPerSecond does not

    @property
    def ortto(self) -> bool:
        return self.platform == "ortto"

    def public(self) -> dict:
        shown = {"name": self.name, "secretName": self.secret_name, "baseUrl": self.base_url,
                 "requestsPerSecond": self.rate, "platform": self.platform if self.ortto else None,
                 "region": self.region, "plan": self.plan}
        return {key: value for key, value in shown.items() if value is not None}

    def text(self) -> str:
        """As a run record keeps it: the run sends to the connection it was planned for."""
        return json.dumps(self.public(), sort_keys=True)

    @classmethod
    def from_text(cls, text: str) -> Connection:
        data = json.loads(text) if text else {}
        return cls(data.get("name", DEFAULT_ACCOUNT), data.get("secretName"), data.get("baseUrl"),
                   data.get("requestsPerSecond"), data.get("platform", "autopilot"), data.get("region"),
                   data.get("plan"))

    def resolved(self, secret_name: str, base_url: str, rate: float) -> Connection:
        """Every field filled: the connection's own values, else its platform's defaults, else the app settings'
        (given). An Ortto connection's rate is its plan's sustained rate (Professional's when it names none)."""
        if self.ortto:
            base_url, rate = ORTTO_REGIONS[self.region or "us"], PLAN_RATES[self.plan or ORTTO_DEFAULT_PLAN]
        return dataclasses.replace(self, secret_name=self.secret_name or secret_name,
                                   base_url=self.base_url or base_url, rate=self.rate or rate)


APP_SETTINGS_ACCOUNT = Connection()  # the "default" connection: the app settings' account


@dataclass(frozen=True)
class Located:
    """One problem, where it is: `at` the item ('exports[2] "news"', 'connections[0]', or "" for the document),
    `field` its JSON path within the item ("destination.list", or ""), and what is wrong."""

    at: str
    field: str
    message: str

    def public(self) -> dict:
        return {"at": self.at, "field": self.field, "message": self.message}


class ExportConfigError(ValueError):
    """The export definitions cannot be used as written; `problems` lists each fix needed, as text, and `located`
    the same problems as Located (an editor shows each beside its field)."""

    def __init__(self, message: str, problems: list[str] | None = None, located: list[Located] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]
        self.located = list(located) if located is not None else [Located("", "", p) for p in self.problems]


def typed_key(kind: str, name: str) -> str:
    """Autopilot's custom field key: `<type>--<words joined by -->`, e.g. `boolean--In--High--Value--Segment`."""
    return "--".join([kind, *name.split()])


@dataclass(frozen=True)
class CustomField:
    name: str
    type: str
    column: str

    @property
    def key(self) -> str:
        return typed_key(self.type, self.name)


@dataclass(frozen=True)
class ExportDefinition:
    """One validated export (attribute order follows the document; only `name` has no default)."""

    name: str
    enabled: bool = True  # false keeps it off the timer only
    acknowledged: bool = False  # dataTransferAcknowledged
    connection: str = DEFAULT_CONNECTION  # the app setting naming the export's storage
    container: str = ""
    prefix: str = ""
    segment: str = ""
    membership: str = "list"
    list: str | None = None
    field: str | None = None
    on_leave: str = "remove"
    # destination.newPeople.emailPermission (Ortto only): "ortto-default", "false" or "column" (then the column).
    email_permission: str = "ortto-default"
    email_permission_column: str | None = None
    fields: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)  # Autopilot field -> column
    custom_fields: tuple[CustomField, ...] = ()
    max_profiles: int = DEFAULT_MAX_PROFILES
    max_removal_percent: float = DEFAULT_MAX_REMOVAL_PERCENT
    phone_region: str | None = None  # Ortto only: the export's phoneRegion, else its connection's
    account: Connection = APP_SETTINGS_ACCOUNT  # destination.connection: the Autopilot account it sends to

    @property
    def membership_key(self) -> str | None:
        """The boolean custom field that carries membership in field mode; None in list mode."""
        return typed_key("boolean", self.field) if self.membership == "field" and self.field else None

    def check_runnable(self) -> None:
        if self.acknowledged is not True:
            raise ExportConfigError(
                f'export "{self.name}" may not run yet: sending its profiles to Autopilot moves customer data '
                "outside the Customer Insights compliance boundary. Once your Customer Insights admin has agreed "
                'to that, set "dataTransferAcknowledged": true on this export in the export definitions '
                "(app setting EXPORTS or the blob named by EXPORTS_BLOB)."
            )

    def public(self) -> dict:
        """The definition in the document's own JSON shape (connection settings are named, never resolved)."""
        destination: dict[str, Any] = {"connection": self.account.name, "membership": self.membership}
        if self.membership == "list":
            destination["list"] = self.list
        else:
            destination["field"] = self.field
        destination["onLeave"] = self.on_leave
        if self.email_permission != "ortto-default":
            destination["newPeople"] = {"emailPermission": self._email_permission_value()}
        shown = {
            "name": self.name, "enabled": self.enabled, "dataTransferAcknowledged": self.acknowledged,
            "source": {"connection": self.connection, "container": self.container, "prefix": self.prefix,
                       "segment": self.segment},
            "destination": destination,
            "fields": dict(self.fields),
            "customFields": [{"name": c.name, "type": c.type, "column": c.column} for c in self.custom_fields],
            "maxProfiles": self.max_profiles,
            "maxRemovalPercent": self.max_removal_percent,
        }
        if self.phone_region:
            shown["phoneRegion"] = self.phone_region  # (the connection's, when the export leaves it to that)
        return shown

    def _email_permission_value(self) -> str | bool | dict:
        """emailPermission as the document writes it."""
        if self.email_permission == "column":
            return {"column": self.email_permission_column}
        return False if self.email_permission == "false" else self.email_permission


# --- reading the document -------------------------------------------------------------------------
@dataclass(frozen=True)
class Definitions:
    """The whole document, validated: its exports and its connections ("default", the app settings' account,
    first, then the document's in its order)."""

    exports: tuple[ExportDefinition, ...]
    connections: tuple[Connection, ...]


def load_exports(env: Mapping[str, str], read_blob: Callable[[str, str], bytes]) -> tuple[ExportDefinition, ...]:
    """From app setting EXPORTS (the JSON text) if set, else the host-storage blob EXPORTS_BLOB names."""
    return load_definitions(env, read_blob).exports


def definitions_blob(env: Mapping[str, str]) -> tuple[str, str]:
    """(container, path) of the host-storage blob EXPORTS_BLOB names; ExportConfigError when it is not set right."""
    location = (env.get("EXPORTS_BLOB") or "").strip()
    if not location:
        raise ExportConfigError(
            "no export definitions: set app setting EXPORTS to the JSON document, or EXPORTS_BLOB to "
            "<container>/<path> of a blob holding it in the app's own storage (AzureWebJobsStorage)"
        )
    container, _, path = location.strip("/").partition("/")
    if not container or not path:
        raise ExportConfigError(f"app setting EXPORTS_BLOB must be <container>/<path>, got {location!r}")
    return container, path


def allowed_api_hosts(env: Mapping[str, str]) -> frozenset[str]:
    """The hosts app setting ALLOWED_API_HOSTS lists (comma-separated, any port) besides PLATFORM_HOSTS."""
    return frozenset(h.strip().lower() for h in (env.get("ALLOWED_API_HOSTS") or "").split(",") if h.strip())


def load_definitions(env: Mapping[str, str], read_blob: Callable[[str, str], bytes]) -> Definitions:
    """load_exports' document, with its connections too."""
    hosts = allowed_api_hosts(env)
    text = (env.get("EXPORTS") or "").strip()
    if text:
        return parse_definitions(text, "app setting EXPORTS", hosts)
    container, path = definitions_blob(env)
    from azure.core.exceptions import ResourceNotFoundError  # the edge: only this path touches the SDK

    try:
        data = read_blob(container, path)
    except ResourceNotFoundError:
        raise ExportConfigError(
            f"app setting EXPORTS_BLOB names blob {path!r} in container {container!r} of the app's storage, "
            "but it does not exist: upload the export definitions there or fix the setting"
        ) from None
    return parse_definitions(data, f"blob {container}/{path} (EXPORTS_BLOB)", hosts)


def parse_exports(document: str | bytes | dict, source: str = "EXPORTS",
                  api_hosts: frozenset[str] = frozenset()) -> tuple[ExportDefinition, ...]:
    """Validate the whole document; raise one ExportConfigError listing every problem. `api_hosts`: the hosts a
    connection's baseUrl may name besides the platforms' own (allowed_api_hosts)."""
    return parse_definitions(document, source, api_hosts).exports


def parse_definitions(document: str | bytes | dict, source: str = "EXPORTS",
                      api_hosts: frozenset[str] = frozenset()) -> Definitions:
    """parse_exports, returning the document's connections as well."""
    duplicates: list[str] = []
    if isinstance(document, bytes | bytearray):
        try:
            document = bytes(document).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ExportConfigError(f"{source} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if isinstance(document, str):
        document = _load_json(document, source, duplicates)
    checker = _Checker(api_hosts)
    for key in duplicates:
        checker.problem(f'key "{key}" appears twice in one object (JSON keeps only the last)')
    exports = checker.document(document)
    if checker.problems:
        count = len(checker.problems)
        lines = "\n".join(f"  - {p}" for p in checker.problems)
        raise ExportConfigError(f"{source}: {count} problem{'s' if count > 1 else ''} in the export definitions:\n"
                                f"{lines}", checker.problems, checker.located)
    return Definitions(exports, tuple(checker.accounts.values()))


def _load_json(text: str, source: str, duplicates: list[str]) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise ExportConfigError(
            f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(key: str, options: tuple[str, ...]) -> str:
    """` (did you mean "X"?)` for a key that differs from a known one in case or by a typo."""
    lowered = {o.lower(): o for o in options}
    match = lowered.get(key.lower()) or next(iter(difflib.get_close_matches(key, options, n=1, cutoff=0.8)), None)
    return f' (did you mean "{match}"?)' if match else ""


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _Checker:
    """Walks the document, collecting problems instead of stopping at the first."""

    def __init__(self, api_hosts: frozenset[str] = frozenset()) -> None:
        self.api_hosts = api_hosts
        self.problems: list[str] = []
        self.located: list[Located] = []  # the same problems, each with where it is
        self.where = ""
        self.accounts: dict[str, Connection] = {DEFAULT_ACCOUNT: Connection()}
        self.phone_regions: dict[str, str] = {}  # connection name -> its phoneRegion, the default of its exports

    def problem(self, text: str, path: str = "") -> None:
        prefix = f"{self.where}: " if self.where else ""
        self.problems.append(f"{prefix}{path}{' ' if path else ''}{text}")
        self.located.append(Located(self.where, path, text))

    # Typed getters: each returns the default (and records a problem) when the value is wrong.
    def obj(self, data: dict, key: str, path: str) -> dict:
        value = data.get(key)
        if value is None:
            self.problem("is required (an object)" if key not in data else "must be an object, got null", path)
            return {}
        if not isinstance(value, dict):
            self.problem(f"must be an object, got {_type_name(value)}", path)
            return {}
        return value

    def text(self, data: dict, key: str, path: str, default: str | None = None,
             allow_empty: bool = False) -> str | None:
        if key not in data:
            if default is None:
                self.problem("is required", path)
            return default
        value = data[key]
        if not isinstance(value, str):
            self.problem(f"must be a string, got {_type_name(value)} {_show(value)}", path)
            return default
        if not value.strip() and not allow_empty:
            self.problem("must not be empty", path)
            return default
        return value if allow_empty else value.strip()

    def flag(self, data: dict, key: str, path: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            self.problem(f"must be true or false, got {_show(value)}", path)
            return default
        return value

    def choice(self, data: dict, key: str, path: str, options: tuple[str, ...], default: str | None) -> str | None:
        value = self.text(data, key, path, default)
        if value is not None and value not in options:
            quoted = [f'"{o}"' for o in options]
            wanted = " or ".join(quoted) if len(quoted) == 2 else f"one of {', '.join(quoted)}"
            self.problem(f"must be {wanted}, got {_show(data[key])}", path)
            return default
        return value

    def phone_region(self, data: dict, path: str) -> str | None:
        """A phoneRegion: a region code phonenumbers knows (its metadata is what reads the numbers)."""
        if "phoneRegion" not in data:
            return None
        value = self.text(data, "phoneRegion", path)
        if value is not None and value not in phonenumbers.SUPPORTED_REGIONS:
            hint = f' (did you mean "{value.upper()}"?)' if value.upper() in phonenumbers.SUPPORTED_REGIONS else ""
            self.problem(f'must be a country\'s ISO 3166-1 alpha-2 code such as "AU", "GB" or "US"{hint}, got '
                         f"{_show(value)}", path)
            return None
        return value

    def unknown(self, data: dict, allowed: tuple[str, ...], path: str) -> None:
        for key in data:
            if key not in allowed:
                hint = _suggest(key, allowed)
                self.problem(f"is not a known key{hint}; known keys: {', '.join(allowed)}",
                             f"{path}.{key}" if path else key)

    # The document and its parts.
    def document(self, document: Any) -> tuple[ExportDefinition, ...]:
        if not isinstance(document, dict):
            self.problem(f'the document must be an object {{"exports": [...]}}, got {_type_name(document)}')
            return ()
        self.unknown(document, ("$schema", "connections", "exports"), "")  # ($schema: for editors, ignored)
        self.accounts = self.connections(document.get("connections", []))
        exports = document.get("exports")
        if not isinstance(exports, list):
            self.problem('"exports" is required: a list of export definitions' if exports is None
                         else f'"exports" must be a list, got {_type_name(exports)}')
            return ()
        result = [self.export(i, item) for i, item in enumerate(exports)]
        self._duplicates(exports)
        self._shared_destinations(result)
        return tuple(e for e in result if e is not None)

    def connections(self, items: Any) -> dict[str, Connection]:
        """The document's connections by name, with the default one the app settings give."""
        found = {DEFAULT_ACCOUNT: Connection()}
        if not isinstance(items, list):
            self.problem(f'"connections" must be a list, got {_type_name(items)}')
            return found
        for i, item in enumerate(items):
            self.where = f"connections[{i}]"
            if not isinstance(item, dict):
                self.problem(f"must be an object, got {_type_name(item)}")
                continue
            before = len(self.problems)
            self.unknown(item, CONNECTION_KEYS, "")
            name = self.text(item, "name", "name")
            if name is not None and not NAME_RE.fullmatch(name):
                self.problem(f"must be 1-63 lower-case letters, digits or hyphens, got {_show(name)}", "name")
            elif name in found:
                self.problem(f'"{name}" is already defined' if name != DEFAULT_ACCOUNT else
                             '"default" is the connection the app settings define (AUTOPILOT_BASE_URL, '
                             "AUTOPILOT_REQUESTS_PER_SECOND, AUTOPILOT_API_KEY_SECRET_NAME): choose another name",
                             "name")
            secret = self.text(item, "secretName", "secretName")
            if secret is not None and not SECRET_NAME_RE.fullmatch(secret):
                self.problem(f"must be a Key Vault secret name (1-127 letters, digits and hyphens), got "
                             f"{_show(secret)}", "secretName")
            rate = item.get("requestsPerSecond")
            if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0):
                self.problem(f"must be a number above 0, got {_show(rate)}", "requestsPerSecond")
            url = self.text(item, "baseUrl", "baseUrl", "")
            if url:
                self.base_url(url)
            platform, region = self._platform(item, secret)
            plan, phones = self._plan(item), self.phone_region(item, "phoneRegion")
            if len(self.problems) == before and name:
                found[name] = Connection(name, secret, url or None, float(rate) if rate else None, platform, region,
                                         plan)
                if phones:
                    self.phone_regions[name] = phones
        self.where = ""
        return found

    def base_url(self, url: str) -> None:
        parts = urlsplit(url)
        if not (parts.scheme in ("https", "http") and parts.hostname) or "@" in parts.netloc:
            self.problem(f"must be an https:// URL such as https://api2.autopilothq.com/v1, got {_show(url)}",
                         "baseUrl")
        elif parts.hostname not in self.api_hosts and not (parts.hostname in PLATFORM_HOSTS
                                                           and parts.scheme == "https"):
            self.problem(f"names {parts.hostname}, which is not the platform's API ({', '.join(PLATFORM_HOSTS)}, "
                         "over https) nor a host app setting ALLOWED_API_HOSTS lists: the connection's key would "
                         "be sent there", "baseUrl")

    def _platform(self, item: dict, secret: str | None) -> tuple[str, str | None]:
        platform = self.choice(item, "platform", "platform", PLATFORMS, "autopilot")
        region = self.choice(item, "region", "region", tuple(ORTTO_REGIONS), None) if "region" in item else None
        if platform != "ortto":
            self._ortto_only(item)
        return platform, region

    def _ortto_only(self, item: dict) -> None:
        """The keys of an Ortto connection, refused on an Autopilot one (each says why it has no meaning there)."""
        why = {"region": "",
               "plan": "; an Autopilot connection's rate is requestsPerSecond",
               "phoneRegion": ": Autopilot's contract documents no phone format, so phones go to it as written"}
        for key, reason in why.items():
            if key in item:
                self.problem(f'is only used by an Ortto connection ("platform": "ortto"){reason}', key)

    def _plan(self, item: dict) -> str | None:
        """The Ortto plan, whose sustained rate (PLAN_RATES) the connection keeps to."""
        if "plan" not in item:
            return None
        plan = self.choice(item, "plan", "plan", tuple(PLAN_RATES), None)
        if "requestsPerSecond" in item:  # two rates for one account: which one was meant cannot be guessed
            rates = ", ".join(f"{name} {rate:g}" for name, rate in PLAN_RATES.items())
            self.problem(f"and requestsPerSecond both set the rate: give only one (the plans' rates, requests/s: "
                         f"{rates})", "plan")
        return plan

    def account(self, data: dict) -> Connection:
        name = self.text(data, "connection", "destination.connection", DEFAULT_ACCOUNT)
        if name in self.accounts:
            return self.accounts[name]
        if name:
            defined = ", ".join(f'"{n}"' for n in self.accounts)
            self.problem(f'names no connection: "{name}" is not in "connections" (defined: {defined}; "default" '
                         "is the app settings' account)", "destination.connection")
        return Connection()

    def _shared_destinations(self, exports: list[ExportDefinition | None]) -> None:
        """Two exports keeping membership in one list or field of one account would remove each other's
        members. Lists are compared by title or id without case (Autopilot's titles are matched that way)."""
        seen: dict[tuple[str, str], int] = {}
        for index, export in enumerate(exports):
            if export is None or not export.membership:
                continue
            target = export.list if export.membership == "list" else export.membership_key
            if not target:
                continue
            where = (export.account.name, export.membership, target.casefold())
            other = exports[seen[where]] if where in seen else None
            if other is not None and other.name != export.name:  # a repeated name is reported once, as such
                self.where = f"exports[{index}] {_show(export.name)}"
                self.problem(f"is also the {export.membership} of exports[{seen[where]}] {_show(other.name)}: two "
                             "exports on one list or field remove each other's members; give each its own",
                             f"destination.{export.membership}")
            seen.setdefault(where, index)
        self.where = ""

    def _duplicates(self, exports: list) -> None:
        seen: dict[str, int] = {}
        for index, data in enumerate(exports):
            name = data.get("name") if isinstance(data, dict) else None
            if not isinstance(name, str) or not name:
                continue
            if name in seen:
                self.where = f"exports[{index}] {_show(name)}"
                self.problem(f"is already the name of exports[{seen[name]}]; export names must be unique", "name")
            seen.setdefault(name, index)
        self.where = ""

    def export(self, index: int, data: Any) -> ExportDefinition | None:
        self.where = f"exports[{index}]"
        if not isinstance(data, dict):
            self.problem(f"must be an object, got {_type_name(data)}")
            return None
        name = data.get("name")
        if isinstance(name, str) and name:
            self.where = f"exports[{index}] {_show(name)}"
        before = len(self.problems)
        self.unknown(data, EXPORT_KEYS, "")
        values = {
            "name": self._name(data),
            "enabled": self.flag(data, "enabled", "enabled", True),
            "acknowledged": self.flag(data, "dataTransferAcknowledged", "dataTransferAcknowledged", False),
            **self.source(self.obj(data, "source", "source")),
            **self.destination(self.obj(data, "destination", "destination")),
            **self.mapping(data),
            "max_profiles": self._limit(data),
            "max_removal_percent": self._removal_limit(data),
        }
        # (the export's own phoneRegion wins over its connection's)
        values["phone_region"] = self.phone_region(data, "phoneRegion") or self.phone_regions.get(
            values["account"].name)
        self._membership_clash(values)
        if len(self.problems) > before:
            return None
        export = ExportDefinition(**values)
        for path, problem in self._platform_problems(export):
            self.problem(problem, path)
        return None if len(self.problems) > before else export

    @staticmethod
    def _platform_problems(export: ExportDefinition) -> list[tuple[str, str]]:
        if export.account.ortto:
            return ortto_fields.definition_problems(export)
        problems = [(f"customFields[{i}].type", '"text" is an Ortto type; Autopilot\'s text fields are "string"')
                    for i, custom in enumerate(export.custom_fields) if custom.type == "text"]
        if export.phone_region:  # (a connection's phoneRegion on Autopilot is refused with the connection)
            problems.append(("phoneRegion", "only applies to Ortto exports: Autopilot's contract documents no phone "
                                            "format, so phones go to it as written"))
        if export.email_permission != "ortto-default":
            problems.append(("destination.newPeople.emailPermission",
                             "only applies to Ortto exports: Autopilot has no append-only write, so a contact's "
                             "permission could not be set for new contacts without changing existing ones; new "
                             "Autopilot contacts get email permission"))
        return problems

    def _membership_clash(self, values: dict) -> None:
        key = typed_key("boolean", values["field"]).lower() if values["field"] else None
        if key and any(c.key.lower() == key for c in values["custom_fields"]):
            self.problem("is also the name of a boolean custom field; the membership field needs a name of its own",
                         "destination.field")

    def _name(self, data: dict) -> str:
        name = self.text(data, "name", "name")
        if name is not None and not NAME_RE.fullmatch(data["name"]):
            self.problem("must be 1-63 lower-case letters, digits or hyphens, starting with a letter or digit "
                         f"(it appears in URLs and table keys), got {_show(data['name'])}", "name")
        return name or ""

    def _limit(self, data: dict) -> int:
        value = data.get("maxProfiles", DEFAULT_MAX_PROFILES)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.problem(f"must be a positive whole number, got {_show(value)}", "maxProfiles")
            return DEFAULT_MAX_PROFILES
        return value

    def _removal_limit(self, data: dict) -> float:
        value = data.get("maxRemovalPercent", DEFAULT_MAX_REMOVAL_PERCENT)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            self.problem(f"must be a number from 0 to 100, got {_show(value)}", "maxRemovalPercent")
            return DEFAULT_MAX_REMOVAL_PERCENT
        return value

    def source(self, data: dict) -> dict:
        self.unknown(data, SOURCE_KEYS, "source")
        connection = self.text(data, "connection", "source.connection", DEFAULT_CONNECTION)
        if "connection" in data and isinstance(data["connection"], str) and not SETTING_RE.fullmatch(
                data["connection"]):
            self.problem("must name an app setting (letters, digits, underscores), not hold a connection string "
                         f"or URL; got {_show(data['connection'])}", "source.connection")
        container = self.text(data, "container", "source.container") if data else None
        if container and not CONTAINER_RE.fullmatch(container):
            self.problem("is not a valid blob container name (3-63 lower-case letters, digits and single hyphens), "
                         f"got {_show(container)}", "source.container")
        return {
            "connection": connection,
            "container": container or "",
            "prefix": self.text(data, "prefix", "source.prefix", "", allow_empty=True),
            "segment": (self.text(data, "segment", "source.segment") if data else None) or "",
        }

    def destination(self, data: dict) -> dict:
        self.unknown(data, DESTINATION_KEYS, "destination")
        membership = self.choice(data, "membership", "destination.membership", ("list", "field"), None) \
            if data else None
        values = {"account": self.account(data), "membership": membership or "", "list": None, "field": None,
                  "on_leave": self.choice(data, "onLeave", "destination.onLeave", ("remove", "keep"), "remove")}
        other = {"list": "field", "field": "list"}.get(membership or "")
        if membership:
            values[membership] = self.text(data, membership, f"destination.{membership}")
            if other in data:
                self.problem(f'is only used when membership is "{other}"; remove it or change the membership',
                             f"destination.{other}")
        if membership == "field" and values["field"] and "--" in values["field"]:
            self.problem('must be a plain name such as "In High Value Segment" (the key boolean--In--High--Value--'
                         f"Segment is derived from it), got {_show(values['field'])}", "destination.field")
        return {**values, **self.new_people(data)}

    def new_people(self, destination: dict) -> dict:
        """destination.newPeople: the email permission an Ortto merge gives the people it creates (an existing
        person's consent is never changed)."""
        found: dict[str, Any] = {"email_permission": "ortto-default", "email_permission_column": None}
        if "newPeople" not in destination:
            return found
        data = self.obj(destination, "newPeople", "destination.newPeople")
        self.unknown(data, NEW_PEOPLE_KEYS, "destination.newPeople")
        value, path = data.get("emailPermission", "ortto-default"), "destination.newPeople.emailPermission"
        if value is False:
            found["email_permission"] = "false"
        elif isinstance(value, dict):
            self.unknown(value, ("column",), path)
            if column := self.text(value, "column", f"{path}.column"):
                found.update(email_permission="column", email_permission_column=column)
        elif value is True:  # refused, not taken as a synonym: one choice, one spelling, in every document
            self.problem('must not be true: "ortto-default" already subscribes every new person (Ortto\'s own '
                         "behaviour), and true would be the same choice spelt differently; write \"ortto-default\" "
                         "or leave emailPermission out", path)
        elif value != "ortto-default":
            self.problem(f'must be "ortto-default", false or {{"column": "<CSV column>"}}, got {_show(value)}', path)
        return found

    def mapping(self, data: dict) -> dict:
        fields = self.obj(data, "fields", "fields")
        mapped: dict[str, str] = {}
        for key in fields:
            if self._standard_field(key) and (value := self.text(fields, key, f"fields.{key}")):
                mapped[key] = value
        if isinstance(data.get("fields"), dict) and "Email" not in fields:
            self.problem('must map "Email" to the column holding the email address (it is required)', "fields")
        return {"fields": mapped, "custom_fields": self.custom_fields(data)}

    def _standard_field(self, key: str) -> bool:
        if key in STANDARD_FIELDS:
            return True
        if key.lower() == "unsubscribed":
            self.problem("cannot be mapped: this app never changes a contact's subscription", f"fields.{key}")
            return False
        hint = _suggest(key, STANDARD_FIELDS)
        self.problem(f"is not an Autopilot standard field{hint}; use one of {', '.join(STANDARD_FIELDS)}, "
                     "or a customFields entry", f"fields.{key}")
        return False

    def custom_fields(self, data: dict) -> tuple[CustomField, ...]:
        items = data.get("customFields", [])
        if not isinstance(items, list):
            self.problem(f"must be a list, got {_type_name(items)}", "customFields")
            return ()
        result: list[CustomField] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            path = f"customFields[{i}]"
            if not isinstance(item, dict):
                self.problem(f"must be an object, got {_type_name(item)}", path)
                continue
            before = len(self.problems)
            self.unknown(item, CUSTOM_KEYS, path)
            name = self.text(item, "name", f"{path}.name")
            kind = self.choice(item, "type", f"{path}.type", CUSTOM_TYPES, None)
            column = self.text(item, "column", f"{path}.column")
            if name and "--" in name:
                self.problem(f'must not contain "--" (it separates words in the Autopilot key), got {_show(name)}',
                             f"{path}.name")
            words = " ".join((name or "").split()).lower()  # the same key in Autopilot
            if words and words in seen:
                self.problem(f"{_show(name)} is already defined by customFields[{seen[words]}]", f"{path}.name")
            if words:
                seen.setdefault(words, i)
            if len(self.problems) == before and name and kind and column:
                result.append(CustomField(" ".join(name.split()), kind, column))
        return tuple(result)
