-- cdc-cqrs write model (see ../shared/DESIGN.md). Applied by `setup_pg_db` in one transaction, and safe to
-- apply again: every statement is a no-op when its object already exists. Also usable by hand:
--   psql -d ecommerce -f schema/ecommerce.sql   (then: ALTER ROLE debezium PASSWORD '...')
--
-- Keys are `integer` end to end (serial PKs, integer FKs); money is exact `numeric`.

CREATE TABLE IF NOT EXISTS products (
    product_id     serial PRIMARY KEY,
    name           varchar(100)  NOT NULL,
    description    text,
    price          numeric(10,2) NOT NULL CHECK (price >= 0),
    stock_quantity integer       NOT NULL CHECK (stock_quantity >= 0)
);

CREATE TABLE IF NOT EXISTS orders (
    order_id      serial PRIMARY KEY,
    customer_name varchar(100) NOT NULL,
    address       varchar(100) NOT NULL,
    phone         varchar(20)  NOT NULL,
    order_date    timestamp    DEFAULT now(),
    status        varchar(50)  DEFAULT 'pending'
);

CREATE TABLE IF NOT EXISTS order_details (
    order_detail_id serial PRIMARY KEY,
    order_id        integer       NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE,
    product_id      integer       NOT NULL REFERENCES products (product_id),
    unit_price      numeric(10,2) NOT NULL CHECK (unit_price >= 0),
    quantity        integer       NOT NULL CHECK (quantity > 0),
    discount        numeric(4,3)  NOT NULL DEFAULT 0 CHECK (discount >= 0 AND discount < 1)
);

-- The cascade from orders and lookups of an order's lines both go by order_id; price fan-out by product_id.
CREATE INDEX IF NOT EXISTS order_details_order_id_idx ON order_details (order_id);
CREATE INDEX IF NOT EXISTS order_details_product_id_idx ON order_details (product_id);

-- REPLICA IDENTITY FULL, on purpose: with the default (primary key only) a delete event carries nothing but
-- the key, and the order_details job could not tell which order document embeds the deleted line without a
-- lookup that races the orders job (DESIGN invariant 4). FULL puts the whole old row in `before` of every
-- update and delete, so each event is self-contained, and the old image lets tests check exactly what
-- changed. The cost is a larger WAL record per update/delete, acceptable for these narrow rows.
-- (Only when not set yet: ALTER TABLE takes an exclusive lock even when it changes nothing.)
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['products', 'orders', 'order_details'] LOOP
        IF (SELECT relreplident FROM pg_class WHERE oid = t::regclass) <> 'f' THEN
            EXECUTE format('ALTER TABLE %I REPLICA IDENTITY FULL', t);
        END IF;
    END LOOP;
END
$$;

-- The capture role: LOGIN REPLICATION and read access to these three tables only, never superuser.
-- Its password is set by setup_pg_db from DEBEZIUM_PASSWORD, never written here.
DO $$
BEGIN
    CREATE ROLE debezium WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;
EXCEPTION WHEN duplicate_object THEN
    NULL; -- created earlier (roles are cluster-wide: another database may have made it)
END
$$;
GRANT USAGE ON SCHEMA public TO debezium;
GRANT SELECT ON products, orders, order_details TO debezium;

-- The publication Debezium's pgoutput plugin streams (the connector is told not to create its own, since
-- the debezium role owns nothing it could publish).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'cdc_cqrs') THEN
        CREATE PUBLICATION cdc_cqrs FOR TABLE products, orders, order_details;
    END IF;
END
$$;
