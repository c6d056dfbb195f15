//! HTTP conditional headers on pool operations (If-Match, If-None-Match, If-Modified-Since,
//! If-Unmodified-Since), as HTTP defines them.

use axum::http::HeaderMap;
use bluebatch_core::error::{BatchError, Code};
use bluebatch_core::timefmt::parse_rfc1123;
use time::OffsetDateTime;

#[derive(Debug, Default, Clone)]
pub struct Conditions {
    if_match: Option<String>,
    if_none_match: Option<String>,
    if_modified_since: Option<OffsetDateTime>,
    if_unmodified_since: Option<OffsetDateTime>,
}

/// A failed condition: `NotModified` answers 304 on GET/HEAD; everything else is 412.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    NotModified,
    ConditionNotMet,
}

/// Whether `list` (an If-Match or If-None-Match value: `*` or entity tags, quoted or, as Batch
/// clients send them, bare) names `etag`. `strong` is If-Match's comparison (RFC 9110 §13.1.1):
/// a weak tag (`W/"…"`) never matches, since the service's ETags are all strong. If-None-Match
/// compares weakly (§13.1.2): `W/"…"` matches the same tag.
fn etag_matches(list: &str, etag: &str, strong: bool) -> bool {
    list.split(',').map(str::trim).any(|t| {
        if t == "*" {
            return true;
        }
        let (weak, tag) = match t.strip_prefix("W/") {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        !(weak && strong) && tag.trim_matches('"') == etag
    })
}

impl Conditions {
    pub fn parse(h: &HeaderMap) -> Result<Self, BatchError> {
        let text = |name: &str| -> Result<Option<String>, BatchError> {
            match h.get(name) {
                None => Ok(None),
                Some(v) => v.to_str().map(|s| Some(s.to_string())).map_err(|_| {
                    BatchError::new(Code::InvalidHeaderValue).with("HeaderName", name)
                }),
            }
        };
        let date = |name: &str| -> Result<Option<OffsetDateTime>, BatchError> {
            match text(name)? {
                None => Ok(None),
                Some(s) => parse_rfc1123(&s).map(Some).ok_or_else(|| {
                    BatchError::new(Code::InvalidHeaderValue)
                        .with("HeaderName", name)
                        .with("HeaderValue", s.chars().take(100).collect::<String>())
                }),
            }
        };
        Ok(Self {
            if_match: text("if-match")?,
            if_none_match: text("if-none-match")?,
            if_modified_since: date("if-modified-since")?,
            if_unmodified_since: date("if-unmodified-since")?,
        })
    }

    /// Checks the resource's current ETag and Last-Modified (HTTP dates have whole seconds).
    pub fn check(
        &self,
        etag: &str,
        last_modified: OffsetDateTime,
        read: bool,
    ) -> Result<(), Failed> {
        let lm = last_modified.replace_nanosecond(0).unwrap_or(last_modified);
        if let Some(m) = &self.if_match
            && !etag_matches(m, etag, true)
        {
            return Err(Failed::ConditionNotMet);
        }
        if let Some(t) = self.if_unmodified_since
            && self.if_match.is_none()
            && lm > t
        {
            return Err(Failed::ConditionNotMet);
        }
        let not_modified = if read {
            Failed::NotModified
        } else {
            Failed::ConditionNotMet
        };
        if let Some(m) = &self.if_none_match {
            if etag_matches(m, etag, false) {
                return Err(not_modified);
            }
        } else if let Some(t) = self.if_modified_since
            && lm <= t
        {
            return Err(not_modified);
        }
        Ok(())
    }

    /// The write form: every failure is 412 ConditionNotMet.
    pub fn check_write(&self, etag: &str, last_modified: OffsetDateTime) -> Result<(), BatchError> {
        self.check(etag, last_modified, false)
            .map_err(|_| BatchError::new(Code::ConditionNotMet))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use time::macros::datetime;

    fn conds(pairs: &[(&'static str, &'static str)]) -> Conditions {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, HeaderValue::from_static(v));
        }
        Conditions::parse(&h).unwrap()
    }

    #[test]
    fn http_semantics() {
        let lm = datetime!(2026-11-25 12:00:00.5 UTC);
        let e = "0x8D1";
        assert!(conds(&[("if-match", "0x8D1")]).check(e, lm, true).is_ok());
        assert!(
            conds(&[("if-match", "\"0x8D1\"")])
                .check(e, lm, true)
                .is_ok()
        );
        assert_eq!(
            conds(&[("if-match", "0x8D2")]).check(e, lm, true),
            Err(Failed::ConditionNotMet)
        );
        assert_eq!(
            conds(&[("if-none-match", "*")]).check(e, lm, true),
            Err(Failed::NotModified)
        );
        assert_eq!(
            conds(&[("if-none-match", "0x8D1")]).check(e, lm, false),
            Err(Failed::ConditionNotMet)
        );
        let since = [("if-modified-since", "Wed, 25 Nov 2026 12:00:00 GMT")];
        assert_eq!(conds(&since).check(e, lm, true), Err(Failed::NotModified));
        let before = [("if-unmodified-since", "Wed, 25 Nov 2026 11:59:59 GMT")];
        assert_eq!(
            conds(&before).check(e, lm, false),
            Err(Failed::ConditionNotMet)
        );
        assert!(conds(&[]).check(e, lm, false).is_ok());
        // If-Match compares strongly: a weak tag never matches, alone or in a list.
        for weak in ["W/\"0x8D1\"", "W/0x8D1", "W/\"0x8D2\", W/\"0x8D1\""] {
            let c = Conditions {
                if_match: Some(weak.into()),
                ..Default::default()
            };
            assert_eq!(c.check(e, lm, true), Err(Failed::ConditionNotMet), "{weak}");
        }
        assert!(
            conds(&[("if-match", "W/\"0x8D2\", \"0x8D1\"")])
                .check(e, lm, true)
                .is_ok()
        );
        // If-None-Match compares weakly: `W/"0x8D1"` matches 0x8D1.
        assert_eq!(
            conds(&[("if-none-match", "W/\"0x8D1\"")]).check(e, lm, true),
            Err(Failed::NotModified)
        );
        let mut h = HeaderMap::new();
        h.insert("if-modified-since", HeaderValue::from_static("yesterday"));
        assert_eq!(
            Conditions::parse(&h).unwrap_err().code,
            Code::InvalidHeaderValue
        );
    }
}
