"""The Vault's methods for protection policies and the alerts log (see
pydr.Vault and pydr.dr.policy)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Dict, List, Optional, Tuple, Union

from ..errors import VaultError
from . import arguments
from . import policy as policy_
from .policy import Policy
from .results import AlertInfo
from .store import Store


class PolicyOperations:
    """Protection policies and the alerts log of pydr run (see pydr.Vault)."""

    store: Store  # the open store (set by Vault.__init__)

    def set_policy(self, name: str, *, group: bool = False, **fields: Any) -> Policy:
        """Set fields of the protection policy of item `name` (or of group
        `name`: it applies to every member); the fields not given stay.
        An item's effective policy takes each field from its own policy,
        else its group's, else the default.

        Args:
            name: the item, or with `group` the group.
            group: `name` is a group.
            fields: any of target_rpo, rpo_critical, app_consistent_every
                (seconds, or text such as "30s", "5m", "2h"), keep
                (a pydr.dr.tiers.Tiers or its dict), bwlimit (bytes/s, or
                text such as "10M"), bwlimit_windows (a list of
                "HH:MM-HH:MM=RATE" or (start, end, bytes/s), local time),
                priority (-1000 to 1000), alert_commands (a list of shell
                command lines). None clears a field.

        Returns:
            The effective Policy of the item (with `group`: the group's
            own policy, every field it does not set at its default).

        Raises:
            InvalidArgument: an unknown field or a bad value, such as a
                duration <= 0 or an rpo_critical below the target (of this
                policy or of any item it applies to); nothing is recorded.
            UnknownName: no such item, or a group with no members.
            VaultError: the Vault was opened as a reader.
        """
        self._need_writer("set a policy")
        scope = "group" if group else "item"
        policy_.set_policy(self.store, scope, name, **fields)
        return self.policy(name, group=group)

    def clear_policy(self, name: str, fields: Any = ("all",), *, group: bool = False) -> Policy:
        """Clear fields of the policy of item `name` (or of group `name`):
        they are then taken from the group, or the default.

        Args:
            name: the item, or with `group` the group.
            fields: field names (see set_policy), or "all" (the default)
                to remove the policy.
            group: `name` is a group.

        Returns:
            The effective Policy of the item (with `group`: the group's own).

        Raises:
            InvalidArgument: an unknown field name.
            UnknownName: no such item, or a group with no members.
            VaultError: the Vault was opened as a reader.
        """
        self._need_writer("clear a policy")
        wanted = [fields] if isinstance(fields, str) else list(fields)
        policy_.clear_policy(self.store, "group" if group else "item", name, wanted)
        return self.policy(name, group=group)

    def policy(self, name: str, *, group: bool = False) -> Policy:
        """The effective protection policy of item `name`: each field from its
        own policy where set, else from its group's, else the default.

        Args:
            name: the item, or with `group` a group (its own policy only).
            group: `name` is a group.

        Returns:
            A pydr.dr.policy.Policy.

        Raises:
            UnknownName: no such item, or a group with no members.
            VaultError: a stored policy is damaged.
        """
        return self.policy_sources(name, group=group)[0]

    def policy_sources(self, name: str, *,
                       group: bool = False) -> Tuple[Policy, Dict[str, str]]:
        """The effective policy of item `name` and where each of its fields
        comes from.

        Args:
            name: the item, or with `group` a group (its own policy only).
            group: `name` is a group.

        Returns:
            (Policy, {field: "item", "group" or "default"}).

        Raises:
            UnknownName: no such item, or a group with no members.
            VaultError: a stored policy is damaged.
        """
        if not group:
            return policy_.resolve_policy(self.store, name)
        self.store.items(group=name)  # UnknownName: no such group
        return policy_.group_policy(self.store, name)

    def alerts(self, name: Optional[str] = None, *,
               since: Union[datetime, float, None] = None,
               limit: Optional[int] = None) -> List[AlertInfo]:
        """The changes of RPO health pydr run recorded (the alerts log),
        oldest first.

        Args:
            name: only this item's alerts (None: every item's).
            since: only alerts at or after this time (a tz-aware datetime,
                or epoch seconds).
            limit: at most this many (the newest).

        Returns:
            An AlertInfo per alert.

        Raises:
            InvalidArgument: `since` is not a tz-aware datetime or epoch
                seconds, or `limit` is not an int >= 0.
            UnknownName: `name` is not a protected item.
        """
        since_epoch = arguments.epoch(since)
        wanted = arguments.count(limit, "limit", low=0)
        if name is not None:
            self.store.item(name)  # UnknownName
        return [AlertInfo.from_record(a)
                for a in self.store.alerts(item=name, since=since_epoch, limit=wanted)]

    def _need_writer(self, what: str) -> None:
        if not self.store.writer:
            raise VaultError(f"cannot {what}: the vault was opened as a reader "
                             "(open it with writer=True)", path=self.store.dir)
