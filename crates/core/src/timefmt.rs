//! Dates as Azure writes and reads them: ISO 8601 UTC with up to seven fractional digits (trailing
//! zeros dropped) in bodies, RFC 1123 with `GMT` in headers.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// `2016-11-27T00:45:48.7320857Z`, `2016-11-22T19:37:28.623369Z`, `2017-08-01T00:00:00Z`.
pub fn iso(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    match iso_bytes(t) {
        // Only ASCII was written.
        Some((b, len)) => b[..len].iter().map(|&c| c as char).collect(),
        None => iso_general(t),
    }
}

/// [`iso`] through the format-description machinery (any year).
fn iso_general(t: OffsetDateTime) -> String {
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

/// [`iso`] of a UTC instant of years 0–9999, written by hand (every resource in an answer
/// carries several dates; the format-description machinery costs more than the rest of a
/// node's JSON). The bytes and how many of them are the date.
fn iso_bytes(t: OffsetDateTime) -> Option<([u8; 28], usize)> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let mut b = *b"YYYY-MM-DDTHH:MM:SS.fffffffZ";
    two_digits(&mut b[0..2], (year / 100) as u8);
    two_digits(&mut b[2..4], (year % 100) as u8);
    two_digits(&mut b[5..7], u8::from(t.month()));
    two_digits(&mut b[8..10], t.day());
    two_digits(&mut b[11..13], t.hour());
    two_digits(&mut b[14..16], t.minute());
    two_digits(&mut b[17..19], t.second());
    let mut ticks = t.nanosecond() / 100; // Azure keeps 100 ns ticks
    if ticks == 0 {
        b[19] = b'Z';
        return Some((b, 20));
    }
    for i in (20..27).rev() {
        b[i] = b'0' + (ticks % 10) as u8;
        ticks /= 10;
    }
    // Trailing zeros dropped.
    let mut end = 27;
    while b[end - 1] == b'0' {
        end -= 1;
    }
    b[end] = b'Z';
    Some((b, end + 1))
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
    let t = t.to_offset(UtcOffset::UTC);
    match rfc1123_bytes(t) {
        // Only ASCII was written.
        Some(b) => b.iter().map(|&c| c as char).collect(),
        None => t
            .format(RFC1123)
            .expect("formatting a UTC date cannot fail"),
    }
}

const WEEKDAYS: [&[u8; 3]; 7] = [b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun"];
const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// [`rfc1123`] of a UTC instant of years 0–9999, written by hand (a header of every write's
/// answer; the format-description machinery costs more than the rest of it).
fn rfc1123_bytes(t: OffsetDateTime) -> Option<[u8; 29]> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let mut b = *b"Www, DD Mmm YYYY HH:MM:SS GMT";
    b[..3].copy_from_slice(WEEKDAYS[t.weekday().number_days_from_monday() as usize]);
    two_digits(&mut b[5..7], t.day());
    b[8..11].copy_from_slice(MONTHS[u8::from(t.month()) as usize - 1]);
    two_digits(&mut b[12..14], (year / 100) as u8);
    two_digits(&mut b[14..16], (year % 100) as u8);
    two_digits(&mut b[17..19], t.hour());
    two_digits(&mut b[20..22], t.minute());
    two_digits(&mut b[23..25], t.second());
    Some(b)
}

fn two_digits(out: &mut [u8], v: u8) {
    out[0] = b'0' + v / 10;
    out[1] = b'0' + v % 10;
}

pub fn parse_rfc1123(s: &str) -> Option<OffsetDateTime> {
    let s = s.trim();
    parse_rfc1123_canonical(s.as_bytes()).or_else(|| {
        PrimitiveDateTime::parse(s, RFC1123)
            .ok()
            .map(PrimitiveDateTime::assume_utc)
    })
}

/// The date of a header exactly as [`rfc1123`] writes it (the usual case: every signed request
/// carries one), read by hand; `None` for anything else (then the general parser decides, so
/// the answer is always the general parser's).
fn parse_rfc1123_canonical(b: &[u8]) -> Option<OffsetDateTime> {
    let b: &[u8; 29] = b.try_into().ok()?;
    if &b[3..5] != b", "
        || b[7] != b' '
        || b[11] != b' '
        || b[16] != b' '
        || b[19] != b':'
        || b[22] != b':'
        || &b[25..] != b" GMT"
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u16> {
        b[r].iter().try_fold(0u16, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u16::from(c - b'0'))
        })
    };
    let weekday = WEEKDAYS.iter().position(|w| w[..] == b[..3])?;
    let month = MONTHS.iter().position(|m| m[..] == b[8..11])? as u8 + 1;
    let date = time::Date::from_calendar_date(
        i32::from(num(12..16)?),
        time::Month::try_from(month).ok()?,
        num(5..7)? as u8,
    )
    .ok()?;
    // A weekday that is not the date's: the general parser's answer, whatever it is.
    if date.weekday().number_days_from_monday() as usize != weekday {
        return None;
    }
    let clock =
        time::Time::from_hms(num(17..19)? as u8, num(20..22)? as u8, num(23..25)? as u8).ok()?;
    Some(PrimitiveDateTime::new(date, clock).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `extra`, the first instant of year 0, and every day of 40 years around now at varied times
    /// of day and fractions of a second.
    fn instants(extra: &[OffsetDateTime]) -> Vec<OffsetDateTime> {
        let mut all = extra.to_vec();
        all.push(time::macros::datetime!(0000-01-01 00:00:00 UTC));
        let mut t = time::macros::datetime!(1999-12-25 23:59:59.999 UTC);
        for i in 0..(366 * 40) {
            all.push(t);
            let step = 86_400 + 3_607 * (i % 7) - 11_000;
            t += time::Duration::new(step, ((i * 7_919_311) % 1_000_000_000) as i32);
        }
        all
    }

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
    fn iso_by_hand_is_the_format_descriptions() {
        let ends = [
            time::macros::datetime!(0000-01-01 00:00:00.0000001 UTC),
            time::macros::datetime!(9999-12-31 23:59:59.9999999 UTC),
            time::macros::datetime!(2024-02-29 12:34:56.1 UTC),
            time::macros::datetime!(2024-02-29 12:34:56.000000099 UTC),
            time::macros::datetime!(2024-02-29 12:34:56.100000099 UTC),
            time::macros::datetime!(2026-11-25 12:00:00.5 +02:00),
        ];
        for t in instants(&ends) {
            let s = iso(t);
            assert_eq!(s, iso_general(t.to_offset(UtcOffset::UTC)), "{t}");
            assert_eq!(parse_iso(&s).map(iso), Some(s.clone()));
        }
        // Past year 9999: the general formatter.
        let far = time::macros::datetime!(2026-11-25 12:00:00 UTC).replace_year(10_000);
        if let Ok(far) = far {
            assert_eq!(iso(far), iso_general(far));
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
    fn rfc1123_by_hand_is_the_format_descriptions() {
        let general = |t: OffsetDateTime| t.format(RFC1123).unwrap();
        let parse_general = |s: &str| {
            PrimitiveDateTime::parse(s, RFC1123)
                .ok()
                .map(PrimitiveDateTime::assume_utc)
        };
        let ends = [
            time::macros::datetime!(9999-12-31 23:59:59 UTC),
            time::macros::datetime!(2024-02-29 12:34:56 UTC),
            time::macros::datetime!(2100-02-28 01:02:03 UTC),
        ];
        for t in instants(&ends) {
            let s = rfc1123(t);
            assert_eq!(s, general(t), "{t}");
            let back = parse_rfc1123(&s).unwrap();
            assert_eq!(Some(back), parse_general(&s), "{s}");
            assert_eq!(back, t.replace_nanosecond(0).unwrap(), "{s}");
        }
        // Other offsets are written in UTC, years past 9999 by the general formatter.
        let far = time::macros::datetime!(2026-11-25 12:00:00 +02:00);
        assert_eq!(rfc1123(far), "Wed, 25 Nov 2026 10:00:00 GMT");
        // Not the canonical shape, or a weekday that is not the date's: the general parser's
        // answer.
        for s in [
            "Thu, 25 Nov 2026 12:00:00 GMT",
            "Wed, 25 Nov 2026 12:00:60 GMT",
            "Wed, 31 Nov 2026 12:00:00 GMT",
            "wed, 25 Nov 2026 12:00:00 GMT",
            "Wed, 25 nov 2026 12:00:00 GMT",
            "Wed, 25 Nov 2026 12:00:00 UTC",
            "Wed, 25 Nov 2026 12:00:0x GMT",
            "Wed, 25 Nov 2026 24:00:00 GMT",
            "Wed, 5 Nov 2026 12:00:00 GMT",
            "Wed, 25 Nov 2026 12:00:00 GMT ",
            "Wed,25 Nov 2026 12:00:00 GMT",
            "",
        ] {
            assert_eq!(parse_rfc1123(s), parse_general(s.trim()), "{s:?}");
        }
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
