//! Log lines: one cap on a line's length, applied the same way by runner and server.

/// A longer line is cut, with a marker saying how much went.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Cuts a line over [`MAX_LINE_BYTES`] (at a character boundary) with a marker saying how many
/// bytes went.
pub fn cut_line(line: &str) -> String {
    if line.len() <= MAX_LINE_BYTES {
        return line.to_owned();
    }
    let mut end = MAX_LINE_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{} [… line cut: {} more bytes]",
        &line[..end],
        line.len() - end
    )
}

/// A failure's text in one line (a history entry, a runner's unhealthy reason; the whole text
/// is kept elsewhere): its first line (what failed) and its last (where the output ends); when
/// the last is a hint in parentheses (the sandbox's), the line before it too: the error the
/// hint is about.
pub fn one_line_reason(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match lines.as_slice() {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [first, .., error, hint] if hint.starts_with('(') => format!("{first} … {error} {hint}"),
        [first, .., last] => format!("{first} … {last}"),
    }
}

/// How much of a runner's failure text (a result's error, a release's reason) the server
/// keeps: it becomes the task's feedback, the next prompt's "previous attempt" section.
pub const MAX_FEEDBACK_BYTES: usize = 64 * 1024;

/// How much of a task's feedback a list row carries (`task show` has all of it).
pub const LIST_FEEDBACK_BYTES: usize = 1024;

/// Keeps the last `max` bytes of `text` (at a character boundary; the end of a failure's
/// output is where its reason is), after a marker saying how many went.
pub fn keep_end(text: &str, max: usize) -> String {
    let bytes = text.as_bytes();
    keep_end_of(bytes.len(), &bytes[bytes.len().saturating_sub(max)..])
}

/// What [`keep_end`] keeps of a text of `len` bytes, from its last bytes alone (`tail`: the
/// last `max`, or all of them when it is shorter), for a reader that fetches only those (a
/// store's list page, with `substr`).
pub fn keep_end_of(len: usize, tail: &[u8]) -> String {
    if tail.len() >= len {
        return String::from_utf8_lossy(tail).into_owned();
    }
    // The tail may begin inside a character: skip its continuation bytes.
    let skipped = tail
        .iter()
        .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
        .count();
    let start = len - tail.len() + skipped;
    format!(
        "[… {start} bytes cut …]\n{}",
        String::from_utf8_lossy(&tail[skipped..])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_end_keeps_the_end_with_a_marker() {
        assert_eq!(keep_end("short", 10), "short");
        assert_eq!(keep_end("0123456789", 4), "[… 6 bytes cut …]\n6789");
        // Never inside a character.
        assert_eq!(keep_end("aé", 1), "[… 3 bytes cut …]\n");
    }

    #[test]
    fn the_end_from_the_tail_alone_is_the_end_from_the_whole() {
        let texts = [
            "",
            "short",
            "0123456789",
            "aé",
            "ééééé",
            "x€yz€",
            "€€€€€€€€",
        ];
        for text in texts {
            for max in 0..=text.len() + 1 {
                let tail = &text.as_bytes()[text.len().saturating_sub(max)..];
                let whole = if text.len() <= max {
                    text.to_owned()
                } else {
                    let mut start = text.len() - max;
                    while !text.is_char_boundary(start) {
                        start += 1;
                    }
                    format!("[… {start} bytes cut …]\n{}", &text[start..])
                };
                assert_eq!(keep_end_of(text.len(), tail), whole, "{text:?} {max}");
                assert_eq!(keep_end(text, max), whole, "{text:?} {max}");
            }
        }
    }

    #[test]
    fn long_lines_are_cut_with_a_marker() {
        let long = "x".repeat(MAX_LINE_BYTES + 10);
        assert!(cut_line(&long).ends_with("[… line cut: 10 more bytes]"));
        let cut = cut_line(&"é".repeat(40_000));
        assert!(cut.len() < MAX_LINE_BYTES + 64);
        assert!(cut.ends_with("more bytes]"));
        assert_eq!(cut_line("short"), "short");
    }
}
