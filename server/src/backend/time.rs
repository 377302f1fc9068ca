//! Dates in backends' answers, to Unix ms: written once for every adapter.
//! [`rfc3339_ms`] is strict (the http adapter's `changed_at`); [`iso8601_ms`]
//! also takes what Celery writes (no zone: UTC; `±HHMM`, `±HH`).

/// The zone of an ISO 8601 date-time made RFC 3339's: none → `Z`,
/// `±HHMM` → `±HH:MM`, `±HH` → `±HH:00`; then [`rfc3339_ms`].
pub fn iso8601_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let mut zone_at = 19;
    if b.len() < zone_at {
        return None;
    }
    if b.get(zone_at) == Some(&b'.') {
        let digits = b[zone_at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        zone_at += 1 + digits;
    }
    let (time, zone) = s.split_at(zone_at);
    let zone = zone.as_bytes();
    let rfc = match zone {
        [] => format!("{time}Z"),
        [sign @ (b'+' | b'-'), h1, h2, m1, m2] => {
            format!(
                "{time}{}{}{}:{}{}",
                *sign as char, *h1 as char, *h2 as char, *m1 as char, *m2 as char
            )
        }
        [sign @ (b'+' | b'-'), h1, h2] => {
            format!("{time}{}{}{}:00", *sign as char, *h1 as char, *h2 as char)
        }
        _ => s.to_string(),
    };
    rfc3339_ms(&rfc)
}

/// `2025-01-02T03:04:05.678Z`, `…+02:00`; `t`, `z` or a space also
/// accepted; fractions past ms are dropped. None before 1970.
pub fn rfc3339_ms(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |n, &d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        ms = format!("{frac:0<3}").parse().ok()?;
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (h, m) = (digits(i + 1..i + 3)?, digits(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let minutes = h * 60 + m;
            if *sign == b'+' {
                minutes
            } else {
                -minutes
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second.min(59) - offset_min * 60;
    u64::try_from(secs * 1_000 + ms).ok()
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_takes_what_celery_writes() {
        assert_eq!(iso8601_ms("1970-01-01T00:00:00"), Some(0));
        assert_eq!(iso8601_ms("1970-01-01T00:00:01.5Z"), Some(1_500));
        assert_eq!(
            iso8601_ms("2026-12-03T09:26:16.945409+00:00"),
            Some(1_796_289_976_945)
        );
        assert_eq!(
            iso8601_ms("2026-12-03 04:26:16-0500"),
            Some(1_796_289_976_000)
        );
        assert_eq!(
            iso8601_ms("2026-12-03T06:26:16-03"),
            Some(1_796_289_976_000)
        );
        for bad in [
            "",
            "2026-12-03",
            "2026-12-03T00:00:00.",
            "2026-12-03T00:00:00+1",
            "2026-12-03T00:00:00 UTC",
        ] {
            assert_eq!(iso8601_ms(bad), None, "{bad}");
        }
        // RFC 3339 itself still refuses what it does not allow.
        assert_eq!(rfc3339_ms("2025-11-29T06:06:42"), None);
        assert_eq!(rfc3339_ms("2025-11-29T06:06:42+0100"), None);
    }
}
