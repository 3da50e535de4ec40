//! Durations and sizes as people write them on a command line: `30s`, `10m`, `2h`, `7d`
//! (`humantime`), `256MiB`, `1GB`, `64 KiB` (`bytesize`), and the bare numbers the flags took
//! before units, which keep meaning what they meant: seconds for a duration, days for a
//! retention in days, bytes for a size. Each parser has clap's shape (`fn(&str) -> Result<T,
//! String>`), so a flag names it in `value_parser`, and returns the flag's unit as a whole
//! number: a value that is not a whole number of it is refused, never rounded.
//!
//! Money is not a size: the cents flags stay plain numbers.

use std::time::Duration;

/// A duration in whole seconds: `90`, `90s`, `10m`, `1h 30m`.
pub fn seconds(text: &str) -> Result<u64, String> {
    whole(text, 1, "seconds", "90s, 10m or 2h")
}

/// A duration in whole seconds, at least one.
pub fn positive_seconds(text: &str) -> Result<u64, String> {
    match seconds(text)? {
        0 => Err("must be at least 1s".to_owned()),
        n => Ok(n),
    }
}

/// A duration in whole milliseconds: `250`, `250ms`, `1s` (a bare number is milliseconds).
pub fn milliseconds(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Ok(n);
    }
    if text.starts_with('-') {
        return Err("a duration cannot be negative".to_owned());
    }
    let d: Duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration: {e} (write it like 250ms or 1s)"))?;
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(format!(
            "{text:?} is not a whole number of milliseconds (write it like 250ms or 1s)"
        ));
    }
    u64::try_from(d.as_millis()).map_err(|_| format!("{text:?} is too long"))
}

/// A duration in whole days: `30` (days, as the flag took before units), `30d`, `2w`.
pub fn days(text: &str) -> Result<u64, String> {
    whole(text, 86_400, "days", "30d or 2w")
}

/// A size in bytes: `1048576`, `256MiB`, `1.5GiB`, `64 KiB`; `MB` and `GB` are powers of
/// 1,000, `MiB` and `GiB` of 1,024.
pub fn bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Ok(n);
    }
    if text.starts_with('-') {
        return Err("a size cannot be negative".to_owned());
    }
    text.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| {
            format!("{text:?} is not a size (write it like 1048576, 64KiB, 256MiB or 1GiB)")
        })
}

/// `text` as a whole number of `unit` seconds: a bare number counts in that unit, anything
/// else is read by `humantime` and must come out a whole number of them.
fn whole(text: &str, unit: u64, unit_name: &str, example: &str) -> Result<u64, String> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Ok(n);
    }
    if text.starts_with('-') {
        return Err("a duration cannot be negative".to_owned());
    }
    let d: Duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration: {e} (write it like {example})"))?;
    if d.subsec_nanos() != 0 || !d.as_secs().is_multiple_of(unit) {
        return Err(format!(
            "{text:?} is not a whole number of {unit_name} (write it like {example})"
        ));
    }
    Ok(d.as_secs() / unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_take_units_and_bare_numbers() {
        assert_eq!(milliseconds("250"), Ok(250));
        assert_eq!(milliseconds("250ms"), Ok(250));
        assert_eq!(milliseconds("1s"), Ok(1000));
        assert_eq!(milliseconds("0"), Ok(0));
        assert!(milliseconds("-1ms").is_err());
        assert!(milliseconds("1us").is_err());
        assert!(milliseconds("soon").is_err());
    }

    #[test]
    fn bare_numbers_keep_their_old_meaning() {
        assert_eq!(seconds("30"), Ok(30));
        assert_eq!(seconds("0"), Ok(0));
        assert_eq!(days("30"), Ok(30));
        assert_eq!(bytes("268435456"), Ok(268_435_456));
        assert_eq!(bytes("0"), Ok(0));
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(seconds("30s"), Ok(30));
        assert_eq!(seconds("10m"), Ok(600));
        assert_eq!(seconds("1h 30m"), Ok(5_400));
        assert_eq!(seconds("2h"), Ok(7_200));
        assert_eq!(seconds(" 45s "), Ok(45));
        assert_eq!(positive_seconds("1s"), Ok(1));
        assert_eq!(days("30d"), Ok(30));
        assert_eq!(days("2w"), Ok(14));
        assert_eq!(days("48h"), Ok(2));
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(bytes("256MiB"), Ok(256 << 20));
        assert_eq!(bytes("256 MiB"), Ok(256 << 20));
        assert_eq!(bytes("64KiB"), Ok(64 << 10));
        assert_eq!(bytes("1GiB"), Ok(1 << 30));
        assert_eq!(bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(bytes("1MB"), Ok(1_000_000));
        assert_eq!(bytes("1 kb"), Ok(1_000));
    }

    #[test]
    fn what_is_not_a_whole_unit_is_refused_not_rounded() {
        let e = seconds("1500ms").expect_err("not whole seconds");
        assert!(e.contains("not a whole number of seconds"), "{e}");
        let e = days("36h").expect_err("not whole days");
        assert!(e.contains("not a whole number of days"), "{e}");
        let e = positive_seconds("0s").expect_err("zero");
        assert_eq!(e, "must be at least 1s");
        assert_eq!(positive_seconds("0"), Err("must be at least 1s".to_owned()));
    }

    #[test]
    fn nonsense_is_refused_with_an_example() {
        for bad in ["", "ten", "30x", "-5", "-5s", "1e3s"] {
            let e = seconds(bad).expect_err(bad);
            assert!(
                e.contains("90s, 10m or 2h") || e.contains("negative"),
                "{bad}: {e}"
            );
        }
        for bad in ["", "lots", "12XB", "-1", "-1MiB", "1e3"] {
            let e = bytes(bad).expect_err(bad);
            assert!(e.contains("256MiB") || e.contains("negative"), "{bad}: {e}");
        }
        let e = bytes("12XB").expect_err("unknown unit");
        assert!(e.starts_with("\"12XB\" is not a size"), "{e}");
    }
}
