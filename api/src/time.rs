//! Times as the contract prints them: RFC 3339 (UTC, millisecond precision), from the
//! milliseconds since the Unix epoch the protocol carries, written by `humantime`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const LAST_MS: i64 = 253_402_300_799_999;

/// `ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`. A time outside what RFC 3339 can write (before 1970,
/// after 9999: no server sends one) is written as the nearest it can.
pub fn rfc3339(ms: i64) -> String {
    let ms = u64::try_from(ms.clamp(0, LAST_MS)).unwrap_or_default();
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The time `ago` before now, in milliseconds since the Unix epoch (0 for a time before it).
pub fn ms_ago(ago: Duration) -> i64 {
    SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_482_062_123), "2026-11-24T01:01:02.123Z");
        assert_eq!(rfc3339(-1), "1970-01-01T00:00:00.000Z", "clamped");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z", "clamped");
    }

    #[test]
    fn a_time_ago_is_before_now() {
        let hour_ago = ms_ago(Duration::from_secs(3600));
        let now = ms_ago(Duration::ZERO);
        assert!(now - hour_ago >= 3_600_000, "{now} {hour_ago}");
        assert_eq!(ms_ago(Duration::MAX), 0);
    }
}
