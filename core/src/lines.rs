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

#[cfg(test)]
mod tests {
    use super::*;

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
