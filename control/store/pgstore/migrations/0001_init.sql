-- Control's state. Records are kept as the JSON the bbolt backend keeps
-- (bytea, byte for byte), with the columns queries select on beside them.

-- counters number orders, device revisions and audit entries. A writer
-- takes the row (UPDATE ... RETURNING) and holds it until it commits, so
-- numbers commit in the order they are taken and a reader paging by
-- number never skips one committed late. Lock order: rev, then orders,
-- then audit (every audited write takes audit last).
CREATE TABLE counters (
	name  text PRIMARY KEY,
	value bigint NOT NULL
);
INSERT INTO counters VALUES ('rev', 0), ('orders', 0), ('audit', 0);

-- claims are what every replica must agree on (the CA's fingerprint,
-- the command key): the first replica records them, the others check.
CREATE TABLE claims (
	name  text PRIMARY KEY,
	value text NOT NULL
);

CREATE TABLE tokens (
	hash bytea PRIMARY KEY,
	data bytea NOT NULL
);

CREATE TABLE devices (
	id        text PRIMARY KEY,
	rev       bigint NOT NULL,
	-- in_roster: not a gateway, and with a certificate or revoked.
	in_roster boolean NOT NULL,
	last_seen timestamptz,
	data      bytea NOT NULL
);
CREATE INDEX devices_roster ON devices (rev) WHERE in_roster;

CREATE TABLE addresses (
	addr   bytea PRIMARY KEY, -- 16 bytes, IPv4 mapped
	device text NOT NULL
);

CREATE TABLE bundles (
	version bigint PRIMARY KEY,
	raw     bytea NOT NULL
);

CREATE TABLE roots (
	version bigint PRIMARY KEY,
	raw     bytea NOT NULL
);

CREATE TABLE orders (
	seq  bigint PRIMARY KEY,
	id   text NOT NULL UNIQUE,
	data bytea NOT NULL
);

CREATE TABLE reports (
	device text NOT NULL,
	seq    bigint NOT NULL,
	data   bytea NOT NULL,
	PRIMARY KEY (device, seq)
);

CREATE TABLE flows (
	class text NOT NULL,
	flow  bytea NOT NULL,
	data  bytea NOT NULL,
	PRIMARY KEY (class, flow)
);

CREATE TABLE audit (
	seq  bigint PRIMARY KEY,
	data bytea NOT NULL
);
