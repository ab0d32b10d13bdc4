//! CloudEvents binary content mode for Kafka: the `ce_*` headers that let a CloudEvents SDK
//! read an outbox record as an event as is, its payload staying the record's value.

use crate::config::CloudEvents;

/// Microseconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Length of `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub const TIME_LEN: usize = 27;

/// The headers, in order: `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_time` (only
/// when the commit time is known) and `content-type`.
pub fn headers<'a>(
    ce: &'a CloudEvents,
    id: Option<&'a [u8]>,
    kind: Option<&'a [u8]>,
    time: Option<&'a [u8]>,
) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> {
    [
        Some(("ce_specversion", Some(&b"1.0"[..]))),
        Some(("ce_id", id)),
        Some(("ce_source", Some(ce.source.as_bytes()))),
        Some(("ce_type", kind)),
        time.map(|t| ("ce_time", Some(t))),
        Some(("content-type", Some(ce.content_type.as_bytes()))),
    ]
    .into_iter()
    .flatten()
}

/// Formats a PostgreSQL timestamp (microseconds since 2000-01-01 UTC) as RFC 3339 in UTC
/// into `buf`, without allocating; `None` for a time outside years 0 to 9999.
pub fn time(pg_micros: i64, buf: &mut [u8; TIME_LEN]) -> Option<&[u8]> {
    let unix = pg_micros.checked_add(PG_EPOCH_MICROS)?;
    let (secs, micros) = (unix.div_euclid(1_000_000), unix.rem_euclid(1_000_000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return None;
    }
    let fields: [(usize, i64, usize); 7] = [
        (0, year, 4),
        (5, month, 2),
        (8, day, 2),
        (11, rem / 3600, 2),
        (14, rem % 3600 / 60, 2),
        (17, rem % 60, 2),
        (20, micros, 6),
    ];
    buf.copy_from_slice(b"0000-00-00T00:00:00.000000Z");
    for (at, mut value, width) in fields {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    Some(&buf[..])
}

/// (year, month, day) of a day count since 1970-01-01, in the proleptic Gregorian calendar
/// (the era-based method: 400-year eras of 146 097 days, years starting on March 1st).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(pg_micros: i64) -> Option<String> {
        let mut buf = [0; TIME_LEN];
        time(pg_micros, &mut buf).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn formats_postgres_timestamps_as_rfc3339_utc() {
        assert_eq!(text(1).as_deref(), Some("2000-01-01T00:00:00.000001Z"));
        assert_eq!(text(-1).as_deref(), Some("1999-12-31T23:59:59.999999Z"));
        // 2024-02-29 13:45:07.250000 UTC, a leap day: 8825 days and 49 507.25 s after 2000.
        let t = (8825 * 86_400 + 49_507) * 1_000_000 + 250_000;
        assert_eq!(text(t).as_deref(), Some("2024-02-29T13:45:07.250000Z"));
        assert_eq!(text(0).as_deref(), Some("2000-01-01T00:00:00.000000Z"));
        assert_eq!(text(i64::MAX), None);
    }

    #[test]
    fn headers_follow_the_kafka_binding() {
        let ce = CloudEvents {
            source: "/orders".into(),
            content_type: "application/json".into(),
        };
        let names: Vec<_> = headers(&ce, Some(b"e1"), Some(b"Created"), None)
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            names,
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "content-type"
            ]
        );
    }
}
