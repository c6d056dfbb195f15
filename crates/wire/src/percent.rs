//! Percent-decoding of URL paths and query parts.

/// Decodes `%XX` escapes; `None` when an escape is malformed or the result is not UTF-8.
pub fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            // Exactly two hex digits (from_str_radix alone would take a sign: "%+1").
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes a query value for a URL the server writes (`odata.nextLink`).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_into(&mut out, s);
    out
}

/// [`encode`], appended to `out`.
pub fn encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        assert_eq!(decode("a%20b%27").as_deref(), Some("a b'"));
        assert_eq!(decode("%zz"), None);
        assert_eq!(decode("%e9"), None);
        assert_eq!(decode("%"), None);
        assert_eq!(decode("%+1"), None);
        assert_eq!(decode("%-f"), None);
        let s = "state eq 'idle' & é";
        assert_eq!(decode(&encode(s)).as_deref(), Some(s));
        assert_eq!(encode("a b/é~"), "a%20b%2F%C3%A9~");
    }
}
