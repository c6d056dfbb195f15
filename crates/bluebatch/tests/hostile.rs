//! Hostile input: a table of malformed and malicious requests, each with the status and Batch
//! error code docs/contract.md prescribes (status only where the HTTP parser itself refuses the bytes,
//! before any Batch logic runs), then a check that the pools, nodes and users set up at the start
//! are exactly as they were. The table is run whole and every mismatch is listed at the end.

mod common;

use common::{ACCOUNT, Client, KEY, Req, Server, V, http_date, keypair, raw_request};
use serde_json::{Value, json};
use std::time::Duration;

const ALICE_PW: &str = "Alice-Secret-pw-1";
const BOB_PW: &str = "Bob-Secret-pw-1";
const KEY_ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@host";
/// Private key material that must never come back in an answer.
const SECRET: &str = "SECRETKEYMATERIALb3BlbnNzaC1rZXktdjEAAAAABG5vbmU";

struct Ctx {
    c: Client,
    /// A client with the right account and a wrong key, and one with an unknown account.
    wrong_key: Client,
    stranger: Client,
    url: String,
    /// The Linux and Windows node ids.
    ln: String,
    wn: String,
}

impl Ctx {
    fn alice(&self) -> String {
        Client::user_path("hp", &self.ln, "alice")
    }
    fn bob(&self) -> String {
        Client::user_path("hw", &self.wn, "bob")
    }
    fn lusers(&self) -> String {
        format!("/pools/hp/nodes/{}/users", self.ln)
    }
    fn wusers(&self) -> String {
        format!("/pools/hw/nodes/{}/users", self.wn)
    }
    fn lnode(&self) -> String {
        format!("/pools/hp/nodes/{}", self.ln)
    }
}

enum Out<'a> {
    Api(Req<'a>),
    Raw(Vec<u8>),
}

type Build = Box<dyn for<'a> Fn(&'a Ctx) -> Out<'a>>;

struct Case {
    what: String,
    build: Build,
    status: u16,
    /// The Batch error code; `None` where no Batch logic can run (the HTTP parser refuses the
    /// request) or the answer is a success.
    code: Option<&'static str>,
    /// A `values` entry the error must carry.
    value: Option<(&'static str, String)>,
}

fn case(
    what: impl Into<String>,
    status: u16,
    code: Option<&'static str>,
    build: impl for<'a> Fn(&'a Ctx) -> Out<'a> + 'static,
) -> Case {
    Case {
        what: what.into(),
        build: Box::new(build),
        status,
        code,
        value: None,
    }
}

impl Case {
    fn value(mut self, key: &'static str, value: &str) -> Self {
        self.value = Some((key, value.to_string()));
        self
    }
}

fn bad(
    what: impl Into<String>,
    status: u16,
    code: &'static str,
    build: impl for<'a> Fn(&'a Ctx) -> Out<'a> + 'static,
) -> Case {
    case(what, status, Some(code), build)
}

/// Update User on alice with these body bytes.
fn put_alice(what: &str, body: impl Into<Vec<u8>>, status: u16, code: &'static str) -> Case {
    let body = body.into();
    bad(what, status, code, move |x| {
        Out::Api(x.c.req("PUT", &x.alice()).raw(body.clone()))
    })
}

/// Update User on alice with this JSON body; the error names `property`.
fn put_alice_json(what: &str, body: Value, code: &'static str, property: &str) -> Case {
    put_alice(what, body.to_string(), 400, code).value("PropertyName", property)
}

/// Add User on the Linux node.
fn add_linux(what: &str, body: Value, status: u16, code: &'static str) -> Case {
    let body = body.to_string();
    bad(what, status, code, move |x| {
        Out::Api(x.c.req("POST", &x.lusers()).raw(body.clone().into_bytes()))
    })
}

/// Add User on the Windows node.
fn add_windows(what: &str, body: Value, status: u16, code: &'static str) -> Case {
    let body = body.to_string();
    bad(what, status, code, move |x| {
        Out::Api(x.c.req("POST", &x.wusers()).raw(body.clone().into_bytes()))
    })
}

/// Add Pool with this body.
fn add_pool(what: &str, body: impl Into<Vec<u8>>, status: u16, code: &'static str) -> Case {
    let body = body.into();
    bad(what, status, code, move |x| {
        Out::Api(x.c.req("POST", "/pools").raw(body.clone()))
    })
}

/// A signed GET with this query string.
fn get_q(
    what: &str,
    path: &'static str,
    query: String,
    status: u16,
    code: Option<&'static str>,
) -> Case {
    case(what, status, code, move |x| {
        Out::Api(x.c.req("GET", path).query(&query))
    })
}

fn vm_pool(id: Value) -> Value {
    json!({"id": id, "vmSize": "STANDARD_D2S_V3",
        "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
            "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
            "nodeAgentSKUId": "batch.node.ubuntu 22.04"}})
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v[key] = val;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

fn http_date_in(offset: time::Duration) -> String {
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    (time::OffsetDateTime::now_utc() + offset)
        .format(f)
        .unwrap()
}

/// A signed request whose signature is computed over `signed` while `sent` goes on the wire.
fn forged<'a>(x: &'a Ctx, signed: Req<'a>, sent: Req<'a>) -> Out<'a> {
    let date = http_date();
    let signed = signed.header("ocp-date", &date);
    let auth = x.c.authorization(&signed.string_to_sign(ACCOUNT));
    Out::Api(
        sent.header("ocp-date", &date)
            .header("authorization", &auth)
            .unsigned(),
    )
}

fn private_keys() -> Vec<(&'static str, String)> {
    vec![
        (
            "OpenSSH private key",
            format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET}\n-----END OPENSSH PRIVATE KEY-----\n"
            ),
        ),
        (
            "PEM RSA private key",
            format!(
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA{SECRET}\n-----END RSA PRIVATE KEY-----"
            ),
        ),
        (
            "PKCS#8 private key",
            format!(
                "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI{SECRET}\n-----END PRIVATE KEY-----"
            ),
        ),
        (
            "private key flattened to one line",
            format!(
                "-----BEGIN OPENSSH PRIVATE KEY----- {SECRET} -----END OPENSSH PRIVATE KEY-----"
            ),
        ),
        (
            "encrypted PEM private key",
            format!(
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\r\n{SECRET}\r\n-----END ENCRYPTED PRIVATE KEY-----"
            ),
        ),
    ]
}

fn nested(open: &str, close: &str, depth: usize) -> Vec<u8> {
    format!("{}{}", open.repeat(depth), close.repeat(depth)).into_bytes()
}

fn cases() -> Vec<Case> {
    let mut t: Vec<Case> = Vec::new();
    let q = |s: &str| format!("api-version={V}&{s}");

    // ---- Routing and paths (checked first, even before api-version and authentication).
    for (path, what) in [
        ("/", "root path"),
        ("/nonsense", "a path the published API does not have"),
        (
            "/jobs/j/nonsense",
            "a job path the published API does not have",
        ),
        ("/POOLS/x/y/z/w/v/u", "too many segments"),
        ("/pools//nodes", "empty segment"),
        ("/pools/%zz", "malformed percent escape"),
        ("/pools/%ff", "escape that is not UTF-8"),
        ("/pools/%+1", "escape with a sign instead of a hex digit"),
        ("/pools/%1", "escape with one hex digit"),
        (
            "/pools/x/nodes/y/users/alice/extra",
            "segment after the user name",
        ),
        ("/pools/x/resize/more", "segment after resize"),
    ] {
        t.push(bad(format!("route: {what}"), 400, "InvalidUri", move |x| {
            Out::Api(x.c.req("GET", path).query("").unsigned())
        }));
    }
    t.push(bad(
        "route: dot segments sent as is",
        400,
        "InvalidUri",
        |x| {
            Out::Raw(
                x.c.req("GET", "/pools/../../etc/passwd")
                    .unsigned()
                    .into_raw_bytes(&[]),
            )
        },
    ));
    for (method, path, what) in [
        (
            "PUT",
            "/jobs",
            "PUT the job collection (published path, no such operation)",
        ),
        ("PUT", "/pools", "PUT the pool collection"),
        ("DELETE", "/pools/hp/nodes/n", "DELETE a node"),
        ("GET", "/pools/hp/nodes/n/users", "GET the user collection"),
        ("POST", "/pools/hp/nodes/n/users/alice", "POST to a user"),
        (
            "GET",
            "/pools/hp/nodes/n/users/alice",
            "GET a user (no such operation)",
        ),
        ("PUT", "/pools/hp/resize", "PUT resize"),
        ("OPTIONS", "/pools", "OPTIONS"),
    ] {
        t.push(bad(
            format!("verb: {what}"),
            405,
            "UnsupportedHttpVerb",
            move |x| Out::Api(x.c.req(method, path)),
        ));
    }
    t.push(bad("route before api-version", 400, "InvalidUri", |x| {
        Out::Api(x.c.req("GET", "/nonsense").query("").unsigned())
    }));
    // Published operations bluebatch does not serve: 501 naming the operation, decided by the
    // route (before api-version and authentication), and they change nothing.
    for (method, path, op) in [
        ("GET", "/jobs", "Job_List"),
        ("POST", "/jobs", "Job_Add"),
        ("PATCH", "/pools/hp", "Pool_Patch"),
        ("POST", "/pools/hp/enableautoscale", "Pool_EnableAutoScale"),
        ("POST", "/pools/hp/stopresize", "Pool_StopResize"),
        (
            "GET",
            "/pools/hp/nodes/n/files/..%2F..%2Fetc%2Fshadow",
            "File_GetFromComputeNode",
        ),
        (
            "DELETE",
            "/pools/hp/nodes/n/files/state.db",
            "File_DeleteFromComputeNode",
        ),
    ] {
        t.push(
            bad(
                format!("not served: {method} {path}"),
                501,
                "NotImplemented",
                move |x| Out::Api(x.c.req(method, path).query("").unsigned()),
            )
            .value("Operation", op),
        );
    }
    t.push(bad(
        "path traversal, encoded, as a pool id",
        404,
        "PoolNotFound",
        |x| Out::Api(x.c.req("GET", "/pools/..%2f..%2fetc%2fpasswd")),
    ));
    t.push(bad(
        "path traversal as a node id",
        404,
        "NodeNotFound",
        |x| Out::Api(x.c.req("GET", "/pools/hp/nodes/..%2F..%2Fetc%2Fshadow")),
    ));
    t.push(bad(
        "dot-dot as a user name (escaped, sent as is)",
        404,
        "NodeUserNotFound",
        |x| {
            Out::Raw(
                x.c.req("PUT", &format!("{}/%2e%2e", x.lusers()))
                    .raw(b"{}".to_vec())
                    .into_raw_bytes(&[]),
            )
        },
    ));
    t.push(bad("NUL in a pool id", 404, "PoolNotFound", |x| {
        Out::Api(x.c.req("GET", "/pools/hp%00"))
    }));
    t.push(bad("raw UTF-8 in a pool id", 404, "PoolNotFound", |x| {
        Out::Raw(x.c.req("GET", "/pools/h\u{e9}p").into_raw_bytes(&[]))
    }));
    t.push(bad("4000-character pool id", 404, "PoolNotFound", |x| {
        Out::Api(x.c.req("GET", &format!("/pools/{}", "p".repeat(4000))))
    }));
    t.push(bad(
        "2000-character user name",
        404,
        "NodeUserNotFound",
        |x| {
            Out::Api(
                x.c.req("PUT", &format!("{}/{}", x.lusers(), "u".repeat(2000)))
                    .raw(b"{}".to_vec()),
            )
        },
    ));
    t.push(bad(
        "system account as the user in the path",
        404,
        "NodeUserNotFound",
        |x| {
            Out::Api(
                x.c.req("PUT", &format!("{}/root", x.lusers()))
                    .raw(b"{}".to_vec()),
            )
        },
    ));
    t.push(bad(
        "CRLF in a user name (header injection attempt)",
        404,
        "NodeUserNotFound",
        |x| {
            Out::Api(
                x.c.req("PUT", &format!("{}/alice%0D%0AX-Injected:%201", x.lusers()))
                    .raw(b"{}".to_vec()),
            )
        },
    ));
    t.push(bad(
        "CRLF in a pool id (header injection attempt)",
        404,
        "PoolNotFound",
        |x| Out::Api(x.c.req("GET", "/pools/hp%0d%0aSet-Cookie:%20a%3Db")),
    ));
    t.push(bad(
        "control path that does not exist",
        400,
        "InvalidUri",
        |x| Out::Api(x.c.control("GET", "/nope")),
    ));
    t.push(bad(
        "health with a wrong verb",
        405,
        "UnsupportedHttpVerb",
        |x| Out::Api(x.c.control("POST", "/health").unsigned()),
    ));

    // ---- api-version.
    t.push(
        get_q(
            "no api-version",
            "/pools",
            String::new(),
            400,
            Some("MissingRequiredQueryParameter"),
        )
        .value("QueryParameterName", "api-version"),
    );
    t.push(get_q(
        "unknown api-version",
        "/pools",
        "api-version=2099-01-01.99.0".into(),
        400,
        Some("UnsupportedRequestVersion"),
    ));
    t.push(get_q(
        "empty api-version",
        "/pools",
        "api-version=".into(),
        400,
        Some("UnsupportedRequestVersion"),
    ));
    t.push(get_q(
        "api-version with a NUL",
        "/pools",
        format!("api-version={V}%00"),
        400,
        Some("UnsupportedRequestVersion"),
    ));
    t.push(get_q(
        "duplicate api-version, first unknown",
        "/pools",
        format!("api-version=1999-01-01&api-version={V}"),
        400,
        Some("UnsupportedRequestVersion"),
    ));
    // Query parameters are all decoded with the api-version check, before authentication.
    t.push(bad(
        "malformed escape in the query",
        400,
        "InvalidQueryParameterValue",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools")
                    .query(&format!("api-version={V}&%zz=1"))
                    .unsigned(),
            )
        },
    ));
    t.push(bad(
        "query value that is not UTF-8",
        400,
        "InvalidQueryParameterValue",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools")
                    .query(&format!("api-version={V}&timeout=%ff"))
                    .unsigned(),
            )
        },
    ));
    t.push(bad(
        "api-version is checked before authentication",
        400,
        "UnsupportedRequestVersion",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools")
                    .query("api-version=bogus")
                    .unsigned(),
            )
        },
    ));

    // ---- Shared Key.
    t.push(bad("no Authorization", 401, "AuthenticationFailed", |x| {
        Out::Api(x.c.req("GET", "/pools").unsigned())
    }));
    for (auth, what) in [
        ("Basic dXNlcjpwYXNz", "Basic scheme"),
        ("SharedKey", "scheme only"),
        ("SharedKey bluebatchdev", "no colon"),
        ("SharedKey bluebatchdev:", "empty signature"),
        ("SharedKey :c2lnbmF0dXJl", "empty account"),
        (
            "sharedkey bluebatchdev:c2lnbmF0dXJl",
            "scheme in lower case",
        ),
        ("SharedKeyLite bluebatchdev:c2lnbmF0dXJl", "SharedKeyLite"),
        ("", "empty header"),
    ] {
        t.push(bad(
            format!("Authorization: {what}"),
            400,
            "InvalidAuthenticationInfo",
            move |x| {
                Out::Api(
                    x.c.req("GET", "/pools")
                        .header("ocp-date", &http_date())
                        .header("authorization", auth)
                        .unsigned(),
                )
            },
        ));
    }
    // The Bearer scheme with no token is a refused token (401 with the Bearer challenge), not
    // a malformed header.
    for auth in ["Bearer", "Bearer ", "bearer   ", "Bearer \t"] {
        t.push(bad(
            format!("Authorization: {auth:?} (no token)"),
            401,
            "AuthenticationFailed",
            move |x| {
                Out::Api(
                    x.c.req("GET", "/pools")
                        .header("ocp-date", &http_date())
                        .header("authorization", auth)
                        .unsigned(),
                )
            },
        ));
    }
    t.push(bad(
        "Authorization with bytes that are not ASCII",
        400,
        "InvalidAuthenticationInfo",
        |x| {
            Out::Raw(
                x.c.req("GET", "/pools")
                    .unsigned()
                    .into_raw_bytes(&[b"authorization: SharedKey \xff\xfe:c2ln"]),
            )
        },
    ));
    t.push(bad(
        "signature that is not base64",
        403,
        "AuthenticationFailed",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools")
                    .header("ocp-date", &http_date())
                    .header("authorization", "SharedKey bluebatchdev:!!!not-base64!!!")
                    .unsigned(),
            )
        },
    ));
    t.push(bad(
        "signature with trailing junk",
        403,
        "AuthenticationFailed",
        |x| {
            let r = x.c.req("GET", "/pools").header("ocp-date", &http_date());
            let auth = format!("{} extra", x.c.authorization(&r.string_to_sign(ACCOUNT)));
            Out::Api(r.header("authorization", &auth).unsigned())
        },
    ));
    t.push(bad(
        "well-formed wrong signature",
        403,
        "AuthenticationFailed",
        |x| Out::Api(x.wrong_key.req("GET", "/pools")),
    ));
    t.push(bad("unknown account", 403, "AuthenticationFailed", |x| {
        Out::Api(x.stranger.req("GET", "/pools"))
    }));
    t.push(bad("stale date (2020)", 403, "AuthenticationFailed", |x| {
        Out::Api(
            x.c.req("GET", "/pools")
                .header("ocp-date", "Wed, 25 Nov 2020 12:00:00 GMT"),
        )
    }));
    t.push(bad(
        "date 20 minutes ago",
        403,
        "AuthenticationFailed",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools")
                    .header("ocp-date", &http_date_in(time::Duration::minutes(-20))),
            )
        },
    ));
    t.push(bad(
        "date 20 minutes ahead",
        403,
        "AuthenticationFailed",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools")
                    .header("ocp-date", &http_date_in(time::Duration::minutes(20))),
            )
        },
    ));
    t.push(
        bad(
            "ocp-date that is not a date",
            400,
            "InvalidHeaderValue",
            |x| Out::Api(x.c.req("GET", "/pools").header("ocp-date", "yesterday")),
        )
        .value("HeaderName", "ocp-date"),
    );
    t.push(bad(
        "ocp-date in RFC 850 form",
        400,
        "InvalidHeaderValue",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools")
                    .header("ocp-date", "Wednesday, 25-Nov-26 12:00:00 GMT"),
            )
        },
    ));
    t.push(bad("no date header at all", 403, "AuthenticationFailed", |x| {
        let r = x.c.req("GET", "/pools");
        let auth = x.c.authorization(&r.string_to_sign(ACCOUNT));
        let host = x.url.trim_start_matches("http://");
        Out::Raw(
            format!(
                "GET /pools?api-version={V} HTTP/1.1\r\nhost: {host}\r\nauthorization: {auth}\r\nconnection: close\r\n\r\n"
            )
            .into_bytes(),
        )
    }));
    t.push(bad(
        "signature over another path",
        403,
        "AuthenticationFailed",
        |x| forged(x, x.c.req("GET", "/pools"), x.c.req("GET", "/pools/hp")),
    ));
    t.push(bad(
        "signature of a GET replayed as DELETE",
        403,
        "AuthenticationFailed",
        |x| {
            forged(
                x,
                x.c.req("GET", "/pools/hp"),
                x.c.req("DELETE", "/pools/hp"),
            )
        },
    ));
    t.push(bad(
        "signature over other query parameters",
        403,
        "AuthenticationFailed",
        |x| {
            forged(
                x,
                x.c.req("GET", "/pools")
                    .query(&format!("api-version={V}&maxresults=1")),
                x.c.req("GET", "/pools")
                    .query(&format!("api-version={V}&maxresults=2")),
            )
        },
    ));
    t.push(bad(
        "signature over another body length",
        403,
        "AuthenticationFailed",
        |x| {
            forged(
                x,
                x.c.req("PUT", &x.alice())
                    .header("content-length", "2")
                    .header("content-type", "application/json"),
                x.c.req("PUT", &x.alice())
                    .header("content-type", "application/json")
                    .raw(br#"{"password":"hijacked"}"#.to_vec()),
            )
        },
    ));
    t.push(bad(
        "signature over another ocp-date",
        403,
        "AuthenticationFailed",
        |x| {
            let signed =
                x.c.req("GET", "/pools")
                    .header("ocp-date", &http_date_in(time::Duration::seconds(-60)));
            let auth = x.c.authorization(&signed.string_to_sign(ACCOUNT));
            Out::Api(
                x.c.req("GET", "/pools")
                    .header("ocp-date", &http_date())
                    .header("authorization", &auth)
                    .unsigned(),
            )
        },
    ));
    t.push(bad(
        "two Authorization headers, the first forged",
        403,
        "AuthenticationFailed",
        |x| {
            let r = x.c.req("GET", "/pools").header("ocp-date", &http_date());
            let good = x.c.authorization(&r.string_to_sign(ACCOUNT));
            let r = r
                .header(
                    "authorization",
                    "SharedKey bluebatchdev:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                )
                .unsigned();
            let line = format!("authorization: {good}");
            Out::Raw(r.into_raw_bytes(&[line.as_bytes()]))
        },
    ));
    t.push(bad(
        "control without authentication",
        401,
        "AuthenticationFailed",
        |x| {
            Out::Api(
                x.c.control("GET", &format!("/pools/hp/nodes/{}/users", x.ln))
                    .unsigned(),
            )
        },
    ));
    t.push(bad(
        "reset without authentication",
        401,
        "AuthenticationFailed",
        |x| Out::Api(x.c.control("POST", "/reset").unsigned()),
    ));
    t.push(bad(
        "reset with a wrong key",
        403,
        "AuthenticationFailed",
        |x| Out::Api(x.wrong_key.control("POST", "/reset")),
    ));

    // ---- Query parameters and headers (after authentication).
    t.push(bad(
        "unsupported query parameter, unsigned: authentication first",
        401,
        "AuthenticationFailed",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools")
                    .query(&format!("api-version={V}&frob=1"))
                    .unsigned(),
            )
        },
    ));
    for (query, code, what) in [
        (
            "timeout=abc",
            "InvalidQueryParameterValue",
            "timeout not a number",
        ),
        ("timeout=0", "OutOfRangeQueryParameterValue", "timeout zero"),
        (
            "timeout=-5",
            "OutOfRangeQueryParameterValue",
            "timeout negative",
        ),
        (
            "timeout=99999999999999999999999",
            "InvalidQueryParameterValue",
            "timeout overflows",
        ),
        (
            "timeout=1e3",
            "InvalidQueryParameterValue",
            "timeout in exponent form",
        ),
        (
            "maxresults=0",
            "OutOfRangeQueryParameterValue",
            "maxresults zero",
        ),
        (
            "maxresults=1001",
            "OutOfRangeQueryParameterValue",
            "maxresults over 1000",
        ),
        (
            "maxresults=ten",
            "InvalidQueryParameterValue",
            "maxresults not a number",
        ),
        ("frob=1", "UnsupportedQueryParameter", "unknown parameter"),
        (
            "%00=1",
            "UnsupportedQueryParameter",
            "NUL as a parameter name",
        ),
        (
            "%24filter=color%20eq%20%27red%27",
            "InvalidQueryParameterValue",
            "$filter on an unknown property",
        ),
        (
            "%24filter=state%20eq%20%27a",
            "InvalidQueryParameterValue",
            "$filter unterminated string",
        ),
        (
            "%24filter=state%20gt%20%27a%27",
            "InvalidQueryParameterValue",
            "$filter unsupported operator",
        ),
        (
            "%24filter=state%20eq%20%27a%27%3B%20drop%20table",
            "InvalidQueryParameterValue",
            "$filter with trailing injection",
        ),
    ] {
        t.push(get_q(
            &format!("query: {what}"),
            "/pools",
            q(query),
            400,
            Some(code),
        ));
    }
    // A repeated parameter signs its first value (docs/contract.md §4); every value is checked.
    t.push(bad(
        "query: duplicate timeout, second bad",
        400,
        "InvalidQueryParameterValue",
        |x| {
            forged(
                x,
                x.c.req("GET", "/pools")
                    .query(&format!("api-version={V}&timeout=5")),
                x.c.req("GET", "/pools")
                    .query(&format!("api-version={V}&timeout=5&timeout=abc")),
            )
        },
    ));
    t.push(case(
        "query: duplicate api-version, first known (first value wins)",
        200,
        None,
        |x| {
            forged(
                x,
                x.c.req("GET", "/pools").query(&format!("api-version={V}")),
                x.c.req("GET", "/pools")
                    .query(&format!("api-version={V}&api-version=2099-01-01")),
            )
        },
    ));
    t.push(get_q(
        "query: $filter nested 200 deep",
        "/pools",
        q(&format!(
            "%24filter={}state%20eq%20%27a%27{}",
            "(".repeat(200),
            ")".repeat(200)
        )),
        400,
        Some("InvalidQueryParameterValue"),
    ));
    t.push(get_q(
        "query: $filter with 500 terms",
        "/pools",
        q(&format!(
            "%24filter={}",
            vec!["id%20eq%20%27a%27"; 500].join("%20or%20")
        )),
        400,
        Some("InvalidQueryParameterValue"),
    ));
    t.push(get_q(
        "query: maxresults on Get Pool",
        "/pools/hp",
        q("maxresults=3"),
        400,
        Some("UnsupportedQueryParameter"),
    ));
    t.push(get_q(
        "query: unknown $skiptoken lists nothing",
        "/pools",
        q("%24skiptoken=zzzzzzzz"),
        200,
        None,
    ));
    for (name, value, what) in [
        (
            "client-request-id",
            "not-a-guid",
            "client-request-id not a GUID",
        ),
        (
            "client-request-id",
            "9c4d50ee-2d56-4cd3-8152-34347dc9f2b0; drop",
            "client-request-id GUID with junk",
        ),
        (
            "return-client-request-id",
            "maybe",
            "return-client-request-id not a boolean",
        ),
    ] {
        t.push(
            bad(
                format!("header: {what}"),
                400,
                "InvalidHeaderValue",
                move |x| Out::Api(x.c.req("GET", "/pools").header(name, value)),
            )
            .value("HeaderName", name),
        );
    }
    t.push(bad(
        "header: 60 KB client-request-id",
        400,
        "InvalidHeaderValue",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools")
                    .header("client-request-id", &"a".repeat(60_000)),
            )
        },
    ));
    t.push(bad(
        "header: If-Modified-Since not a date",
        400,
        "InvalidHeaderValue",
        |x| {
            Out::Api(
                x.c.req("GET", "/pools/hp")
                    .header("if-modified-since", "yesterday"),
            )
        },
    ));
    t.push(bad(
        "header: Content-Type text/plain on a write",
        400,
        "InvalidHeaderValue",
        |x| {
            Out::Api(
                x.c.req("PUT", &x.alice())
                    .header("content-type", "text/plain")
                    .raw(b"{}".to_vec()),
            )
        },
    ));
    t.push(bad(
        "header: Content-Type application/xml",
        400,
        "InvalidHeaderValue",
        |x| {
            Out::Api(
                x.c.req("POST", &x.lusers())
                    .header("content-type", "application/xml")
                    .raw(b"<user name='x'/>".to_vec()),
            )
        },
    ));
    t.push(bad(
        "header: failed If-Match on Delete Pool",
        412,
        "ConditionNotMet",
        |x| {
            Out::Api(
                x.c.req("DELETE", "/pools/hp")
                    .header("if-match", "0x8D0000000000000"),
            )
        },
    ));
    t.push(bad(
        "header: If-Unmodified-Since in 1990 on Resize",
        412,
        "ConditionNotMet",
        |x| {
            Out::Api(
                x.c.req("POST", "/pools/hp/resize")
                    .header("if-unmodified-since", "Mon, 01 Jan 1990 00:00:00 GMT")
                    .json(&json!({"targetDedicatedNodes": 5})),
            )
        },
    ));
    t.push(bad(
        "header: If-None-Match * on Delete Pool",
        412,
        "ConditionNotMet",
        |x| Out::Api(x.c.req("DELETE", "/pools/hw").header("if-none-match", "*")),
    ));

    // ---- HTTP-level garbage: refused by the HTTP parser, before any Batch logic (status only).
    t.push(case("http: NUL in a header value", 400, None, |x| {
        Out::Raw(
            x.c.req("GET", "/pools")
                .into_raw_bytes(&[b"x-evil: a\x00b"]),
        )
    }));
    t.push(case("http: header line without a colon", 400, None, |x| {
        Out::Raw(x.c.req("GET", "/pools").into_raw_bytes(&[b"no-colon-here"]))
    }));
    t.push(case(
        "http: two different Content-Length headers",
        400,
        None,
        |x| {
            Out::Raw(
                x.c.req("PUT", &x.alice())
                    .raw(b"{}".to_vec())
                    .into_raw_bytes(&[b"content-length: 7"]),
            )
        },
    ));
    t.push(case("http: 200 headers", 431, None, |x| {
        let lines: Vec<String> = (0..200).map(|i| format!("x-h{i}: v")).collect();
        let refs: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        Out::Raw(x.c.req("GET", "/pools").into_raw_bytes(&refs))
    }));
    t.push(case("http: 70 KB request target", 414, None, |x| {
        Out::Raw(
            x.c.req("GET", &format!("/pools/{}", "a".repeat(70_000)))
                .into_raw_bytes(&[]),
        )
    }));
    t.push(case("http: not HTTP at all", 400, None, |_| {
        Out::Raw(b"GARBAGE\r\n\r\n".to_vec())
    }));

    // ---- Update User bodies (alice, Linux). Syntax and types before lookups.
    t.push(put_alice("body: empty", "", 400, "InvalidRequestBody"));
    t.push(put_alice(
        "body: whitespace only (512 KB)",
        " ".repeat(512 * 1024),
        400,
        "InvalidRequestBody",
    ));
    for (body, what) in [
        ("{", "unterminated object"),
        ("[]", "array"),
        ("null", "null"),
        ("\"text\"", "string"),
        ("42", "number"),
        ("{} trailing", "trailing garbage"),
        ("{}{}", "two objects"),
        ("{'password':'x'}", "single quotes"),
        ("{\"password\":\"a\"b\"}", "unescaped quote"),
        ("{\"password\":\"\\ud800\"}", "lone surrogate escape"),
        ("{\"password\":1e999999}", "number out of range"),
        (
            "{\"password\":\"tab\tinside\"}",
            "raw control character in a string",
        ),
        (
            "{\"password\":\"nul\u{0}inside\"}",
            "raw NUL byte in a string",
        ),
        ("{\"sshPublicKey\":\"x\",}", "trailing comma"),
        ("{\"password\" \"x\"}", "missing colon"),
    ] {
        t.push(put_alice(
            &format!("body: {what}"),
            body,
            400,
            "InvalidRequestBody",
        ));
    }
    t.push(put_alice(
        "body: invalid UTF-8",
        b"{\"password\":\"\xc3\x28\"}".to_vec(),
        400,
        "InvalidRequestBody",
    ));
    t.push(put_alice(
        "body: UTF-16",
        "{\"password\":\"x\"}"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect::<Vec<u8>>(),
        400,
        "InvalidRequestBody",
    ));
    t.push(put_alice(
        "body: arrays nested 100,000 deep",
        nested("[", "]", 100_000),
        400,
        "InvalidRequestBody",
    ));
    t.push(put_alice(
        "body: objects nested 10,000 deep",
        format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)),
        400,
        "InvalidRequestBody",
    ));
    // Raw: the server may answer as soon as it sees the Content-Length, before the body is sent.
    t.push(bad(
        "body: 2 MiB (over the limit)",
        413,
        "RequestBodyTooLarge",
        |x| {
            Out::Raw(
                x.c.req("PUT", &x.alice())
                    .raw(format!("{{\"password\":\"{}\"}}", "x".repeat(2 << 20)).into_bytes())
                    .into_raw_bytes(&[]),
            )
        },
    ));
    t.push(bad(
        "body: 2 MiB chunked, no Content-Length",
        413,
        "RequestBodyTooLarge",
        |x| {
            let chunk = "x".repeat(64 * 1024);
            let mut body = Vec::new();
            for _ in 0..32 {
                body.extend_from_slice(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes());
            }
            body.extend_from_slice(b"0\r\n\r\n");
            Out::Raw(
                x.c.req("PUT", &x.alice())
                    .header("transfer-encoding", "chunked")
                    .raw(body)
                    .into_raw_bytes(&[]),
            )
        },
    ));
    for (prop, wrong, what) in [
        ("foo", json!(1), "unknown property"),
        ("isAdmin", json!(true), "isAdmin is not updatable"),
        ("name", json!("mallory"), "name is not updatable"),
        ("Password", json!("x"), "property in the wrong case"),
        ("odata.type", json!("x"), "odata annotation"),
    ] {
        t.push(put_alice_json(
            &format!("update: {what}"),
            json!({ prop: wrong }),
            "InvalidRequestBody",
            prop,
        ));
    }
    for (prop, wrong, what) in [
        ("password", json!(12345), "number"),
        ("password", json!(true), "boolean"),
        ("password", json!(["a"]), "array"),
        ("password", json!({"a": 1}), "object"),
        ("expiryTime", json!(1_700_000_000), "number"),
        ("sshPublicKey", json!(["ssh-ed25519", "AAAA"]), "array"),
    ] {
        t.push(put_alice_json(
            &format!("update: {prop} as a {what}"),
            json!({ prop: wrong }),
            "InvalidRequestBody",
            prop,
        ));
    }
    t.push(put_alice_json(
        "update: empty password",
        json!({"password": ""}),
        "InvalidPropertyValue",
        "password",
    ));
    t.push(put_alice_json(
        "update: 124-character password",
        json!({"password": "p".repeat(124)}),
        "InvalidPropertyValue",
        "password",
    ));
    t.push(put_alice_json(
        "update: NUL in the password",
        json!({"password": "pass\u{0}word"}),
        "InvalidPropertyValue",
        "password",
    ));
    for (expiry, what) in [
        ("", "empty"),
        ("tomorrow", "words"),
        ("2030-01-01T00:00:00", "no zone"),
        ("2030-01-01", "date only"),
        ("2030-02-30T00:00:00Z", "30 February"),
        ("2030-01-01T25:00:00Z", "hour 25"),
        ("2030-01-01T00:00:00+25:00", "offset +25:00"),
        ("2030-01-01T00:00:00.12345678Z", "eight fraction digits"),
        ("10000-01-01T00:00:00Z", "five-digit year"),
        ("+002030-01-01T00:00:00Z", "expanded year"),
        ("2030-W01-1T00:00:00Z", "ISO week date"),
        ("2030-01-01T00:00:00 Z", "space before Z"),
        ("2030-01-01T00:00:00Z\u{0}", "trailing NUL"),
        ("1700000000", "epoch seconds"),
    ] {
        t.push(put_alice_json(
            &format!("update: expiryTime {what}"),
            json!({"expiryTime": expiry}),
            "InvalidPropertyValue",
            "expiryTime",
        ));
    }
    t.push(put_alice_json(
        "update: expiryTime of 10,000 digits",
        json!({"expiryTime": "9".repeat(10_000)}),
        "InvalidPropertyValue",
        "expiryTime",
    ));
    for (key, what) in [
        ("".to_string(), "empty"),
        ("   ".to_string(), "blank"),
        ("hello".to_string(), "a word"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP8=".to_string(), "DSA key"),
        ("ssh-ed25519 !!!notbase64!!!".to_string(), "bad base64"),
        ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl".to_string(), "type does not match the blob"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9ok".to_string(), "truncated blob"),
        (format!("{KEY_ED25519}\n{KEY_ED25519}"), "two keys on two lines"),
        (format!("{KEY_ED25519}\rssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x"), "second key after a bare CR"),
        (format!("command=\"/bin/sh -c id\" {KEY_ED25519}"), "authorized_keys options before the key"),
        (format!("no-pty,from=\"*\" {KEY_ED25519}"), "authorized_keys option list"),
        ("---- BEGIN SSH2 PUBLIC KEY ----\nAAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n---- END SSH2 PUBLIC KEY ----".to_string(), "RFC 4716 public key"),
        ("PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none".to_string(), "PuTTY key"),
        (format!("{KEY_ED25519}\u{0}"), "NUL after the key"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl co\u{0}mment".to_string(), "NUL inside the comment"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a\u{1b}[31mred".to_string(), "terminal escape in the comment"),
    ] {
        t.push(put_alice_json(&format!("update: sshPublicKey {what}"), json!({"sshPublicKey": key}), "InvalidPropertyValue", "sshPublicKey"));
    }
    for (what, private) in private_keys() {
        t.push(put_alice_json(
            &format!("update: {what} pasted as the public key"),
            json!({"sshPublicKey": private}),
            "InvalidPropertyValue",
            "sshPublicKey",
        ));
    }
    t.push(bad(
        "update: body error comes before the pool lookup",
        400,
        "InvalidRequestBody",
        |x| {
            Out::Api(
                x.c.req("PUT", "/pools/nopool/nodes/n/users/u")
                    .raw(b"{".to_vec()),
            )
        },
    ));
    t.push(bad("update: unknown pool", 404, "PoolNotFound", |x| {
        Out::Api(
            x.c.req("PUT", &format!("/pools/nopool/nodes/{}/users/alice", x.ln))
                .raw(b"{}".to_vec()),
        )
    }));
    t.push(bad("update: unknown node", 404, "NodeNotFound", |x| {
        Out::Api(
            x.c.req("PUT", "/pools/hp/nodes/tvmps_0000_d/users/alice")
                .raw(b"{}".to_vec()),
        )
    }));
    t.push(bad(
        "update: Linux names are case-sensitive",
        404,
        "NodeUserNotFound",
        |x| {
            Out::Api(
                x.c.req("PUT", &format!("{}/ALICE", x.lusers()))
                    .raw(b"{}".to_vec()),
            )
        },
    ));
    t.push(
        bad(
            "update: key on a Windows node",
            400,
            "InvalidPropertyValue",
            |x| {
                Out::Api(
                    x.c.req("PUT", &x.bob())
                        .json(&json!({"password": "x", "sshPublicKey": KEY_ED25519})),
                )
            },
        )
        .value("PropertyName", "sshPublicKey"),
    );
    t.push(
        bad(
            "update: no password on a Windows node",
            400,
            "MissingRequiredProperty",
            |x| Out::Api(x.c.req("PUT", &x.bob()).raw(b"{}".to_vec())),
        )
        .value("PropertyName", "password"),
    );

    // ---- Add User bodies.
    for (name, what) in [
        (json!(""), "empty name"),
        (json!("root"), "system account root"),
        (json!("sshd"), "system account sshd"),
        (json!("_azbatch"), "the agent's account"),
        (json!("../../etc/passwd"), "path traversal"),
        (json!("a/b"), "slash"),
        (json!("a b"), "space"),
        (json!("alice\u{0}"), "NUL"),
        (json!("alice\n"), "newline"),
        (
            json!("-oProxyCommand=id"),
            "leading dash (option injection)",
        ),
        (json!("$(id)"), "shell substitution"),
        (json!("`id`"), "backticks"),
        (json!("a;rm -rf /"), "shell metacharacters"),
        (json!("\u{e9}mile"), "non-ASCII"),
        (json!("u".repeat(33)), "33 characters"),
        (json!("1abc"), "leading digit"),
    ] {
        t.push(
            add_linux(
                &format!("add: name {what}"),
                json!({"name": name, "password": "x"}),
                400,
                "InvalidPropertyValue",
            )
            .value("PropertyName", "name"),
        );
    }
    t.push(add_linux(
        "add: name 10,000 characters",
        json!({"name": "n".repeat(10_000)}),
        400,
        "InvalidPropertyValue",
    ));
    t.push(
        add_linux(
            "add: no name",
            json!({"password": "x"}),
            400,
            "MissingRequiredProperty",
        )
        .value("PropertyName", "name"),
    );
    t.push(add_linux(
        "add: null name",
        json!({"name": null}),
        400,
        "MissingRequiredProperty",
    ));
    t.push(
        add_linux(
            "add: name as a number",
            json!({"name": 7}),
            400,
            "InvalidRequestBody",
        )
        .value("PropertyName", "name"),
    );
    // "true"/"false" are read as booleans (the az CLI sends strings); other strings are not.
    for s in ["yes", "True", "1", ""] {
        t.push(
            add_linux(
                &format!("add: isAdmin as the string {s:?}"),
                json!({"name": "newbie", "isAdmin": s}),
                400,
                "InvalidRequestBody",
            )
            .value("PropertyName", "isAdmin"),
        );
    }
    t.push(add_linux(
        "add: isAdmin as a number",
        json!({"name": "newbie", "isAdmin": 1}),
        400,
        "InvalidRequestBody",
    ));
    t.push(
        add_linux(
            "add: unknown property",
            json!({"name": "newbie", "uid": 0}),
            400,
            "InvalidRequestBody",
        )
        .value("PropertyName", "uid"),
    );
    t.push(add_linux(
        "add: existing name",
        json!({"name": "alice", "password": "x"}),
        409,
        "NodeUserExists",
    ));
    t.push(add_linux(
        "add: private key as the public key",
        json!({"name": "newbie", "sshPublicKey": private_keys()[0].1}),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_linux(
        "add: bad expiry",
        json!({"name": "newbie", "expiryTime": "soon"}),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_windows(
        "add: Windows system account",
        json!({"name": "administrator", "password": "x"}),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_windows(
        "add: Windows forbidden character",
        json!({"name": "a*b", "password": "x"}),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_windows(
        "add: Windows name ending in a dot",
        json!({"name": "abc.", "password": "x"}),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_windows(
        "add: Windows 21 characters",
        json!({"name": "w".repeat(21), "password": "x"}),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_windows(
        "add: Windows without a password",
        json!({"name": "winnie"}),
        400,
        "MissingRequiredProperty",
    ));
    t.push(add_windows(
        "add: Windows with a key",
        json!({"name": "winnie", "password": "x", "sshPublicKey": KEY_ED25519}),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_windows(
        "add: Windows names are case-insensitive",
        json!({"name": "BOB", "password": "x"}),
        409,
        "NodeUserExists",
    ));
    t.push(bad("add: on an unknown node", 404, "NodeNotFound", |x| {
        Out::Api(
            x.c.req("POST", "/pools/hp/nodes/nonode/users")
                .json(&json!({"name": "newbie"})),
        )
    }));

    // ---- Pool bodies.
    let p = vm_pool(json!("hostile"));
    t.push(add_pool(
        "pool: id with a space",
        with(p.clone(), "id", json!("a b")).to_string(),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_pool(
        "pool: id of 65 characters",
        with(p.clone(), "id", json!("p".repeat(65))).to_string(),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_pool(
        "pool: id with path traversal",
        with(p.clone(), "id", json!("../etc")).to_string(),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_pool(
        "pool: id with NUL",
        with(p.clone(), "id", json!("p\u{0}")).to_string(),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_pool(
        "pool: id as a number",
        with(p.clone(), "id", json!(5)).to_string(),
        400,
        "InvalidRequestBody",
    ));
    t.push(add_pool(
        "pool: existing id in another case",
        with(p.clone(), "id", json!("HP")).to_string(),
        409,
        "PoolExists",
    ));
    t.push(add_pool(
        "pool: no vmSize",
        without(p.clone(), "vmSize").to_string(),
        400,
        "MissingRequiredProperty",
    ));
    t.push(add_pool(
        "pool: no configuration",
        without(p.clone(), "virtualMachineConfiguration").to_string(),
        400,
        "MissingRequiredProperty",
    ));
    t.push(add_pool(
        "pool: both configurations",
        with(
            p.clone(),
            "cloudServiceConfiguration",
            json!({"osFamily": "6"}),
        )
        .to_string(),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_pool(
        "pool: negative node count",
        with(p.clone(), "targetDedicatedNodes", json!(-1)).to_string(),
        400,
        "InvalidPropertyValue",
    ));
    // A string holding a decimal integer is read as the integer (the az CLI sends "5"); any
    // other string is a wrong type, and a decimal string still meets the value rules.
    for s in ["5.0", "five", "1e3", " 5", "5 ", "", "0x5", "+5"] {
        t.push(
            add_pool(
                &format!("pool: node count as the string {s:?}"),
                with(p.clone(), "targetDedicatedNodes", json!(s)).to_string(),
                400,
                "InvalidRequestBody",
            )
            .value("PropertyName", "targetDedicatedNodes"),
        );
    }
    t.push(add_pool(
        "pool: node count as a negative decimal string",
        with(p.clone(), "targetDedicatedNodes", json!("-1")).to_string(),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_pool(
        "pool: node count as a decimal string past i64",
        with(
            p.clone(),
            "targetDedicatedNodes",
            json!("99999999999999999999"),
        )
        .to_string(),
        400,
        "InvalidRequestBody",
    ));
    t.push(add_pool(
        "pool: node count as a fraction",
        with(p.clone(), "targetDedicatedNodes", json!(1.5)).to_string(),
        400,
        "InvalidRequestBody",
    ));
    t.push(add_pool(
        "pool: node count past i64",
        with(p.clone(), "targetDedicatedNodes", json!(u64::MAX)).to_string(),
        400,
        "InvalidRequestBody",
    ));
    t.push(add_pool(
        "pool: more nodes than allowed",
        with(p.clone(), "targetDedicatedNodes", json!(1_000_000)).to_string(),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_pool(
        "pool: dedicated + low priority over the limit",
        with(
            with(p.clone(), "targetDedicatedNodes", json!(6000)),
            "targetLowPriorityNodes",
            json!(6000),
        )
        .to_string(),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_pool(
        "pool: taskSlotsPerNode 0",
        with(p.clone(), "taskSlotsPerNode", json!(0)).to_string(),
        400,
        "InvalidPropertyValue",
    ));
    t.push(add_pool(
        "pool: startTask as a string",
        with(p.clone(), "startTask", json!("rm -rf /")).to_string(),
        400,
        "InvalidRequestBody",
    ));
    t.push(add_pool(
        "pool: metadata as an object",
        with(p.clone(), "metadata", json!({"a": 1})).to_string(),
        400,
        "InvalidRequestBody",
    ));
    t.push(add_pool(
        "pool: auto-scale without a formula",
        with(p.clone(), "enableAutoScale", json!(true)).to_string(),
        400,
        "MissingRequiredProperty",
    ));
    t.push(add_pool(
        "pool: imageReference as a string",
        with(
            p.clone(),
            "virtualMachineConfiguration",
            json!({"imageReference": "ubuntu", "nodeAgentSKUId": "x"}),
        )
        .to_string(),
        400,
        "InvalidRequestBody",
    ));
    t.push(add_pool(
        "pool: no nodeAgentSKUId",
        with(
            p.clone(),
            "virtualMachineConfiguration",
            json!({"imageReference": {}}),
        )
        .to_string(),
        400,
        "MissingRequiredProperty",
    ));
    t.push(add_pool(
        "pool: metadata nested 300 deep",
        format!(
            "{{\"id\":\"deep\",\"vmSize\":\"x\",\"metadata\":{}}}",
            String::from_utf8(nested("[", "]", 300)).unwrap()
        ),
        400,
        "InvalidRequestBody",
    ));
    t.push(add_pool(
        "pool: not JSON",
        "id=hostile&vmSize=x",
        400,
        "InvalidRequestBody",
    ));
    for (path, body, status, code, what) in [
        (
            "/pools/hp/resize",
            json!({"targetDedicatedNodes": -1}),
            400,
            "InvalidPropertyValue",
            "resize to -1",
        ),
        (
            "/pools/hp/resize",
            json!({"targetDedicatedNodes": 1, "bogus": 1}),
            400,
            "InvalidRequestBody",
            "resize with an unknown property",
        ),
        (
            "/pools/hp/resize",
            json!({"targetDedicatedNodes": 1, "nodeDeallocationOption": "nuke"}),
            400,
            "InvalidPropertyValue",
            "resize with an unknown deallocation option",
        ),
        (
            "/pools/nopool/resize",
            json!({"targetDedicatedNodes": 1}),
            404,
            "PoolNotFound",
            "resize an unknown pool",
        ),
        (
            "/pools/hp/removenodes",
            json!({"nodeList": []}),
            400,
            "InvalidPropertyValue",
            "remove no nodes",
        ),
        (
            "/pools/hp/removenodes",
            json!({"nodeList": vec!["n"; 101]}),
            400,
            "InvalidPropertyValue",
            "remove 101 nodes",
        ),
        (
            "/pools/hp/removenodes",
            json!({"nodeList": [1]}),
            400,
            "InvalidRequestBody",
            "remove a number",
        ),
        (
            "/pools/hp/removenodes",
            json!({"nodeList": "all"}),
            400,
            "InvalidRequestBody",
            "nodeList as a string",
        ),
        (
            "/pools/hp/removenodes",
            json!({}),
            400,
            "MissingRequiredProperty",
            "remove without nodeList",
        ),
        (
            "/pools/hp/removenodes",
            json!({"nodeList": ["tvmps_nope_d"]}),
            404,
            "NodeNotFound",
            "remove an unknown node",
        ),
    ] {
        t.push(bad(format!("pool: {what}"), status, code, move |x| {
            Out::Api(x.c.req("POST", path).json(&body))
        }));
    }

    // ---- Node operations.
    t.push(bad(
        "node: reboot with an unknown option",
        400,
        "InvalidPropertyValue",
        |x| {
            Out::Api(
                x.c.req("POST", &format!("{}/reboot", x.lnode()))
                    .json(&json!({"nodeRebootOption": "explode"})),
            )
        },
    ));
    t.push(bad(
        "node: reboot with an unknown property",
        400,
        "InvalidRequestBody",
        |x| {
            Out::Api(
                x.c.req("POST", &format!("{}/reboot", x.lnode()))
                    .json(&json!({"force": true})),
            )
        },
    ));
    t.push(bad(
        "node: reimage with a body that is not JSON",
        400,
        "InvalidRequestBody",
        |x| {
            Out::Api(
                x.c.req("POST", &format!("{}/reimage", x.lnode()))
                    .raw(b"now please".to_vec()),
            )
        },
    ));
    t.push(bad(
        "node: disable scheduling with a numeric option",
        400,
        "InvalidRequestBody",
        |x| {
            Out::Api(
                x.c.req("POST", &format!("{}/disablescheduling", x.lnode()))
                    .json(&json!({"nodeDisableSchedulingOption": 5})),
            )
        },
    ));
    // One level of wrapping is accepted (azure-batch 15.0.0b1 sends it); these are not.
    for (body, property, what) in [
        (
            json!({"nodeDisableSchedulingOption": {"nodeDisableSchedulingOption":
                {"nodeDisableSchedulingOption": "requeue"}}}),
            "nodeDisableSchedulingOption",
            "wrapped twice",
        ),
        (
            json!({"nodeDisableSchedulingOption": {"nodeDisableSchedulingOption": ["requeue"]}}),
            "nodeDisableSchedulingOption",
            "wrapped around an array",
        ),
        (
            json!({"nodeDisableSchedulingOption": {"requeue": true}}),
            "requeue",
            "wrapped under another name",
        ),
    ] {
        t.push(
            bad(
                format!("node: disable scheduling option {what}"),
                400,
                "InvalidRequestBody",
                move |x| {
                    Out::Api(
                        x.c.req("POST", &format!("{}/disablescheduling", x.lnode()))
                            .json(&body),
                    )
                },
            )
            .value("PropertyName", property),
        );
    }
    t.push(
        bad(
            "node: reboot option wrapped (no client wraps it)",
            400,
            "InvalidRequestBody",
            |x| {
                Out::Api(
                    x.c.req("POST", &format!("{}/reboot", x.lnode()))
                        .json(&json!({"nodeRebootOption": {"nodeRebootOption": "requeue"}})),
                )
            },
        )
        .value("PropertyName", "nodeRebootOption"),
    );
    t.push(bad(
        "node: enable scheduling on an enabled node",
        409,
        "NodeAlreadyInTargetSchedulingState",
        |x| Out::Api(x.c.req("POST", &format!("{}/enablescheduling", x.lnode()))),
    ));
    t.push(bad(
        "node: remote login settings of an unknown node",
        404,
        "NodeNotFound",
        |x| Out::Api(x.c.req("GET", "/pools/hp/nodes/nonode/remoteloginsettings")),
    ));

    // ---- Controls (authenticated, our own paths).
    t.push(bad(
        "control: node state that does not exist",
        400,
        "InvalidPropertyValue",
        |x| {
            Out::Api(
                x.c.control("PUT", &format!("/pools/hp/nodes/{}/state", x.ln))
                    .json(&json!({"state": "pwned"})),
            )
        },
    ));
    t.push(bad(
        "control: node state as a number",
        400,
        "MissingRequiredProperty",
        |x| {
            Out::Api(
                x.c.control("PUT", &format!("/pools/hp/nodes/{}/state", x.ln))
                    .json(&json!({"state": 3})),
            )
        },
    ));
    t.push(bad(
        "control: node state with a 100 KB body",
        413,
        "RequestBodyTooLarge",
        |x| {
            Out::Api(
                x.c.control("PUT", &format!("/pools/hp/nodes/{}/state", x.ln))
                    .raw(format!("{{\"state\":\"{}\"}}", "i".repeat(100_000)).into_bytes()),
            )
        },
    ));
    t.push(bad(
        "control: move the clock back",
        400,
        "InvalidPropertyValue",
        |x| {
            Out::Api(
                x.c.control("POST", "/clock/advance")
                    .json(&json!({"by": "-1d"})),
            )
        },
    ));
    t.push(bad(
        "control: clock advance that overflows",
        400,
        "InvalidPropertyValue",
        |x| {
            Out::Api(
                x.c.control("POST", "/clock/advance")
                    .json(&json!({"by": "99999999999999d"})),
            )
        },
    ));
    t.push(bad(
        "control: clock advance by a huge number",
        400,
        "InvalidPropertyValue",
        |x| {
            Out::Api(
                x.c.control("POST", "/clock/advance")
                    .json(&json!({"by": 1e300})),
            )
        },
    ));
    t.push(bad(
        "control: users of an unknown node",
        404,
        "NodeNotFound",
        |x| Out::Api(x.c.control("GET", "/pools/hp/nodes/nonode/users")),
    ));
    t
}

/// Everything the setup created, as the API and the controls show it.
async fn snapshot(x: &Ctx) -> Value {
    let c = &x.c;
    let mut out = serde_json::Map::new();
    for p in ["hp", "hw"] {
        let v = c.req("GET", &format!("/pools/{p}")).send().await.json();
        out.insert(format!("pool {p}"), v);
        let nodes = c
            .req("GET", &format!("/pools/{p}/nodes"))
            .send()
            .await
            .json();
        out.insert(format!("nodes of {p}"), nodes["value"].clone());
    }
    let pools = c.req("GET", "/pools").send().await.json();
    let ids: Vec<Value> = pools["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].clone())
        .collect();
    out.insert("pool ids".into(), Value::Array(ids));
    for (p, n) in [("hp", &x.ln), ("hw", &x.wn)] {
        let u = c
            .control("GET", &format!("/pools/{p}/nodes/{n}/users"))
            .send()
            .await
            .json();
        out.insert(format!("users of {p}"), u);
    }
    let clock = c.control("GET", "/clock").send().await.json();
    out.insert("clock offset".into(), clock["offsetSeconds"].clone());
    Value::Object(out)
}

fn describe(r: &common::Resp) -> String {
    let body = String::from_utf8_lossy(&r.body);
    let short: String = body.chars().take(300).collect();
    format!("{} {}", r.status, short)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_the_contract_answer_and_change_nothing() {
    let srv = Server::start();
    let c = srv.client();
    let ln = c.ready_pool("hp", "linux", 1).await.remove(0);
    let wn = c.ready_pool("hw", "windows", 1).await.remove(0);
    let keys = tempfile::tempdir().unwrap();
    let (alice_key, alice_pub) = keypair(keys.path(), "alice");
    let r = c
        .req("POST", &format!("/pools/hp/nodes/{ln}/users"))
        .json(
            &json!({"name": "alice", "password": ALICE_PW, "sshPublicKey": alice_pub,
            "expiryTime": "2031-05-05T00:00:00Z"}),
        )
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", describe(&r));
    let r = c
        .req("POST", &format!("/pools/hw/nodes/{wn}/users"))
        .json(&json!({"name": "bob", "password": BOB_PW, "isAdmin": true}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", describe(&r));
    let x = Ctx {
        wrong_key: Client::new(
            &srv.url,
            ACCOUNT,
            "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk=",
        ),
        stranger: Client::new(&srv.url, "nosuchaccount", KEY),
        url: srv.url.clone(),
        c,
        ln,
        wn,
    };
    let before = snapshot(&x).await;

    let table = cases();
    assert!(table.len() >= 100, "the table has {} cases", table.len());
    let mut failures = Vec::new();
    for case in &table {
        let got = match (case.build)(&x) {
            Out::Api(req) => match req.try_send_within(Duration::from_secs(30)).await {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{}: no answer ({e})", case.what));
                    continue;
                }
            },
            Out::Raw(bytes) => match raw_request(&x.url, &bytes).await {
                Some(r) => r,
                None => {
                    failures.push(format!("{}: no answer to the raw request", case.what));
                    continue;
                }
            },
        };
        let code = if got.body.is_empty() {
            None
        } else {
            serde_json::from_slice::<Value>(&got.body)
                .ok()
                .and_then(|v| v["code"].as_str().map(str::to_string))
        };
        let mut wrong = Vec::new();
        if got.status != case.status || code.as_deref() != case.code {
            wrong.push(format!(
                "expected {} {}, got {}",
                case.status,
                case.code.unwrap_or("(no Batch error)"),
                describe(&got)
            ));
        }
        if let Some((k, v)) = &case.value
            && got.status == case.status
            && got.value(k).as_deref() != Some(v.as_str())
        {
            wrong.push(format!(
                "expected {k}={v} in values, got {:?}",
                got.values()
            ));
        }
        // Nothing hostile comes back: no injected headers, no secrets, no passwords.
        for h in ["x-injected", "set-cookie"] {
            if got.headers.contains_key(h) {
                wrong.push(format!("the answer carries an injected {h} header"));
            }
        }
        let text = String::from_utf8_lossy(&got.body);
        for secret in [SECRET, ALICE_PW, BOB_PW, "pass\u{0}word"] {
            if text.contains(secret) {
                wrong.push(format!("the answer echoes a secret ({secret:.12}…)"));
            }
        }
        if case.code.is_some() && got.status >= 400 {
            let msg = serde_json::from_slice::<Value>(&got.body)
                .ok()
                .and_then(|v| v["message"]["value"].as_str().map(str::to_string))
                .unwrap_or_default();
            if !msg.contains("\nRequestId:") && got.status == case.status {
                wrong.push("the error message lacks its RequestId line".into());
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}", case.what, wrong.join("; ")));
        }
    }

    // Nothing changed: pools, nodes, users (as stored and as applied), the clock.
    let after = snapshot(&x).await;
    let mut state = Vec::new();
    for (k, v) in before.as_object().unwrap() {
        if after[k] != *v {
            state.push(format!("{k} changed:\n  before {v}\n  after  {}", after[k]));
        }
    }
    // Names tried by the hostile Add User requests were not created.
    for (users, name) in [
        (&format!("/pools/hp/nodes/{}/users", x.ln), "newbie"),
        (&format!("/pools/hw/nodes/{}/users", x.wn), "winnie"),
    ] {
        let r =
            x.c.req("PUT", &format!("{users}/{name}"))
                .json(&json!({"password": "probe"}))
                .send()
                .await;
        if r.status != 404 {
            state.push(format!("{name} exists: {}", describe(&r)));
        }
    }
    // On the node, alice still logs in with her password and her key.
    if common::have_ssh_client() {
        let port = x.c.ssh_port("hp", &x.ln).await;
        let pw = common::ssh_password_login(port, "alice", ALICE_PW, "127.0.9.2").await;
        let key = common::ssh_key_login(port, "alice", &alice_key, "127.0.9.3").await;
        if !(pw && key) {
            state.push(format!("alice's logins changed: password {pw}, key {key}"));
        }
    }
    let report = format!(
        "{} of {} hostile cases answered against the contract:\n{}\n\nstate after the table:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n"),
        if state.is_empty() {
            "untouched".to_string()
        } else {
            state.join("\n")
        }
    );
    eprintln!("{report}");
    assert!(failures.is_empty() && state.is_empty(), "{report}");
}
