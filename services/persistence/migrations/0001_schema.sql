-- Schema of the persistence service (docs/persistence.md).
-- Every engine event is stored once, keyed by its sequence number; orders and trades are
-- derived from the events that were new when they were inserted.

CREATE TABLE events (
    seq          bigint PRIMARY KEY CHECK (seq > 0),
    type         text NOT NULL,
    symbol       text NULL,
    -- The order the event is about; for a trade, the taker (the order whose command caused it).
    order_id     bigint NULL,
    payload      jsonb NOT NULL,
    persisted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_order_id_idx ON events (order_id);

-- One row per order the engine accepted, and per new order it rejected. For a rejected order
-- only order_id, client_order_id, status, reject_reason and the seqs are known: the rejection
-- event carries nothing else, so symbol, side, type and time_in_force are NULL and quantity is 0
-- (numeric columns are never NULL, so sums and comparisons stay simple).
CREATE TABLE orders (
    order_id           bigint PRIMARY KEY,
    client_order_id    text NOT NULL,
    account            text NULL,
    symbol             text NULL,
    side               text NULL,
    type               text NULL,
    price_ticks        bigint NULL,
    price              numeric NULL,
    quantity           bigint NOT NULL,
    time_in_force      text NULL,
    status             text NOT NULL,
    filled_quantity    bigint NOT NULL DEFAULT 0,
    cancelled_quantity bigint NOT NULL DEFAULT 0,
    expired_quantity   bigint NOT NULL DEFAULT 0,
    reject_reason      text NULL,
    expire_reason      text NULL,
    -- Seq of the Accepted event (NULL for a rejected order).
    accepted_seq       bigint NULL,
    -- Seq of the last event that changed this row.
    last_seq           bigint NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_client_order_id_idx ON orders (client_order_id);

CREATE TABLE trades (
    -- The trade event's seq: also the trade's id.
    seq            bigint PRIMARY KEY,
    symbol         text NOT NULL,
    maker_order_id bigint NOT NULL,
    taker_order_id bigint NOT NULL,
    taker_side     text NOT NULL,
    price_ticks    bigint NOT NULL,
    price          numeric NULL,
    quantity       bigint NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX trades_maker_order_id_idx ON trades (maker_order_id);
CREATE INDEX trades_taker_order_id_idx ON trades (taker_order_id);
CREATE INDEX trades_symbol_seq_idx ON trades (symbol, seq);

-- Messages that could not be read as an EventBatch (not JSON, unknown wire version, values
-- out of range) or that the database refused on their own. Stored, then acked, so that one
-- bad message never wedges the queue. Keyed by the body's md5: a redelivery of the same body
-- bumps `occurrences` instead of adding a row.
CREATE TABLE poison_messages (
    body_md5      text PRIMARY KEY,
    -- The body, truncated to 1 MiB; body_bytes is the original length.
    body          bytea NOT NULL,
    body_bytes    bigint NOT NULL,
    reason        text NOT NULL,
    error         text NOT NULL,
    redelivered   boolean NOT NULL,
    occurrences   bigint NOT NULL DEFAULT 1,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);

-- The highest seq such that every seq from 1 to it is in `events`; updated in every batch
-- transaction so that a restart knows it without scanning `events`.
CREATE TABLE persistence_progress (
    id             smallint PRIMARY KEY CHECK (id = 1),
    contiguous_seq bigint NOT NULL
);
INSERT INTO persistence_progress (id, contiguous_seq) VALUES (1, 0);
