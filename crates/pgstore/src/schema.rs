//! The schema and its versioned migrations, claimed by the `migrate` lease row (not an advisory
//! lock: CockroachDB accepts those as no-ops).
//!
//! Each version must be compatible with the binary of the version before it (add in one version,
//! remove in a later one), so replicas upgrade one at a time: a binary accepts a database one
//! version ahead of it and refuses one further ahead, or one whose `min_compatible` is above it.

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i32 = 1;

pub(crate) struct Migration {
    pub version: i32,
    /// The oldest binary's schema version that still works on the database after this one.
    pub min_compatible: i32,
    pub sql: &'static str,
}

pub(crate) const LEASES: &str = "CREATE TABLE IF NOT EXISTS bb_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires timestamptz NOT NULL
)";

pub(crate) const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    min_compatible: 1,
    sql: "
CREATE TABLE IF NOT EXISTS bb_schema (
    id int PRIMARY KEY,
    version int NOT NULL,
    min_compatible int NOT NULL
);
CREATE TABLE IF NOT EXISTS bb_head (
    id int PRIMARY KEY,
    rev bigint NOT NULL,
    low bigint NOT NULL
);
INSERT INTO bb_head (id, rev, low) VALUES (1, 0, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS bb_pools (
    account text NOT NULL,
    pool_key text NOT NULL,
    id text,
    os text,
    state text,
    allocation_state text,
    vm_size text,
    version bigint NOT NULL,
    doc jsonb,
    value bytea NOT NULL,
    PRIMARY KEY (account, pool_key)
);
CREATE TABLE IF NOT EXISTS bb_nodes (
    account text NOT NULL,
    pool_key text NOT NULL,
    node_id text NOT NULL,
    state text,
    scheduling_state text,
    host text,
    users_revision bigint,
    applied_revision bigint,
    version bigint NOT NULL,
    doc jsonb,
    value bytea NOT NULL,
    PRIMARY KEY (account, pool_key, node_id)
);
CREATE INDEX IF NOT EXISTS bb_nodes_host ON bb_nodes (host);
CREATE INDEX IF NOT EXISTS bb_nodes_state ON bb_nodes (account, pool_key, state);
CREATE TABLE IF NOT EXISTS bb_users (
    account text NOT NULL,
    pool_key text NOT NULL,
    node_id text NOT NULL,
    user_key text NOT NULL,
    name text,
    is_admin boolean,
    expiry_time timestamptz,
    version bigint NOT NULL,
    doc jsonb,
    value bytea NOT NULL,
    PRIMARY KEY (account, pool_key, node_id, user_key)
);
CREATE TABLE IF NOT EXISTS bb_records (
    key text PRIMARY KEY,
    version bigint NOT NULL,
    value bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS bb_changes (
    rev bigint NOT NULL,
    seq int NOT NULL,
    kind smallint NOT NULL,
    key text NOT NULL,
    value bytea,
    PRIMARY KEY (rev, seq)
);
CREATE TABLE IF NOT EXISTS bb_host_seen (
    host text PRIMARY KEY,
    seen timestamptz NOT NULL
);
",
}];

pub(crate) const SET_VERSION: &str = "INSERT INTO bb_schema (id, version, min_compatible) VALUES (1, $1, $2) \
     ON CONFLICT (id) DO UPDATE SET version = excluded.version, min_compatible = excluded.min_compatible";

/// Whether a binary at `ours` may run on a database at (`version`, `min_compatible`).
pub(crate) fn compatible(ours: i32, version: i32, min_compatible: i32) -> Result<(), String> {
    if version > ours + 1 {
        return Err(format!(
            "the database's schema is version {version}, more than one version ahead of this bluebatch's ({ours}): upgrade bluebatch"
        ));
    }
    if min_compatible > ours {
        return Err(format!(
            "the database's schema (version {version}) no longer works with this bluebatch's version {ours} (it needs at least {min_compatible}): upgrade bluebatch"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_are_in_order_and_each_compatible_with_the_one_before() {
        let m = super::MIGRATIONS;
        for (i, x) in m.iter().enumerate() {
            assert_eq!(x.version, i as i32 + 1);
            assert!(x.min_compatible >= x.version - 1 && x.min_compatible <= x.version);
        }
        assert_eq!(m.last().unwrap().version, super::SCHEMA_VERSION);
        assert!(super::compatible(1, 2, 1).is_ok());
        assert!(super::compatible(1, 3, 1).is_err());
        assert!(super::compatible(1, 2, 2).is_err());
        assert!(super::compatible(2, 1, 1).is_ok());
    }
}
