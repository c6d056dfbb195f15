//! Shared Key authentication, as every captured real client computes it (docs/contract.md §4).
//! [`verify`] is the one entry point: it yields the authenticated account or a Batch error.

use crate::accounts::{AccountKey, Accounts};
use crate::percent::decode;
use crate::query::Params;
use axum::http::header::{
    AsHeaderName, CONTENT_ENCODING, CONTENT_LANGUAGE, CONTENT_LENGTH, CONTENT_TYPE, DATE, IF_MATCH,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_UNMODIFIED_SINCE, RANGE,
};
use axum::http::{HeaderMap, HeaderName, Method};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bluebatch_core::error::{BatchError, Code};
use bluebatch_core::timefmt::parse_rfc1123;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use time::{Duration, OffsetDateTime};

pub const MAX_SKEW: Duration = Duration::minutes(15);

// The signed headers' names, known at compile time (no parse of a name per lookup).
const CONTENT_MD5: HeaderName = HeaderName::from_static("content-md5");
const OCP_DATE: HeaderName = HeaderName::from_static("ocp-date");

const STANDARD_HEADERS: [&str; 11] = [
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
];

/// A request as Shared Key sees it.
pub struct Signed<'a> {
    pub method: &'a Method,
    /// The path exactly as on the request line (still percent-encoded).
    pub raw_path: &'a str,
    /// The raw query string, without `?`.
    pub raw_query: &'a str,
    pub headers: &'a HeaderMap,
}

fn header(headers: &HeaderMap, name: impl AsHeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn auth_failed(detail: &str) -> BatchError {
    BatchError::new(Code::AuthenticationFailed).with("AuthenticationErrorDetail", detail)
}

/// Checks the `Authorization` header against the account's keys and the request's signed date
/// (against the wall clock `now`). Returns the account name.
pub fn verify(
    req: &Signed<'_>,
    accounts: &Accounts,
    now: OffsetDateTime,
) -> Result<String, BatchError> {
    verify_with(req, &Params::lenient(req.raw_query), accounts, now)
}

/// [`verify`] with the request's query string already decoded (`params`, of `req.raw_query`).
pub fn verify_with(
    req: &Signed<'_>,
    params: &Params<'_>,
    accounts: &Accounts,
    now: OffsetDateTime,
) -> Result<String, BatchError> {
    let Some(auth) = req.headers.get("authorization") else {
        return Err(BatchError::new(Code::AuthenticationRequired).with(
            "AuthenticationErrorDetail",
            "The Authorization header is missing.",
        ));
    };
    let auth = auth.to_str().map_err(|_| malformed())?;
    let (scheme, rest) = auth.split_once(' ').ok_or_else(malformed)?;
    if scheme != "SharedKey" {
        return Err(malformed());
    }
    let (account, signature) = rest.trim().split_once(':').ok_or_else(malformed)?;
    if account.is_empty() || signature.is_empty() {
        return Err(malformed());
    }
    let given = STANDARD.decode(signature).map_err(|_| {
        auth_failed("The signature in the Authorization header is not valid base64.")
    })?;
    let keys = accounts.keys(account).ok_or_else(|| {
        auth_failed("The account in the Authorization header does not exist on this server.")
    })?;

    let signed_date = match (req.headers.get("ocp-date"), req.headers.get("date")) {
        (Some(d), _) | (None, Some(d)) => {
            let text = d.to_str().unwrap_or("");
            let which = if req.headers.contains_key("ocp-date") {
                "ocp-date"
            } else {
                "Date"
            };
            parse_rfc1123(text).ok_or_else(|| {
                BatchError::new(Code::InvalidHeaderValue)
                    .with("HeaderName", which)
                    .with("HeaderValue", text.chars().take(100).collect::<String>())
                    .with(
                        "Reason",
                        "expected an RFC 1123 date such as Wed, 25 Nov 2026 12:00:00 GMT",
                    )
            })?
        }
        (None, None) => {
            return Err(auth_failed(
                "The request has neither an ocp-date nor a Date header; one must be signed.",
            ));
        }
    };
    if (now - signed_date).abs() > MAX_SKEW {
        return Err(auth_failed(
            "The request date (ocp-date or Date) is more than 15 minutes away from the server's time.",
        ));
    }

    // Every form a real client signs; each is compared in constant time.
    if signature_matches(req, params, account, &keys, &given) {
        return Ok(account.to_string());
    }
    Err(auth_failed(
        "The MAC signature found in the HTTP request is not the same as any computed signature.",
    ))
}

/// Whether `given` is the HMAC-SHA256, under one of `keys`, of one of the strings to sign real
/// clients produce for this request (the forms [`strings_to_sign`] lists). Nothing is
/// formatted: the parts are fed to each key's precomputed MAC state, and the state after a part
/// common to several forms is cloned for each of them, so every byte is hashed once per key.
fn signature_matches(
    req: &Signed<'_>,
    params: &Params<'_>,
    account: &str,
    keys: &[AccountKey],
    given: &[u8],
) -> bool {
    let h = req.headers;
    let content_length = header(h, &CONTENT_LENGTH);
    let content_lengths: &[&str] = if !h.contains_key(&CONTENT_LENGTH)
        && (req.method == Method::POST || req.method == Method::PUT)
    {
        &[content_length, "0"]
    } else {
        &[content_length]
    };
    let date = header(h, &DATE);
    let dates: &[&str] = if h.contains_key(&DATE) && h.contains_key(&OCP_DATE) {
        &[date, ""]
    } else {
        &[date]
    };
    let ocp = ocp_headers(h);
    let decoded_path = if req.raw_path.contains('%') {
        decode(req.raw_path).filter(|d| d != req.raw_path)
    } else {
        None
    };
    let paths: &[&str] = match &decoded_path {
        Some(d) => &[req.raw_path, d.as_str()],
        None => &[req.raw_path],
    };
    let queries = CanonicalQuery::of(params);

    let feed = |mac: &mut Hmac<Sha256>, parts: &[&str]| {
        for part in parts {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
    };
    for key in keys {
        let mut start = key.mac();
        feed(
            &mut start,
            &[
                req.method.as_str(),
                header(h, &CONTENT_ENCODING),
                header(h, &CONTENT_LANGUAGE),
            ],
        );
        for cl in content_lengths {
            let mut with_cl = start.clone();
            feed(
                &mut with_cl,
                &[cl, header(h, &CONTENT_MD5), header(h, &CONTENT_TYPE)],
            );
            for date in dates {
                let mut with_date = with_cl.clone();
                feed(
                    &mut with_date,
                    &[
                        date,
                        header(h, &IF_MODIFIED_SINCE),
                        header(h, &IF_MATCH),
                        header(h, &IF_NONE_MATCH),
                        header(h, &IF_UNMODIFIED_SINCE),
                        header(h, &RANGE),
                    ],
                );
                for (name, value) in &ocp {
                    with_date.update(name.as_bytes());
                    with_date.update(b":");
                    with_date.update(value.as_bytes());
                    with_date.update(b"\n");
                }
                with_date.update(b"/");
                with_date.update(account.as_bytes());
                for path in paths {
                    let mut with_path = with_date.clone();
                    with_path.update(path.as_bytes());
                    for lower in queries.forms() {
                        let mut mac = with_path.clone();
                        queries.feed(&mut mac, lower);
                        if mac.verify_slice(given).is_ok() {
                            return true;
                        }
                    }
                }
            }
        }
    }
    false
}

/// The `ocp-*` headers that are signed, sorted by name (names are lower-case in a `HeaderMap`),
/// empty values left out.
fn ocp_headers(h: &HeaderMap) -> Vec<(&str, &str)> {
    let mut ocp: Vec<(&str, &str)> = h
        .iter()
        .filter(|(name, _)| name.as_str().contains("ocp-"))
        .filter_map(|(name, v)| Some((name.as_str(), v.to_str().ok()?)))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    ocp.sort_by(|a, b| a.0.cmp(b.0));
    ocp
}

/// The canonical query of Shared Key: `\nname:value` for each parameter sorted by name, empty
/// values skipped, first value of a repeated name; once with names as sent and, when a name has
/// an upper-case letter, once lower-cased (older clients).
struct CanonicalQuery<'p> {
    sorted: Vec<(&'p str, &'p str)>,
    /// The lower-cased form, when it differs.
    lower: Option<Vec<(String, &'p str)>>,
}

impl<'p> CanonicalQuery<'p> {
    fn of(params: &'p Params<'_>) -> Self {
        let mut kept: Vec<(&str, &str)> = Vec::with_capacity(params.pairs().len());
        for (n, v) in params.pairs() {
            if v.is_empty() || kept.iter().any(|(seen, _)| *seen == n.as_ref()) {
                continue;
            }
            kept.push((n.as_ref(), v.as_ref()));
        }
        let lower = kept
            .iter()
            .any(|(n, _)| n.bytes().any(|b| b.is_ascii_uppercase()))
            .then(|| {
                let mut l: Vec<(String, &str)> = kept
                    .iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), *v))
                    .collect();
                l.sort_by(|a, b| a.0.cmp(&b.0));
                l
            });
        kept.sort_by(|a, b| a.0.cmp(b.0));
        Self {
            sorted: kept,
            lower,
        }
    }

    /// `false` (names as sent), then `true` (lower-cased) when that form differs.
    fn forms(&self) -> impl Iterator<Item = bool> {
        std::iter::once(false).chain(self.lower.is_some().then_some(true))
    }

    fn feed(&self, mac: &mut Hmac<Sha256>, lower: bool) {
        let mut one = |n: &str, v: &str| {
            mac.update(b"\n");
            mac.update(n.as_bytes());
            mac.update(b":");
            mac.update(v.as_bytes());
        };
        match (&self.lower, lower) {
            (Some(l), true) => l.iter().for_each(|(n, v)| one(n, v)),
            _ => self.sorted.iter().for_each(|(n, v)| one(n, v)),
        }
    }
}

fn malformed() -> BatchError {
    BatchError::new(Code::InvalidAuthenticationInfo).with(
        "AuthenticationErrorDetail",
        "The Authorization header must be 'SharedKey <account>:<signature>' or 'Bearer <token>'.",
    )
}

/// The string-to-sign variants real clients produce for this request.
pub fn strings_to_sign(req: &Signed<'_>, account: &str) -> Vec<String> {
    let h = req.headers;
    let mut content_lengths = vec![header(h, "content-length")];
    if !h.contains_key("content-length")
        && (req.method == Method::POST || req.method == Method::PUT)
    {
        content_lengths.push("0");
    }
    let mut dates = vec![header(h, "date")];
    if h.contains_key("date") && h.contains_key("ocp-date") {
        dates.push("");
    }
    let canonical_headers = canonical_headers(h);
    let mut paths = vec![req.raw_path.to_string()];
    if req.raw_path.contains('%')
        && let Some(decoded) = decode(req.raw_path)
        && decoded != req.raw_path
    {
        paths.push(decoded);
    }
    let queries = canonical_queries(req.raw_query);

    let mut out = Vec::new();
    for cl in &content_lengths {
        for date in &dates {
            let mut head = String::with_capacity(256);
            head.push_str(req.method.as_str());
            head.push('\n');
            for name in STANDARD_HEADERS {
                let v = match name {
                    "content-length" => cl,
                    "date" => date,
                    _ => header(h, name),
                };
                head.push_str(v);
                head.push('\n');
            }
            head.push_str(&canonical_headers);
            for path in &paths {
                for query in &queries {
                    out.push(format!("{head}/{account}{path}{query}"));
                }
            }
        }
    }
    out
}

fn canonical_headers(h: &HeaderMap) -> String {
    let mut ocp: Vec<(String, &str)> = h
        .iter()
        .filter(|(name, _)| name.as_str().contains("ocp-"))
        .filter_map(|(name, v)| Some((name.as_str().to_ascii_lowercase(), v.to_str().ok()?)))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    ocp.sort_by(|a, b| a.0.cmp(&b.0));
    ocp.iter().map(|(n, v)| format!("{n}:{v}\n")).collect()
}

/// `\nname:value` for each parameter sorted by name, empty values skipped, first value of a
/// repeated name; once with names as sent and once lower-cased (older clients), deduplicated.
fn canonical_queries(raw: &str) -> Vec<String> {
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(n), Some(v)) = (decode_query(n), decode_query(v)) else {
            continue;
        };
        if v.is_empty() || params.iter().any(|(seen, _)| *seen == n) {
            continue;
        }
        params.push((n, v));
    }
    let render = |lower: bool| {
        let mut p: Vec<(String, &str)> = params
            .iter()
            .map(|(n, v)| {
                (
                    if lower {
                        n.to_ascii_lowercase()
                    } else {
                        n.clone()
                    },
                    v.as_str(),
                )
            })
            .collect();
        p.sort_by(|a, b| a.0.cmp(&b.0));
        p.iter()
            .map(|(n, v)| format!("\n{n}:{v}"))
            .collect::<String>()
    };
    let mut out = vec![render(false)];
    let lower = render(true);
    if lower != out[0] {
        out.push(lower);
    }
    out
}

fn decode_query(s: &str) -> Option<String> {
    decode(&s.replace('+', " "))
}

/// The `Authorization` value a client sends for this request (the first, canonical form).
/// Used by bluebatch's own clients (the control CLI, the benchmark).
pub fn authorization(req: &Signed<'_>, account: &str, key: &[u8]) -> String {
    let sts = strings_to_sign(req, account).swap_remove(0);
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(sts.as_bytes());
    format!(
        "SharedKey {account}:{}",
        STANDARD.encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const KEY: &str = "Ymx1ZWJhdGNoLWNvbnRyYWN0LXRlc3QtdmVjdG9yLWs=";

    fn accounts() -> Accounts {
        let a = Accounts::default();
        a.add("testaccount", &[KEY.to_string()]).unwrap();
        a
    }

    fn sign(s: &str) -> String {
        let key = STANDARD.decode(KEY).unwrap();
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).unwrap();
        mac.update(s.as_bytes());
        STANDARD.encode(mac.finalize().into_bytes())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn vector_time() -> OffsetDateTime {
        parse_rfc1123("Wed, 25 Nov 2026 12:00:00 GMT").unwrap()
    }

    #[test]
    fn contract_test_vector_put() {
        let expected_sts = "PUT\n\n\n64\n\napplication/json; odata=minimalmetadata\n\n\n\n\n\n\nocp-date:Wed, 25 Nov 2026 12:00:00 GMT\n/testaccount/pools/pool1/nodes/tvm-1/users/alice\napi-version:2023-11-01.18.0\ntimeout:30";
        assert_eq!(
            sign(expected_sts),
            "EXRKCrceoZphQQOEB8/qRFmHxFg76KlI20OR6up1hOg="
        );
        let mut h = headers(&[
            ("ocp-date", "Wed, 25 Nov 2026 12:00:00 GMT"),
            ("content-type", "application/json; odata=minimalmetadata"),
            ("content-length", "64"),
        ]);
        let sts = |h: &HeaderMap| {
            let req = Signed {
                method: &Method::PUT,
                raw_path: "/pools/pool1/nodes/tvm-1/users/alice",
                raw_query: "api-version=2023-11-01.18.0&timeout=30",
                headers: h,
            };
            strings_to_sign(&req, "testaccount")[0].clone()
        };
        assert_eq!(sts(&h), expected_sts);
        h.insert(
            "authorization",
            HeaderValue::from_static(
                "SharedKey testaccount:EXRKCrceoZphQQOEB8/qRFmHxFg76KlI20OR6up1hOg=",
            ),
        );
        let req = Signed {
            method: &Method::PUT,
            raw_path: "/pools/pool1/nodes/tvm-1/users/alice",
            raw_query: "api-version=2023-11-01.18.0&timeout=30",
            headers: &h,
        };
        assert_eq!(
            verify(&req, &accounts(), vector_time()).unwrap(),
            "testaccount"
        );
        // Fresh within 15 minutes either way; stale beyond.
        assert!(verify(&req, &accounts(), vector_time() + Duration::minutes(14)).is_ok());
        let e = verify(&req, &accounts(), vector_time() - Duration::minutes(16)).unwrap_err();
        assert_eq!(e.code, Code::AuthenticationFailed);
    }

    #[test]
    fn contract_test_vector_delete_with_and_without_content_length() {
        for (cl, sig) in [
            (Some("0"), "CQr4zoSSQ47ud3Mk3+gqSZSI1YB2sgLxf3+xvRcyXCo="),
            (None, "GqjyuWK10FXtg2VB6kcUFGUjMh3NHjDlwg2WHSD9Xec="),
        ] {
            let mut h = headers(&[("ocp-date", "Wed, 25 Nov 2026 12:00:00 GMT")]);
            if cl.is_some() {
                h.insert("content-length", HeaderValue::from_static("0"));
            }
            h.insert(
                "authorization",
                HeaderValue::from_str(&format!("SharedKey testaccount:{sig}")).unwrap(),
            );
            let req = Signed {
                method: &Method::DELETE,
                raw_path: "/pools/pool1/nodes/tvm-1/users/alice",
                raw_query: "api-version=2025-06-01&timeOut=30",
                headers: &h,
            };
            assert_eq!(
                verify(&req, &accounts(), vector_time()).unwrap(),
                "testaccount",
                "{cl:?}"
            );
        }
    }

    #[test]
    fn refusals_have_the_right_codes() {
        let base = [("ocp-date", "Wed, 25 Nov 2026 12:00:00 GMT")];
        let check = |auth: Option<&str>, code: Code| {
            let mut h = headers(&base);
            if let Some(a) = auth {
                h.insert("authorization", HeaderValue::from_str(a).unwrap());
            }
            let req = Signed {
                method: &Method::GET,
                raw_path: "/pools",
                raw_query: "api-version=2025-06-01",
                headers: &h,
            };
            let e = verify(&req, &accounts(), vector_time()).unwrap_err();
            assert_eq!(e.code, code, "{auth:?}");
            assert_eq!(e.status(), code.status());
        };
        check(None, Code::AuthenticationRequired);
        check(Some("Basic abc"), Code::InvalidAuthenticationInfo);
        check(Some("SharedKey nocolon"), Code::InvalidAuthenticationInfo);
        check(
            Some("SharedKey testaccount:AAAA"),
            Code::AuthenticationFailed,
        );
        check(Some("SharedKey other:AAAA"), Code::AuthenticationFailed);
        check(
            Some("SharedKey testaccount:!!notbase64"),
            Code::AuthenticationFailed,
        );
    }

    #[test]
    fn accepts_lowercased_query_names_and_decoded_paths() {
        let h = headers(&[("ocp-date", "Wed, 25 Nov 2026 12:00:00 GMT")]);
        let req = Signed {
            method: &Method::GET,
            raw_path: "/pools/p%31",
            raw_query: "api-version=2025-06-01&timeOut=30&%24filter=state%20eq%20%27idle%27&empty=",
            headers: &h,
        };
        let all = strings_to_sign(&req, "a");
        assert!(all.iter().any(|s| s.ends_with(
            "/a/pools/p%31\n$filter:state eq 'idle'\napi-version:2025-06-01\ntimeOut:30"
        )));
        assert!(all.iter().any(|s| s.ends_with(
            "/a/pools/p1\n$filter:state eq 'idle'\napi-version:2025-06-01\ntimeout:30"
        )));
    }

    /// The verifier feeds a precomputed MAC the parts of each form instead of formatting the
    /// strings: every form `strings_to_sign` lists (content-length absent on a PUT, Date beside
    /// ocp-date, an encoded path, upper-case and repeated query names, empty values, several
    /// ocp- headers, a secondary key) verifies, and nothing else does.
    #[test]
    fn every_listed_form_verifies_and_nothing_else() {
        const SECOND: &str = "c2Vjb25kYXJ5LWtleS1vZi10aGUtdGVzdC1hY2NvdW50";
        let accounts = Accounts::default();
        accounts
            .add("testaccount", &[KEY.to_string(), SECOND.to_string()])
            .unwrap();
        type Case<'a> = (Method, &'a str, &'a str, &'a [(&'static str, &'a str)]);
        let cases: [Case; 4] = [
            (
                Method::PUT,
                "/pools/p%31/nodes/n1/users/a%20b",
                "api-version=2025-06-01&timeOut=30&timeout=5&%24filter=a+b&empty=",
                &[
                    ("ocp-date", "Wed, 25 Nov 2026 12:00:00 GMT"),
                    ("date", "Wed, 25 Nov 2026 12:00:00 GMT"),
                    ("content-type", "application/json"),
                    ("ocp-zeta", "z"),
                    ("x-ocp-alpha", "a"),
                    ("ocp-empty", ""),
                ],
            ),
            (
                Method::POST,
                "/pools",
                "api-version=2025-06-01",
                &[("ocp-date", "Wed, 25 Nov 2026 12:00:00 GMT")],
            ),
            (
                Method::GET,
                "/pools/p1",
                "",
                &[
                    ("date", "Wed, 25 Nov 2026 12:00:00 GMT"),
                    ("if-match", "0x1"),
                    ("range", "bytes=0-1"),
                ],
            ),
            (
                Method::DELETE,
                "/pools/p1/nodes/n1/users/alice",
                "API-Version=2025-06-01",
                &[
                    ("ocp-date", "Wed, 25 Nov 2026 12:00:00 GMT"),
                    ("content-length", "0"),
                ],
            ),
        ];
        for (method, path, query, hs) in &cases {
            let (path, query) = (*path, *query);
            let base = headers(hs);
            let unsigned = Signed {
                method,
                raw_path: path,
                raw_query: query,
                headers: &base,
            };
            let forms = strings_to_sign(&unsigned, "testaccount");
            for key in [KEY, SECOND] {
                let key = STANDARD.decode(key).unwrap();
                for (i, sts) in forms
                    .iter()
                    .cloned()
                    .chain(std::iter::once(format!("{}x", forms[0])))
                    .enumerate()
                {
                    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).unwrap();
                    mac.update(sts.as_bytes());
                    let sig = STANDARD.encode(mac.finalize().into_bytes());
                    let mut h = base.clone();
                    h.insert(
                        "authorization",
                        HeaderValue::from_str(&format!("SharedKey testaccount:{sig}")).unwrap(),
                    );
                    let req = Signed {
                        method,
                        raw_path: path,
                        raw_query: query,
                        headers: &h,
                    };
                    let got = verify(&req, &accounts, vector_time());
                    if i < forms.len() {
                        assert_eq!(
                            got.unwrap(),
                            "testaccount",
                            "{method} {path} form {i}: {sts:?}"
                        );
                    } else {
                        assert_eq!(got.unwrap_err().code, Code::AuthenticationFailed, "{sts:?}");
                    }
                }
            }
            assert!(!forms.is_empty());
        }
        // The first case has every kind of variant: 2 dates × 2 paths × 2 query forms.
        let h = headers(cases[0].3);
        let req = Signed {
            method: &Method::PUT,
            raw_path: cases[0].1,
            raw_query: cases[0].2,
            headers: &h,
        };
        assert_eq!(strings_to_sign(&req, "testaccount").len(), 16);
    }
}
