"""Every Redis key shape of the cluster, in one place.

Rooms and users are spread over a fixed number of *virtual shards*. The shard number is the
Redis Cluster hash tag of every key that belongs to the room or user (``{s7}``), so that

* all keys of one room (stream, metadata, members, dedupe keys) live in one slot, which lets one
  Lua script append a message atomically, and
* one node can read every room of a shard with a single multi-key ``XREAD``, which is what Redis
  Cluster allows (all keys of one command in one slot, no CROSSSLOT).

The shard count is part of the data layout: changing ``CHAT_SHARDS`` on an existing data set
moves every key, so it is fixed for the life of the data.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import NewType

RoomId = NewType("RoomId", str)
UserId = NewType("UserId", str)
StreamId = NewType("StreamId", str)

PREFIX = "cc"
GENERAL = RoomId("general")


def shard_of(name: str, shards: int) -> int:
    """Virtual shard of a room or user id: stable across nodes and processes."""
    return zlib.crc32(name.encode()) % shards


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder bound to the shard count; one per node."""

    shards: int

    def tag(self, shard: int) -> str:
        return f"{{s{shard}}}"

    # -- rooms ------------------------------------------------------------------------------
    def room_shard(self, room: str) -> int:
        return shard_of("r:" + room, self.shards)

    def room_stream(self, room: str) -> str:
        """The room's message stream (delivery and history)."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:x"

    def room_meta(self, room: str) -> str:
        """Hash: epoch, kind, name, owner, created, seq (message counter), last_id, xdel
        (entries removed by edits and deletes, node.edits)."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:m"

    def room_members(self, room: str) -> str:
        """Set of member user ids (not kept for ``general``: every user is a member)."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:u"

    def room_invites(self, room: str) -> str:
        """Set of user ids invited to a closed room."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:i"

    def room_cmid(self, room: str, user: str, cmid: str) -> str:
        """Dedupe key of a client message id: ``"<id> <seq>"`` of the first send."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:c:{user}:{cmid}"

    def room_roles(self, room: str) -> str:
        """Hash user -> ``admin``: the room's admins (the owner is ``owner`` in the metadata;
        everyone else is a member). Entries are removed when the user is kicked or leaves."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:roles"

    def room_banned(self, room: str) -> str:
        """Set of user ids kicked from the room: ``join`` refuses them until an ``invite``
        removes them; capped at CHAT_MAX_ROOM_MEMBERS (a kick past it is refused)."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:ban"

    # Edits and deletes (node.edits): the fold state of the room's messages. The zsets hold
    # ids padded to fixed width (node.edits.pad_id) with score 0, so ZRANGEBYLEX orders them
    # like stream ids.
    def room_folds(self, room: str) -> str:
        """Hash message id -> ``e <edit entry id> <text>`` (an edited message's latest text) or
        ``d <delete entry id> <seq> <author id> <author name>`` (a deleted message's tombstone)."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:fo"

    def room_edited(self, room: str) -> str:
        """Lex zset of the padded ids of the room's edited messages (to prune ``room_folds``)."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:fe"

    def room_tombs(self, room: str) -> str:
        """Lex zset of the padded ids of the room's deleted messages (tombstones in history)."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:ft"

    def room_tomb_ops(self, room: str) -> str:
        """Lex zset ``<padded delete entry id> <padded message id>``: a tombstone is forgotten
        once the stream has trimmed its delete entry."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:fd"

    def stream_room(self, key: str) -> RoomId | None:
        """Inverse of :meth:`room_stream` (``None`` for other keys)."""
        parts = key.split(":", 3)
        if len(parts) == 4 and parts[2] == "r" and parts[3].endswith(":x"):
            return RoomId(parts[3][:-2])
        return None

    # -- users ------------------------------------------------------------------------------
    def user_shard(self, user: str) -> int:
        return shard_of("u:" + user, self.shards)

    def user_rooms(self, user: str) -> str:
        """Set of the rooms a user is a member of (besides ``general``)."""
        return f"{PREFIX}:{self.tag(self.user_shard(user))}:u:{user}:rooms"

    def user_reads(self, user: str) -> str:
        """Hash room -> ``"<read_id> <read_seq>"``: the user's read markers."""
        return f"{PREFIX}:{self.tag(self.user_shard(user))}:u:{user}:reads"

    def user_inbox(self, user: str) -> str:
        """The user's personal stream (alerts, room events, read-marker sync)."""
        return f"{PREFIX}:{self.tag(self.user_shard(user))}:u:{user}:p"

    def user_meta(self, user: str) -> str:
        """Hash: name, inbox epoch, personal cursor delivered last, last_seen."""
        return f"{PREFIX}:{self.tag(self.user_shard(user))}:u:{user}:m"

    def user_mentions(self, user: str) -> str:
        """Hash room -> comma-separated ``seq`` of the newest messages (at most
        ``mentions.MAX_TRACKED``) after the read marker that mention the user."""
        return f"{PREFIX}:{self.tag(self.user_shard(user))}:u:{user}:mn"

    def user_publish_dedupe(self, user: str, token: str) -> str:
        """Dedupe key of one personal-stream publish (a retried command appends once)."""
        return f"{PREFIX}:{self.tag(self.user_shard(user))}:u:{user}:pd:{token}"

    def user_key_prefix(self, shard: int) -> str:
        """Prefix of the user keys of a shard: ``<prefix><user>`` + a suffix below is a key of
        that user (scripts that touch many users of one shard build their keys from it)."""
        return f"{PREFIX}:{self.tag(shard)}:u:"

    # Suffixes after user_key_prefix(shard) + user (kept in step with the methods above).
    SESSIONS_SUFFIX = ":s"
    META_SUFFIX = ":m"

    def user_sessions(self, user: str) -> str:
        """Sorted set session id -> expiry (ms): the user's live sessions on any node."""
        return f"{PREFIX}:{self.tag(self.user_shard(user))}:u:{user}:s"

    # -- per shard --------------------------------------------------------------------------
    def shard_ephemeral(self, shard: int) -> str:
        """Short capped stream of typing and presence events of the shard's rooms.

        Nodes read it with the same XREAD as the shard's room streams, so ephemeral events
        cross nodes without Pub/Sub and work on Redis Cluster (one slot per shard)."""
        return f"{PREFIX}:{self.tag(shard)}:eph"

    def online_index(self, shard: int) -> str:
        """Sorted set user -> expiry (ms) of the online users whose user shard is ``shard``."""
        return f"{PREFIX}:{self.tag(shard)}:online"

    def room_typing_gate(self, room: str, user: str) -> str:
        """Throttle key of one user's typing events in one room (SET NX PX)."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:ty:{user}"

    # -- webhooks (node.webhooks) -------------------------------------------------------------
    def webhook_outbox(self, shard: int) -> str:
        """Capped stream of the shard's events waiting for webhook delivery (protocol 5.3).

        Written by the room scripts in the same step as the change (same slot as the room's
        keys): ``r`` room and ``i`` stream id of a room entry, or ``r`` room, ``m`` change,
        ``u`` user, ``b`` by of a membership change."""
        return f"{PREFIX}:{self.tag(shard)}:wh"

    def webhook_cursor(self, shard: int) -> str:
        """String: id of the last outbox entry delivered (or dropped) of the shard."""
        return f"{PREFIX}:{self.tag(shard)}:wh:cur"

    def webhook_lease(self, shard: int) -> str:
        """String ``<node id>/<token>`` (PX): the node delivering the shard's outbox."""
        return f"{PREFIX}:{self.tag(shard)}:wh:lease"

    def webhook_nodes(self) -> str:
        """Sorted set node id -> expiry (ms) of the nodes delivering webhooks (fair shares)."""
        return f"{PREFIX}:{{dir}}:whnodes"

    def room_receipt_gate(self, room: str, user: str) -> str:
        """The read id of one user's last ``receipt`` in one room (SET PX 10 min): the same
        marker is never announced twice."""
        return f"{PREFIX}:{self.tag(self.room_shard(room))}:r:{room}:rc:{user}"

    # -- cluster-wide -----------------------------------------------------------------------
    def room_directory(self) -> str:
        """Hash room id -> name of the open rooms (for ``rooms`` listing)."""
        return f"{PREFIX}:{{dir}}:open"

    def alert_counter(self) -> str:
        return f"{PREFIX}:{{dir}}:alerts"

    def general_members(self) -> str:
        """HyperLogLog of every user seen, for the general room's member count."""
        return f"{PREFIX}:{{s%d}}:r:general:hll" % self.room_shard(GENERAL)
