//! Dates as Azure writes and reads them: ISO 8601 UTC with up to seven fractional digits (trailing
//! zeros dropped) in bodies, RFC 1123 with `GMT` in headers.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// `2016-11-27T00:45:48.7320857Z`, `2016-11-22T19:37:28.623369Z`, `2017-08-01T00:00:00Z`.
pub fn iso(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let base = t
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]"
        ))
        .expect("formatting a UTC date cannot fail");
    let ticks = t.nanosecond() / 100; // Azure keeps 100 ns ticks
    if ticks == 0 {
        format!("{base}Z")
    } else {
        let frac = format!("{ticks:07}");
        format!("{base}.{}Z", frac.trim_end_matches('0'))
    }
}

/// Parses an RFC 3339 date-time with `Z` or an offset and 0–7 fractional digits; converts to UTC.
/// A date-time without a zone, or more than seven fractional digits, is refused.
pub fn parse_iso(s: &str) -> Option<OffsetDateTime> {
    let frac_digits = s
        .find('.')
        .map(|i| s[i + 1..].bytes().take_while(u8::is_ascii_digit).count())
        .unwrap_or(0);
    if frac_digits > 7 || s.len() > 40 {
        return None;
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    Some(t.to_offset(UtcOffset::UTC))
}

const RFC1123: &[time::format_description::BorrowedFormatItem<'static>] = format_description!(
    "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
);

/// `Wed, 25 Nov 2026 12:00:00 GMT`.
pub fn rfc1123(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(RFC1123)
        .expect("formatting a UTC date cannot fail")
}

pub fn parse_rfc1123(s: &str) -> Option<OffsetDateTime> {
    PrimitiveDateTime::parse(s.trim(), RFC1123)
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trips_azure_examples() {
        for s in [
            "2016-11-27T00:45:48.7320857Z",
            "2016-11-22T19:37:28.623369Z",
            "2017-08-01T00:00:00Z",
            "2016-11-22T19:37:31.4Z",
        ] {
            assert_eq!(iso(parse_iso(s).unwrap()), s);
        }
    }

    #[test]
    fn iso_accepts_offsets_and_refuses_zoneless() {
        assert_eq!(
            iso(parse_iso("2017-08-01T02:00:00+02:00").unwrap()),
            "2017-08-01T00:00:00Z"
        );
        assert!(parse_iso("2017-08-01T00:00:00").is_none());
        assert!(parse_iso("2017-08-01").is_none());
        assert!(parse_iso("2017-08-01T00:00:00.123456789Z").is_none());
        assert!(parse_iso("garbage").is_none());
        assert!(parse_iso("2017-02-30T00:00:00Z").is_none());
    }

    #[test]
    fn rfc1123_round_trips() {
        let s = "Wed, 25 Nov 2026 12:00:00 GMT";
        let t = parse_rfc1123(s).unwrap();
        assert_eq!(rfc1123(t), s);
        assert!(parse_rfc1123("Wed, 25 Nov 2026 12:00:00 +0000").is_none());
    }
}

/// An ISO 8601 duration as Batch writes them (`PT15M`, `PT1H30M`, `P1DT2H`, `PT0.5S`); weeks,
/// months and years are refused (Batch takes none).
pub fn parse_iso_duration(s: &str) -> Option<std::time::Duration> {
    let rest = s.strip_prefix('P')?;
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    if rest.is_empty() || time == Some("") {
        return None;
    }
    let mut total = 0f64;
    let mut take = |part: &str, units: &[(char, f64)]| -> Option<()> {
        let mut num = String::new();
        let mut next_unit = 0;
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                num.push(c);
                continue;
            }
            let i = units[next_unit..].iter().position(|(u, _)| *u == c)? + next_unit;
            if num.is_empty() {
                return None;
            }
            total += num.parse::<f64>().ok()? * units[i].1;
            num.clear();
            next_unit = i + 1;
        }
        num.is_empty().then_some(())
    };
    take(date, &[('D', 86_400.0)])?;
    if let Some(t) = time {
        take(t, &[('H', 3_600.0), ('M', 60.0), ('S', 1.0)])?;
    }
    (total.is_finite() && total < 1e12).then(|| std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod duration_tests {
    use super::parse_iso_duration;
    use std::time::Duration;

    #[test]
    fn iso_durations() {
        assert_eq!(parse_iso_duration("PT15M"), Some(Duration::from_secs(900)));
        assert_eq!(
            parse_iso_duration("PT1H30M"),
            Some(Duration::from_secs(5400))
        );
        assert_eq!(
            parse_iso_duration("P1DT1S"),
            Some(Duration::from_secs(86_401))
        );
        assert_eq!(
            parse_iso_duration("PT0.5S"),
            Some(Duration::from_millis(500))
        );
        for bad in ["", "P", "PT", "15M", "PT15", "PTM", "PT1S1H", "P1W"] {
            assert_eq!(parse_iso_duration(bad), None, "{bad}");
        }
    }
}
