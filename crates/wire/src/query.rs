//! Query parameters: api-version, timeout and the OData list parameters.

use crate::endpoint::Endpoint;
use crate::percent::decode;
use bluebatch_core::error::{BatchError, Code};
use std::borrow::Cow;

/// Every published Batch data-plane version (the `stable/` folders of Azure's spec repository).
/// They share the semantics of the operations in scope.
pub const API_VERSIONS: &[&str] = &[
    "2015-12-01.2.2",
    "2016-02-01.3.0",
    "2016-07-01.3.1",
    "2017-01-01.4.0",
    "2017-05-01.5.0",
    "2017-06-01.5.1",
    "2017-09-01.6.0",
    "2018-03-01.6.1",
    "2018-08-01.7.0",
    "2018-12-01.8.0",
    "2019-06-01.9.0",
    "2019-08-01.10.0",
    "2020-03-01.11.0",
    "2020-09-01.12.0",
    "2021-06-01.14.0",
    "2022-01-01.15.0",
    "2022-10-01.16.0",
    "2023-05-01.17.0",
    "2023-11-01.18.0",
    "2024-02-01.19.0",
    "2024-07-01.20.0",
    "2025-06-01",
];

pub const DEFAULT_TIMEOUT: u32 = 30;
pub const MAX_RESULTS: u32 = 1000;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub api_version: String,
    pub timeout: u32,
    pub filter: Option<String>,
    pub select: Option<String>,
    pub expand: Option<String>,
    pub max_results: u32,
    pub skip_token: Option<String>,
    /// Parameters as sent (decoded), minus `$skiptoken`, to build `odata.nextLink` (lists only:
    /// no other answer links onwards).
    pub for_next_link: Vec<(String, String)>,
}

impl Query {
    /// How long a write waits for its node's acknowledgement: the request's `timeout`.
    pub fn ack_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.timeout.max(1)))
    }
}

/// The query string decoded once: every (name, value) pair in order, borrowed from the request
/// line where nothing needed decoding. The api-version check, Shared Key's canonical form and
/// [`parse`] all read this one pass.
#[derive(Debug, Default)]
pub struct Params<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

/// `+` as a space, then `%XX` escapes; borrowed when there is neither.
fn decode_part(s: &str) -> Option<Cow<'_, str>> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Some(Cow::Borrowed(s));
    }
    if s.contains('+') {
        decode(&s.replace('+', " ")).map(Cow::Owned)
    } else {
        decode(s).map(Cow::Owned)
    }
}

impl<'a> Params<'a> {
    /// Decoded (name, value) pairs; a malformed escape is `InvalidQueryParameterValue`.
    pub fn parse(raw: &'a str) -> Result<Self, BatchError> {
        let mut pairs = Vec::new();
        for p in raw.split('&').filter(|p| !p.is_empty()) {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            match (decode_part(n), decode_part(v)) {
                (Some(n), Some(v)) => pairs.push((n, v)),
                (n, _) => {
                    return Err(BatchError::new(Code::InvalidQueryParameterValue)
                        .with("QueryParameterName", n.unwrap_or_default().into_owned())
                        .with("Reason", "the value is not correctly percent-encoded UTF-8"));
                }
            }
        }
        Ok(Self { pairs })
    }

    /// As [`Params::parse`], leaving out the pairs that do not decode (what Shared Key's
    /// canonical form does with them).
    pub fn lenient(raw: &'a str) -> Self {
        let pairs = raw
            .split('&')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (n, v) = p.split_once('=').unwrap_or((p, ""));
                Some((decode_part(n)?, decode_part(v)?))
            })
            .collect();
        Self { pairs }
    }

    /// The decoded pairs, in request order.
    pub fn pairs(&self) -> &[(Cow<'a, str>, Cow<'a, str>)] {
        &self.pairs
    }
}

/// The api-version check, which comes before authentication.
pub fn api_version<'p>(params: &'p Params<'_>, accept_any: bool) -> Result<&'p str, BatchError> {
    let v = params
        .pairs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("api-version"))
        .map(|(_, v)| v.as_ref())
        .ok_or_else(|| {
            BatchError::new(Code::MissingRequiredQueryParameter)
                .with("QueryParameterName", "api-version")
        })?;
    if !accept_any && !API_VERSIONS.contains(&v) {
        return Err(BatchError::new(Code::UnsupportedRequestVersion)
            .with("QueryParameterName", "api-version")
            .with(
                "QueryParameterValue",
                v.chars().take(64).collect::<String>(),
            ));
    }
    Ok(v)
}

/// Every query parameter of the request, checked against what the endpoint knows.
pub fn parse(
    params: &Params<'_>,
    endpoint: &Endpoint,
    api_version: &str,
) -> Result<Query, BatchError> {
    let mut q = Query {
        api_version: api_version.to_string(),
        timeout: DEFAULT_TIMEOUT,
        max_results: MAX_RESULTS,
        ..Query::default()
    };
    let extra = endpoint.extra_query_params();
    // Only a list's answer links to its next page.
    let links = extra.contains(&"$skiptoken");
    for (name, value) in &params.pairs {
        let (name, value) = (name.as_ref(), value.as_ref());
        let bad = |code: Code, reason: &str| {
            BatchError::new(code)
                .with("QueryParameterName", name)
                .with(
                    "QueryParameterValue",
                    value.chars().take(64).collect::<String>(),
                )
                .with("Reason", reason)
        };
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        if is("api-version") {
        } else if is("timeout") {
            let t: i64 = value.parse().map_err(|_| {
                bad(
                    Code::InvalidQueryParameterValue,
                    "timeout is a whole number of seconds",
                )
            })?;
            if t < 1 {
                return Err(bad(
                    Code::OutOfRangeQueryParameterValue,
                    "timeout must be at least 1",
                ));
            }
            q.timeout = t.min(i64::from(DEFAULT_TIMEOUT)) as u32;
        } else if let Some(n) = extra.iter().find(|n| is(n)) {
            match *n {
                "$filter" => q.filter = Some(value.to_string()),
                "$select" => q.select = Some(value.to_string()),
                "$expand" => q.expand = Some(value.to_string()),
                "$skiptoken" => q.skip_token = Some(value.to_string()),
                "maxresults" => {
                    let m: i64 = value.parse().map_err(|_| {
                        bad(
                            Code::InvalidQueryParameterValue,
                            "maxresults is a whole number",
                        )
                    })?;
                    if !(1..=i64::from(MAX_RESULTS)).contains(&m) {
                        return Err(bad(
                            Code::OutOfRangeQueryParameterValue,
                            "maxresults must be between 1 and 1000",
                        ));
                    }
                    q.max_results = m as u32;
                }
                _ => unreachable!("every extra parameter is handled"),
            }
        } else {
            return Err(BatchError::new(Code::UnsupportedQueryParameter).with(
                "QueryParameterName",
                name.chars().take(64).collect::<String>(),
            ));
        }
        if links && !is("$skiptoken") {
            q.for_next_link.push((name.to_string(), value.to_string()));
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_version(raw: &str, accept_any: bool) -> Result<String, BatchError> {
        super::api_version(&Params::parse(raw)?, accept_any).map(str::to_string)
    }

    fn parse(raw: &str, endpoint: &Endpoint, api_version: String) -> Result<Query, BatchError> {
        super::parse(&Params::parse(raw)?, endpoint, &api_version)
    }

    #[test]
    fn api_version_rules() {
        assert_eq!(
            api_version("api-version=2025-06-01", false).unwrap(),
            "2025-06-01"
        );
        assert_eq!(
            api_version("timeout=3", false).unwrap_err().code,
            Code::MissingRequiredQueryParameter
        );
        assert_eq!(
            api_version("api-version=2099-01-01", false)
                .unwrap_err()
                .code,
            Code::UnsupportedRequestVersion
        );
        assert_eq!(
            api_version("api-version=2099-01-01", true).unwrap(),
            "2099-01-01"
        );
    }

    #[test]
    fn timeout_and_list_parameters() {
        let e = Endpoint::PoolList;
        let q = parse(
            "api-version=x&timeOut=90&maxresults=5&%24filter=state%20eq%20%27active%27",
            &e,
            "x".into(),
        )
        .unwrap();
        assert_eq!((q.timeout, q.max_results), (30, 5));
        assert_eq!(q.filter.as_deref(), Some("state eq 'active'"));
        let code = |s: &str| parse(s, &e, "x".into()).unwrap_err().code;
        assert_eq!(code("timeout=abc"), Code::InvalidQueryParameterValue);
        assert_eq!(code("timeout=0"), Code::OutOfRangeQueryParameterValue);
        assert_eq!(code("maxresults=1001"), Code::OutOfRangeQueryParameterValue);
        assert_eq!(code("bogus=1"), Code::UnsupportedQueryParameter);
        let get = Endpoint::PoolGet { pool: "p".into() };
        assert_eq!(
            parse("maxresults=5", &get, "x".into()).unwrap_err().code,
            Code::UnsupportedQueryParameter
        );
    }
}
