"""Prometheus metrics of a node.

Names follow Prometheus conventions: ``chatcluster_`` prefix, base units (seconds, bytes),
``_total`` for counters, histograms rather than summaries. Labels only take values from small
server-chosen sets (transport, close code, op, result); never a room or a user.

Hot paths count in batches (one ``inc(n)`` per fanned-out entry, not one per socket).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

# The ``_created`` series double the series count for nothing Prometheus queries use.
disable_created_metrics()

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SIZE_BUCKETS = (0, 1, 5, 10, 50, 100, 500, 1000, 5000)

# The bounded label sets (see ``_zero_fill``). Other values may appear (a command type, a Redis
# op); they come from the code, never from clients.
TRANSPORTS = ("ws", "poll")  # poll: HTTP polls in flight (long polls hold a request open)
CLOSE_CODES = ("1000", "1001", "1006", "1009", "1011", "1013", "4001", "4002", "4003",
               "4500", "4501", "4502", "other")
HANDSHAKE_REJECTIONS = ("origin", "draining", "full", "overloaded", "timeout", "auth", "unavailable", "error")
PROTOCOL_ERRORS = ("binary", "malformed", "before_hello")
# Background work that survived a failed iteration (node.supervise): task names are code literals.
BACKGROUND_TASKS = ("heartbeats", "presence-sweeper", "room-counts", "watch-redis", "loop-lag",
                    "shard-reader", "fanout-dispatch", "flush", "job", "webhooks", "poll-cache-sweeper")

# Webhook events by outcome (node.webhooks).
WEBHOOK_RESULTS = ("delivered", "retried", "dropped", "gone")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.build_info = Info("chatcluster_build", "Version of the node", registry=r)
        self.connections_open = Gauge(
            "chatcluster_connections_open", "Open client connections", ["transport"], registry=r)
        self.connections_accepted = Counter(
            "chatcluster_connections_accepted_total", "WebSocket connections accepted", registry=r)
        self.connections_closed = Counter(
            "chatcluster_connections_closed_total", "Connections closed, by close code", ["code"], registry=r)
        self.hello_rejected = Counter(
            "chatcluster_handshakes_rejected_total", "Handshakes refused, by reason", ["reason"], registry=r)
        self.hellos_in_progress = Gauge(
            "chatcluster_hellos_in_progress",
            "WebSocket handshakes admitted and not yet welcomed (bounded by CHAT_MAX_HELLOS_IN_PROGRESS)",
            registry=r)
        self.messages_published = Counter(
            "chatcluster_messages_published_total", "Messages appended to room streams by this node", registry=r)
        self.messages_delivered = Counter(
            "chatcluster_messages_delivered_total", "Message frames queued to local sockets", registry=r)
        self.entries_read = Counter(
            "chatcluster_stream_entries_read_total", "Stream entries read by the shard readers", registry=r)
        self.delivery_latency = Histogram(
            "chatcluster_delivery_latency_seconds",
            "From stream entry time to the write to the local sockets", buckets=LATENCY_BUCKETS, registry=r)
        self.replay_messages = Histogram(
            "chatcluster_replay_messages", "Messages replayed per room on resume", buckets=SIZE_BUCKETS, registry=r)
        self.resumes = Counter(
            "chatcluster_resumes_total", "Room cursors presented on hello, by outcome", ["recovered"], registry=r)
        self.slow_consumers = Counter(
            "chatcluster_slow_consumer_disconnects_total", "Connections closed 4002 for a full buffer", registry=r)
        self.outbound_bytes = Gauge(
            "chatcluster_outbound_buffer_bytes", "Bytes waiting in socket write buffers", registry=r)
        self.redis_latency = Histogram(
            "chatcluster_redis_command_duration_seconds", "Redis command latency", ["op"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.redis_errors = Counter(
            "chatcluster_redis_errors_total", "Redis command failures", ["op"], registry=r)
        self.reader_lag = Gauge(
            "chatcluster_stream_reader_lag_seconds",
            "Age of the newest entry of the last read, worst shard reader (0 when caught up)",
            registry=r)
        self.readers = Gauge("chatcluster_stream_readers", "Shard readers running", registry=r)
        self.streams_read = Gauge(
            "chatcluster_streams_read", "Streams this node reads (rooms, personal, ephemeral), lingering ones included",
            registry=r)
        self.streams_lingering = Gauge(
            "chatcluster_streams_lingering",
            "Streams read with no local session left, kept for a reconnect (CHAT_TOPIC_LINGER_S)", registry=r)
        self.polls_waiting = Gauge("chatcluster_polls_waiting", "Long polls waiting for events", registry=r)
        self.commands = Counter(
            "chatcluster_commands_total", "Client commands handled, by type and result", ["type", "result"], registry=r)
        self.rate_limited = Counter(
            "chatcluster_rate_limited_total", "Commands refused by a rate limit, by limit", ["limit"], registry=r)
        self.abuse_closes = Counter(
            "chatcluster_abuse_closes_total",
            "Connections the node closed for abuse (1009, 4502, 4003); they count towards the penalty box",
            registry=r)
        self.protocol_errors = Counter(
            "chatcluster_protocol_errors_total", "Malformed client frames, by kind", ["kind"], registry=r)
        self.polls = Counter(
            "chatcluster_polls_total", "HTTP polls, by result", ["result"], registry=r)
        self.poll_cache = Counter(
            "chatcluster_poll_cache_total",
            "Polls answered from the node's own positions (hit: no Redis read) or collected from Redis (miss)",
            ["result"], registry=r)
        self.next_poll = Histogram(
            "chatcluster_next_poll_seconds", "next_poll_ms handed to polling clients, in seconds",
            buckets=(1, 2, 5, 10, 15, 20, 30, 60), registry=r)
        self.presence_heartbeats = Counter(
            "chatcluster_presence_heartbeats_total", "Presence heartbeats written to Redis", registry=r)
        self.alerts = Counter(
            "chatcluster_alerts_injected_total", "Alerts injected through the server API", registry=r)
        self.loop_lag = Gauge(
            "chatcluster_event_loop_lag_seconds", "Event loop scheduling delay (last sample)", registry=r)
        self.draining = Gauge("chatcluster_draining", "1 while the node drains", registry=r)
        self.ready = Gauge(
            "chatcluster_ready", "1 while /readyz would answer 200 (sampled at scrape time)", registry=r)
        self.reader_gaps = Counter(
            "chatcluster_stream_reader_gaps_total",
            "Times a shard reader found entries trimmed before it read them (clients told "
            "recovered: false)", registry=r)
        self.background_errors = Counter(
            "chatcluster_background_errors_total",
            "Failed iterations of background work (Redis refusing service, a bug), by task; "
            "the task backs off and goes on", ["task"], registry=r)
        self.http_responses = Counter(
            "chatcluster_http_responses_total", "HTTP API responses, by status class", ["status"], registry=r)
        self.webhook_deliveries = Counter(
            "chatcluster_webhook_deliveries_total",
            "Webhook events by outcome: delivered (2xx), retried (a failed attempt), dropped "
            "(older than CHAT_WEBHOOK_MAX_AGE), gone (deleted or trimmed before delivery)",
            ["result"], registry=r)
        self.webhook_attempt_duration = Histogram(
            "chatcluster_webhook_attempt_duration_seconds", "Webhook requests, answered or not",
            buckets=LATENCY_BUCKETS + (10.0, 30.0), registry=r)
        self.webhook_lag = Gauge(
            "chatcluster_webhook_lag_seconds",
            "Age of the oldest undelivered webhook event of this node's shards (0 when caught up)",
            registry=r)
        self.webhook_outbox_overflows = Counter(
            "chatcluster_webhook_outbox_overflows_total",
            "Times a shard's webhook outbox was found trimmed past undelivered events "
            "(CHAT_WEBHOOK_OUTBOX_MAXLEN reached: some events were lost)", registry=r)
        self.webhook_shards = Gauge(
            "chatcluster_webhook_shards", "Shards whose webhook deliveries this node leases", registry=r)
        self._zero_fill()

    def _zero_fill(self) -> None:
        """Create the children of every known label value, so that each series exists (at 0)
        from the first scrape: ``rate()`` of a series that appears only on its first event
        misses that event, and dashboards and alerts would show "no data" instead of zero."""
        for transport in TRANSPORTS:
            self.connections_open.labels(transport=transport)
        for code in CLOSE_CODES:
            self.connections_closed.labels(code=code)
        for reason in HANDSHAKE_REJECTIONS:
            self.hello_rejected.labels(reason=reason)
        for recovered in ("true", "false"):
            self.resumes.labels(recovered=recovered)
        for kind in PROTOCOL_ERRORS:
            self.protocol_errors.labels(kind=kind)
        for result in ("events", "empty"):
            self.polls.labels(result=result)
        self.rate_limited.labels(limit="commands")
        self.redis_errors.labels(op="xread")
        for task in BACKGROUND_TASKS:
            self.background_errors.labels(task=task)
        for result in WEBHOOK_RESULTS:
            self.webhook_deliveries.labels(result=result)
        for status in ("2xx", "3xx", "4xx", "5xx"):
            self.http_responses.labels(status=status)

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = Metrics()
