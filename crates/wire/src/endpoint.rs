//! Routing: every Batch operation in scope as one enum named as Azure names its operations.

use crate::percent::decode;
use crate::unserved::{self, Lookup};
use axum::http::Method;
use bluebatch_core::error::{BatchError, Code};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    PoolAdd,
    PoolList,
    PoolGet {
        pool: String,
    },
    PoolExists {
        pool: String,
    },
    PoolDelete {
        pool: String,
    },
    PoolResize {
        pool: String,
    },
    PoolRemoveNodes {
        pool: String,
    },
    ComputeNodeList {
        pool: String,
    },
    ComputeNodeGet {
        pool: String,
        node: String,
    },
    ComputeNodeAddUser {
        pool: String,
        node: String,
    },
    ComputeNodeUpdateUser {
        pool: String,
        node: String,
        user: String,
    },
    ComputeNodeDeleteUser {
        pool: String,
        node: String,
        user: String,
    },
    ComputeNodeGetRemoteLoginSettings {
        pool: String,
        node: String,
    },
    ComputeNodeReboot {
        pool: String,
        node: String,
    },
    ComputeNodeReimage {
        pool: String,
        node: String,
    },
    ComputeNodeDisableScheduling {
        pool: String,
        node: String,
    },
    ComputeNodeEnableScheduling {
        pool: String,
        node: String,
    },
}

/// Query parameters an operation knows besides `api-version` and `timeout`.
impl Endpoint {
    pub fn extra_query_params(&self) -> &'static [&'static str] {
        match self {
            Endpoint::PoolList => &["$filter", "$select", "$expand", "maxresults", "$skiptoken"],
            Endpoint::PoolGet { .. } => &["$select", "$expand"],
            Endpoint::ComputeNodeList { .. } => &["$filter", "$select", "maxresults", "$skiptoken"],
            Endpoint::ComputeNodeGet { .. } => &["$select"],
            _ => &[],
        }
    }

    pub fn has_body(&self) -> bool {
        matches!(
            self,
            Endpoint::PoolAdd
                | Endpoint::PoolResize { .. }
                | Endpoint::PoolRemoveNodes { .. }
                | Endpoint::ComputeNodeAddUser { .. }
                | Endpoint::ComputeNodeUpdateUser { .. }
                | Endpoint::ComputeNodeReboot { .. }
                | Endpoint::ComputeNodeReimage { .. }
                | Endpoint::ComputeNodeDisableScheduling { .. }
        )
    }
}

fn verb_not_allowed() -> BatchError {
    BatchError::new(Code::UnsupportedHttpVerb)
}

fn invalid_uri() -> BatchError {
    BatchError::new(Code::InvalidUri)
}

/// The decoded, non-empty segments of a raw path (one trailing `/` allowed).
pub fn route_segments(raw_path: &str) -> Result<Vec<String>, BatchError> {
    let trimmed = raw_path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(raw_path);
    trimmed
        .strip_prefix('/')
        .ok_or_else(invalid_uri)?
        .split('/')
        .map(|s| decode(s).filter(|d| !d.is_empty()).ok_or_else(invalid_uri))
        .collect()
}

/// Maps a method and the raw (percent-encoded) path to an endpoint: an operation of the
/// published API that bluebatch does not serve is 501 `NotImplemented` naming it
/// ([`crate::unserved`]), a path that names nothing in the published API `InvalidUri`, a known
/// path with another method `UnsupportedHttpVerb`.
pub fn route(method: &Method, raw_path: &str) -> Result<Endpoint, BatchError> {
    let segs = route_segments(raw_path)?;
    served(method, &segs).map_err(|e| match unserved::lookup(method, &segs) {
        Lookup::Operation(op) => unserved::not_served(op),
        Lookup::OtherMethod => verb_not_allowed(),
        Lookup::Unknown => e,
    })
}

/// The operations bluebatch serves.
fn served(method: &Method, segs: &[String]) -> Result<Endpoint, BatchError> {
    let lit = |i: usize, name: &str| segs.get(i).is_some_and(|s| s.eq_ignore_ascii_case(name));
    let m = method;
    let pick = |allowed: &[(Method, Endpoint)]| {
        allowed
            .iter()
            .find(|(am, _)| am == m)
            .map(|(_, e)| e.clone())
            .ok_or_else(verb_not_allowed)
    };
    if !lit(0, "pools") {
        return Err(invalid_uri());
    }
    match segs.len() {
        1 => pick(&[
            (Method::POST, Endpoint::PoolAdd),
            (Method::GET, Endpoint::PoolList),
        ]),
        2 => {
            let pool = segs[1].clone();
            pick(&[
                (Method::GET, Endpoint::PoolGet { pool: pool.clone() }),
                (Method::HEAD, Endpoint::PoolExists { pool: pool.clone() }),
                (Method::DELETE, Endpoint::PoolDelete { pool }),
            ])
        }
        3 => {
            let pool = segs[1].clone();
            if lit(2, "resize") {
                pick(&[(Method::POST, Endpoint::PoolResize { pool })])
            } else if lit(2, "removenodes") {
                pick(&[(Method::POST, Endpoint::PoolRemoveNodes { pool })])
            } else if lit(2, "nodes") {
                pick(&[(Method::GET, Endpoint::ComputeNodeList { pool })])
            } else {
                Err(invalid_uri())
            }
        }
        4 if lit(2, "nodes") => {
            let (pool, node) = (segs[1].clone(), segs[3].clone());
            pick(&[(Method::GET, Endpoint::ComputeNodeGet { pool, node })])
        }
        5 if lit(2, "nodes") => {
            let (pool, node) = (segs[1].clone(), segs[3].clone());
            let op = segs[4].to_ascii_lowercase();
            match op.as_str() {
                "users" => pick(&[(Method::POST, Endpoint::ComputeNodeAddUser { pool, node })]),
                "remoteloginsettings" => pick(&[(
                    Method::GET,
                    Endpoint::ComputeNodeGetRemoteLoginSettings { pool, node },
                )]),
                "reboot" => pick(&[(Method::POST, Endpoint::ComputeNodeReboot { pool, node })]),
                "reimage" => pick(&[(Method::POST, Endpoint::ComputeNodeReimage { pool, node })]),
                "disablescheduling" => pick(&[(
                    Method::POST,
                    Endpoint::ComputeNodeDisableScheduling { pool, node },
                )]),
                "enablescheduling" => pick(&[(
                    Method::POST,
                    Endpoint::ComputeNodeEnableScheduling { pool, node },
                )]),
                _ => Err(invalid_uri()),
            }
        }
        6 if lit(2, "nodes") && lit(4, "users") => {
            let (pool, node, user) = (segs[1].clone(), segs[3].clone(), segs[5].clone());
            pick(&[
                (
                    Method::PUT,
                    Endpoint::ComputeNodeUpdateUser {
                        pool: pool.clone(),
                        node: node.clone(),
                        user: user.clone(),
                    },
                ),
                (
                    Method::DELETE,
                    Endpoint::ComputeNodeDeleteUser { pool, node, user },
                ),
            ])
        }
        _ => Err(invalid_uri()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_every_operation() {
        let r = |m: Method, p: &str| route(&m, p);
        assert_eq!(r(Method::POST, "/pools").unwrap(), Endpoint::PoolAdd);
        assert_eq!(r(Method::GET, "/pools/").unwrap(), Endpoint::PoolList);
        assert_eq!(
            r(Method::HEAD, "/pools/p1").unwrap(),
            Endpoint::PoolExists { pool: "p1".into() }
        );
        assert_eq!(
            r(Method::PUT, "/pools/p1/nodes/n1/users/alice%20b").unwrap(),
            Endpoint::ComputeNodeUpdateUser {
                pool: "p1".into(),
                node: "n1".into(),
                user: "alice b".into()
            }
        );
        assert_eq!(
            r(Method::GET, "/pools/p1/nodes/n1/remoteloginsettings").unwrap(),
            Endpoint::ComputeNodeGetRemoteLoginSettings {
                pool: "p1".into(),
                node: "n1".into()
            }
        );
    }

    #[test]
    fn unknown_paths_and_verbs() {
        let code = |m: Method, p: &str| route(&m, p).unwrap_err().code;
        assert_eq!(code(Method::GET, "/"), Code::InvalidUri);
        assert_eq!(code(Method::GET, "/nonsense"), Code::InvalidUri);
        assert_eq!(code(Method::GET, "/jobs/j/nonsense"), Code::InvalidUri);
        // Published but not served: 501 naming the operation; a wrong method on such a path 405.
        let e = route(&Method::GET, "/jobs").unwrap_err();
        assert_eq!(
            (e.code, e.values[0].clone()),
            (
                Code::NotImplemented,
                ("Operation".into(), "Job_List".into())
            )
        );
        assert_eq!(code(Method::PATCH, "/pools/p1"), Code::NotImplemented);
        assert_eq!(
            code(Method::PUT, "/jobs/j/disable"),
            Code::UnsupportedHttpVerb
        );
        assert_eq!(
            code(Method::GET, "/pools/p1/nodes/n1/users/a/b"),
            Code::InvalidUri
        );
        assert_eq!(
            code(Method::GET, "/pools/p1/nodes/n1/users"),
            Code::UnsupportedHttpVerb
        );
        assert_eq!(
            code(Method::PATCH, "/pools/p1/nodes/n1/users/a"),
            Code::UnsupportedHttpVerb
        );
        assert_eq!(code(Method::PUT, "/pools"), Code::UnsupportedHttpVerb);
        assert_eq!(code(Method::GET, "/pools/%zz"), Code::InvalidUri);
        assert_eq!(code(Method::GET, "/pools//nodes"), Code::InvalidUri);
        // A decoded '/' stays inside its segment: it names a pool that cannot exist (404 later).
        assert_eq!(
            route(&Method::GET, "/pools/..%2f..%2fetc/nodes").unwrap(),
            Endpoint::ComputeNodeList {
                pool: "../../etc".into()
            }
        );
    }
}
