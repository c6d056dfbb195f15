//! Routing: every Batch operation in scope as one enum named as Azure names its operations.

use crate::percent::decode;
use crate::unserved::{self, Lookup};
use axum::http::Method;
use bluebatch_core::error::{BatchError, Code};
use bluebatch_metrics::Operation;
use std::borrow::Cow;

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
    /// The operation, as the metrics name it.
    pub fn operation(&self) -> Operation {
        match self {
            Endpoint::PoolAdd => Operation::PoolAdd,
            Endpoint::PoolList => Operation::PoolList,
            Endpoint::PoolGet { .. } => Operation::PoolGet,
            Endpoint::PoolExists { .. } => Operation::PoolExists,
            Endpoint::PoolDelete { .. } => Operation::PoolDelete,
            Endpoint::PoolResize { .. } => Operation::PoolResize,
            Endpoint::PoolRemoveNodes { .. } => Operation::PoolRemoveNodes,
            Endpoint::ComputeNodeList { .. } => Operation::ComputeNodeList,
            Endpoint::ComputeNodeGet { .. } => Operation::ComputeNodeGet,
            Endpoint::ComputeNodeAddUser { .. } => Operation::ComputeNodeAddUser,
            Endpoint::ComputeNodeUpdateUser { .. } => Operation::ComputeNodeUpdateUser,
            Endpoint::ComputeNodeDeleteUser { .. } => Operation::ComputeNodeDeleteUser,
            Endpoint::ComputeNodeGetRemoteLoginSettings { .. } => {
                Operation::ComputeNodeGetRemoteLoginSettings
            }
            Endpoint::ComputeNodeReboot { .. } => Operation::ComputeNodeReboot,
            Endpoint::ComputeNodeReimage { .. } => Operation::ComputeNodeReimage,
            Endpoint::ComputeNodeDisableScheduling { .. } => {
                Operation::ComputeNodeDisableScheduling
            }
            Endpoint::ComputeNodeEnableScheduling { .. } => Operation::ComputeNodeEnableScheduling,
        }
    }

    pub fn extra_query_params(&self) -> &'static [&'static str] {
        match self {
            Endpoint::PoolList => &["$filter", "$select", "$expand", "maxresults", "$skiptoken"],
            Endpoint::PoolGet { .. } => &["$select", "$expand"],
            Endpoint::ComputeNodeList { .. } => &["$filter", "$select", "maxresults", "$skiptoken"],
            Endpoint::ComputeNodeGet { .. } => &["$select"],
            _ => &[],
        }
    }

    /// Whether the operation reads the state only under the gate, which catches up with every
    /// replica's commits first (so the request needs no catch-up of its own before it):
    /// Add, Update and Delete User. (With a password, the handler's check that spares the hash
    /// reads the cache before the gate: it catches up first itself.)
    pub fn decides_under_the_gate(&self) -> bool {
        matches!(
            self,
            Endpoint::ComputeNodeAddUser { .. }
                | Endpoint::ComputeNodeUpdateUser { .. }
                | Endpoint::ComputeNodeDeleteUser { .. }
        )
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
    let mut segs = borrowed_segments(raw_path)?;
    served(method, &mut segs).map_err(|e| {
        let owned: Vec<String> = segs.iter().map(|s| s.to_string()).collect();
        match unserved::lookup(method, &owned) {
            Lookup::Operation(op) => unserved::not_served(op),
            Lookup::OtherMethod => verb_not_allowed(),
            Lookup::Unknown => e,
        }
    })
}

/// [`route_segments`], each segment borrowed from the path unless it has an escape to decode
/// (only the ids an endpoint keeps are copied, once chosen).
fn borrowed_segments(raw_path: &str) -> Result<Vec<Cow<'_, str>>, BatchError> {
    let trimmed = raw_path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(raw_path);
    trimmed
        .strip_prefix('/')
        .ok_or_else(invalid_uri)?
        .split('/')
        .map(|s| {
            let d = if s.contains('%') {
                Cow::Owned(decode(s).ok_or_else(invalid_uri)?)
            } else {
                Cow::Borrowed(s)
            };
            if d.is_empty() {
                Err(invalid_uri())
            } else {
                Ok(d)
            }
        })
        .collect()
}

/// Moves segment `i` out (the segments are not read again once an endpoint is chosen).
fn take(segs: &mut [Cow<'_, str>], i: usize) -> String {
    std::mem::take(&mut segs[i]).into_owned()
}

/// The operations bluebatch serves. The segments are left as they were unless an endpoint is
/// returned (the unserved lookup reads them after a refusal).
fn served(method: &Method, segs: &mut [Cow<'_, str>]) -> Result<Endpoint, BatchError> {
    let lit = |segs: &[Cow<'_, str>], i: usize, name: &str| {
        segs.get(i).is_some_and(|s| s.eq_ignore_ascii_case(name))
    };
    let m = method;
    if !lit(segs, 0, "pools") {
        return Err(invalid_uri());
    }
    match segs.len() {
        1 => match *m {
            Method::POST => Ok(Endpoint::PoolAdd),
            Method::GET => Ok(Endpoint::PoolList),
            _ => Err(verb_not_allowed()),
        },
        2 => match *m {
            Method::GET => Ok(Endpoint::PoolGet {
                pool: take(segs, 1),
            }),
            Method::HEAD => Ok(Endpoint::PoolExists {
                pool: take(segs, 1),
            }),
            Method::DELETE => Ok(Endpoint::PoolDelete {
                pool: take(segs, 1),
            }),
            _ => Err(verb_not_allowed()),
        },
        3 => {
            let make: fn(String) -> Endpoint = if lit(segs, 2, "resize") {
                |pool| Endpoint::PoolResize { pool }
            } else if lit(segs, 2, "removenodes") {
                |pool| Endpoint::PoolRemoveNodes { pool }
            } else if lit(segs, 2, "nodes") {
                |pool| Endpoint::ComputeNodeList { pool }
            } else {
                return Err(invalid_uri());
            };
            let allowed = if lit(segs, 2, "nodes") {
                Method::GET
            } else {
                Method::POST
            };
            if *m != allowed {
                return Err(verb_not_allowed());
            }
            Ok(make(take(segs, 1)))
        }
        4 if lit(segs, 2, "nodes") => {
            if *m != Method::GET {
                return Err(verb_not_allowed());
            }
            Ok(Endpoint::ComputeNodeGet {
                pool: take(segs, 1),
                node: take(segs, 3),
            })
        }
        5 if lit(segs, 2, "nodes") => {
            type Make = fn(String, String) -> Endpoint;
            let (allowed, make): (Method, Make) = if lit(segs, 4, "users") {
                (Method::POST, |pool, node| Endpoint::ComputeNodeAddUser {
                    pool,
                    node,
                })
            } else if lit(segs, 4, "remoteloginsettings") {
                (Method::GET, |pool, node| {
                    Endpoint::ComputeNodeGetRemoteLoginSettings { pool, node }
                })
            } else if lit(segs, 4, "reboot") {
                (Method::POST, |pool, node| Endpoint::ComputeNodeReboot {
                    pool,
                    node,
                })
            } else if lit(segs, 4, "reimage") {
                (Method::POST, |pool, node| Endpoint::ComputeNodeReimage {
                    pool,
                    node,
                })
            } else if lit(segs, 4, "disablescheduling") {
                (Method::POST, |pool, node| {
                    Endpoint::ComputeNodeDisableScheduling { pool, node }
                })
            } else if lit(segs, 4, "enablescheduling") {
                (Method::POST, |pool, node| {
                    Endpoint::ComputeNodeEnableScheduling { pool, node }
                })
            } else {
                return Err(invalid_uri());
            };
            if *m != allowed {
                return Err(verb_not_allowed());
            }
            Ok(make(take(segs, 1), take(segs, 3)))
        }
        6 if lit(segs, 2, "nodes") && lit(segs, 4, "users") => {
            let make: fn(String, String, String) -> Endpoint = match *m {
                Method::PUT => {
                    |pool, node, user| Endpoint::ComputeNodeUpdateUser { pool, node, user }
                }
                Method::DELETE => {
                    |pool, node, user| Endpoint::ComputeNodeDeleteUser { pool, node, user }
                }
                _ => return Err(verb_not_allowed()),
            };
            Ok(make(take(segs, 1), take(segs, 3), take(segs, 5)))
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
    fn borrowed_segments_are_the_decoded_segments() {
        for p in [
            "/pools",
            "/pools/",
            "/pools/p1/nodes/n1/users/alice%20b",
            "/pools/P%41ol/nodes/n1",
            "/pools/..%2f..%2fetc/nodes",
            "/pools//nodes",
            "/pools/%zz",
            "/pools/%e9",
            "/pools/%C3%A9t%C3%A9/",
            "pools",
            "/",
            "",
        ] {
            let borrowed = borrowed_segments(p)
                .map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map_err(|e| e.code);
            assert_eq!(borrowed, route_segments(p).map_err(|e| e.code), "{p:?}");
        }
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
