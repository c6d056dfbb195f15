//! Where a record lives: the typed tables (pools, nodes, users, with real columns taken from the
//! record's JSON) or `bb_records` for every other key. The table depends on the key alone, so a
//! record is never in two tables; its bytes are kept exactly (`value`), the JSON (`doc`) and the
//! columns are for queries.

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A typed table: its name, its key prefix (`pool`), and its key columns.
pub(crate) struct Table {
    pub name: &'static str,
    pub kind: &'static str,
    pub key_cols: &'static [&'static str],
}

pub(crate) const POOLS: Table = Table {
    name: "bb_pools",
    kind: "pool",
    key_cols: &["account", "pool_key"],
};
pub(crate) const NODES: Table = Table {
    name: "bb_nodes",
    kind: "node",
    key_cols: &["account", "pool_key", "node_id"],
};
pub(crate) const USERS: Table = Table {
    name: "bb_users",
    kind: "user",
    key_cols: &["account", "pool_key", "node_id", "user_key"],
};
pub(crate) const TYPED: [&Table; 3] = [&POOLS, &NODES, &USERS];

/// The typed table of `key` and its key column values, or `None` for `bb_records`. Typed keys
/// have exactly the table's number of segments after the kind, none of them empty.
pub(crate) fn classify(key: &str) -> Option<(&'static Table, Vec<&str>)> {
    let mut parts = key.split('/');
    let kind = parts.next()?;
    let table = TYPED.into_iter().find(|t| t.kind == kind)?;
    let segs: Vec<&str> = parts.collect();
    (segs.len() == table.key_cols.len() && segs.iter().all(|s| !s.is_empty()))
        .then_some((table, segs))
}

/// The typed rows a prefix delete takes: for each typed table whose keys can start with
/// `prefix` (which ends with `/`), the values of its leading key columns.
pub(crate) fn prefix_targets(prefix: &str) -> Vec<(&'static Table, Vec<&str>)> {
    let Some(body) = prefix.strip_suffix('/') else {
        return Vec::new();
    };
    let mut parts = body.split('/');
    let kind = parts.next().unwrap_or("");
    let segs: Vec<&str> = parts.collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Vec::new();
    }
    TYPED
        .into_iter()
        .filter(|t| t.kind == kind && segs.len() < t.key_cols.len())
        .map(|t| (t, segs.clone()))
        .collect()
}

/// The key of a typed row.
pub(crate) fn key_of(table: &Table, cols: &[String]) -> String {
    let mut k = table.kind.to_string();
    for c in cols {
        k.push('/');
        k.push_str(c);
    }
    k
}

/// The record's JSON for the `doc` column (objects only), without NUL characters (which
/// PostgreSQL's text and jsonb cannot hold; the exact bytes stay in `value`).
pub(crate) fn doc_of(value: &[u8]) -> Option<Value> {
    let mut v: Value = serde_json::from_slice(value).ok()?;
    if !v.is_object() {
        return None;
    }
    strip_nul(&mut v);
    Some(v)
}

fn strip_nul(v: &mut Value) {
    match v {
        Value::String(s) if s.contains('\0') => *s = s.replace('\0', ""),
        Value::Array(a) => a.iter_mut().for_each(strip_nul),
        Value::Object(m) => {
            if m.keys().any(|k| k.contains('\0')) {
                let old = std::mem::take(m);
                for (k, mut x) in old {
                    strip_nul(&mut x);
                    m.insert(k.replace('\0', ""), x);
                }
            } else {
                m.values_mut().for_each(strip_nul);
            }
        }
        _ => {}
    }
}

pub(crate) fn text(doc: &Option<Value>, field: &str) -> Option<String> {
    doc.as_ref()?.get(field)?.as_str().map(str::to_string)
}

pub(crate) fn int(doc: &Option<Value>, field: &str) -> Option<i64> {
    let v = doc.as_ref()?.get(field)?;
    v.as_i64()
        .or_else(|| v.as_u64().and_then(|u| i64::try_from(u).ok()))
}

pub(crate) fn boolean(doc: &Option<Value>, field: &str) -> Option<bool> {
    doc.as_ref()?.get(field)?.as_bool()
}

pub(crate) fn timestamp(doc: &Option<Value>, field: &str) -> Option<OffsetDateTime> {
    let s = doc.as_ref()?.get(field)?.as_str()?;
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_to_their_tables() {
        assert_eq!(
            classify("pool/a/p1").map(|(t, s)| (t.name, s)),
            Some(("bb_pools", vec!["a", "p1"]))
        );
        assert_eq!(classify("node/a/p1/n1").unwrap().0.name, "bb_nodes");
        assert_eq!(classify("user/a/p1/n1/u").unwrap().0.name, "bb_users");
        for other in [
            "pool/a",
            "pool/a/p1/x",
            "pool//p1",
            "node/a/p1/",
            "meta/clock",
            "account/x",
            "bin",
            "",
        ] {
            assert!(classify(other).is_none(), "{other}");
        }
        let t: Vec<_> = prefix_targets("node/a/p1/")
            .into_iter()
            .map(|(t, s)| (t.name, s))
            .collect();
        assert_eq!(t, vec![("bb_nodes", vec!["a", "p1"])]);
        assert!(prefix_targets("pool/a/p1/").is_empty());
        assert_eq!(prefix_targets("user/").len(), 1);
        assert!(prefix_targets("node/a").is_empty());
        assert!(prefix_targets("node//").is_empty());
    }

    #[test]
    fn docs_lose_nul_only() {
        let d = doc_of(br#"{"id":"a\u0000b","n":{"k\u0000":[1,"\u0000"]}}"#).unwrap();
        assert_eq!(d, serde_json::json!({"id":"ab","n":{"k":[1,""]}}));
        assert!(doc_of(b"[1]").is_none());
        assert!(doc_of(b"\x00\xff").is_none());
    }
}
