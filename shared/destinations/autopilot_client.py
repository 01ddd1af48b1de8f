"""The Autopilot v1 REST client: contacts in bulk, list membership one contact a call, lists found or created.

A joiner is merged in bulk with its batch, then added through `POST /list/{id}/contact/{email}`, the documented
join that works for contacts that exist already (`_autopilot_list` is honoured only when a contact is created)."""

from __future__ import annotations

from urllib.parse import quote

from shared.destinations.api_client import ApiClient, ApiError, Pace, Transient, no_pace
from shared.runtime.blocking import off
from shared.source.export_config import ExportDefinition


class AutopilotClient(ApiClient):
    SERVICE = "Autopilot"
    KEY_HEADER = "autopilotapikey"
    CHECK = ("GET", "/lists", None)  # a connection test: list the account's lists (a read: it changes nothing)

    async def prepare(self, export: ExportDefinition, pace: Pace = no_pace) -> str:
        """What a run's messages name as their target: the list's id in list mode (found or created); field mode
        needs nothing (Autopilot creates a custom field on its first write), but its key is read: a missing key
        fails the run before anything is queued, and the first sender finds it cached."""
        if export.membership == "list":
            return await self.resolve_list(export.list, pace)
        await off(self.api_key.get)
        return ""

    async def merge(self, items: list[dict], target: str | None, pace: Pace = no_pace) -> list[tuple[str, str, str]]:
        """Upsert a batch's contacts in one call: (outcome, reason, result) per item, in order."""
        result = await self.call("POST", "/contacts", {"contacts": [item["d"] for item in items]}, pace)
        seen = {email.lower() for email in result.get("email_contact_map", {})}
        return [("acked", "", "") if item["k"] in seen else
                ("failed", "Autopilot did not acknowledge this contact", "") for item in items]

    async def add_to_list(self, list_id: str, email: str, pace: Pace = no_pace) -> None:
        """Join a contact that exists (merged just before) to the list; a member already there is fine. Not
        `_autopilot_list` in an upsert: that adds a contact only when it creates it (autopilot-api contract)."""
        try:
            await self.call("POST", f"/list/{quote(list_id, safe='')}/contact/{quote(email, safe='@')}", None, pace)
        except ApiError as exc:
            if exc.status == 404:  # merged a moment ago yet unknown: a lagging read, worth trying again later
                raise Transient(404, f"Autopilot did not find the contact to add to list {list_id}",
                                self.SERVICE) from None
            raise

    async def remove_from_list(self, list_id: str, email: str, pace: Pace = no_pace) -> None:
        try:
            await self.call("DELETE", f"/list/{quote(list_id, safe='')}/contact/{quote(email, safe='@')}", None, pace)
        except ApiError as exc:
            if exc.status != 404:  # an unknown contact is not on the list: the goal holds
                raise

    async def find_list(self, name_or_id: str, pace: Pace = no_pace) -> str | None:
        """The id of the list with that id, or with that title compared without case; None if there is none.
        Two lists with that title are an error naming both ids (which one is meant cannot be guessed)."""
        lists = (await self.call("GET", "/lists", None, pace)).get("lists", [])
        if any(entry.get("list_id") == name_or_id for entry in lists):
            return name_or_id
        found = [entry["list_id"] for entry in lists if str(entry.get("title", "")).casefold() == name_or_id.casefold()]
        if len(found) > 1:
            raise ApiError(409, f"Autopilot has {len(found)} lists titled {name_or_id!r} ({', '.join(found)}): "
                                "name the list by its id in the export's destination.list", self.SERVICE)
        return found[0] if found else None

    async def resolve_list(self, name_or_id: str, pace: Pace = no_pace) -> str:
        """The id of the list with that id or title, created if absent (a concurrent creator's 409 is fine)."""
        found = await self.find_list(name_or_id, pace)
        if found:
            return found
        if name_or_id.startswith("contactlist_"):
            raise ApiError(404, f"list {name_or_id} does not exist in Autopilot", self.SERVICE)
        try:
            return (await self.call("POST", "/list", {"name": name_or_id}, pace))["list_id"]
        except ApiError as exc:
            if exc.status != 409:
                raise
        found = await self.find_list(name_or_id, pace)
        if not found:  # never go on with an empty id: joins would become plain upserts
            raise ApiError(409, f"Autopilot refused to create the list {name_or_id!r} as it exists, yet no list "
                                "has that title or id; name the list by its id in destination.list", self.SERVICE)
        return found
