//! Turning the console byte stream into clean text lines.

/// Splits a byte stream into lines, cutting lines longer than a limit so memory stays bounded.
#[derive(Debug)]
pub(crate) struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter that emits at most `max` bytes per line (at least 1).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max: max.max(1),
        }
    }

    /// Feeds `data` and returns the lines it completes, without their `\n`.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        for &b in data {
            if b == b'\n' {
                lines.push(std::mem::take(&mut self.buf));
            } else {
                self.buf.push(b);
                if self.buf.len() >= self.max {
                    lines.push(std::mem::take(&mut self.buf));
                }
            }
        }
        lines
    }

    /// Returns the unterminated rest at the end of the stream, if any.
    pub(crate) fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
    }
}

/// Decodes a raw console line (lossy UTF-8) and removes what a terminal would interpret rather
/// than show: `\r` and other control characters except tab, ANSI CSI sequences (`ESC [ ... X`,
/// colours and cursor moves), OSC sequences (`ESC ] ... BEL`) and two-character escapes.
/// Trailing whitespace is trimmed.
pub(crate) fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameter and intermediate bytes up to a final byte in 0x40..=0x7e.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('\u{40}'..='\u{7e}').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ST (`ESC \`).
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            if chars.peek() == Some(&'\\') {
                                chars.next();
                            }
                            break;
                        }
                    }
                }
                // Two-character escape (or a lone ESC at the end).
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.truncate(out.trim_end().len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_chunks() {
        let mut s = LineSplitter::new(100);
        assert_eq!(s.push(b"ab"), Vec::<Vec<u8>>::new());
        assert_eq!(
            s.push(b"c\nde\n\nf"),
            vec![b"abc".to_vec(), b"de".to_vec(), vec![]]
        );
        assert_eq!(s.finish(), Some(b"f".to_vec()));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn cuts_long_lines() {
        let mut s = LineSplitter::new(4);
        assert_eq!(
            s.push(b"abcdefghij\n"),
            vec![b"abcd".to_vec(), b"efgh".to_vec(), b"ij".to_vec()]
        );
    }

    #[test]
    fn cleans_carriage_returns_and_escapes() {
        assert_eq!(clean_line(b"hello\r"), "hello");
        assert_eq!(clean_line(b"\x1b[0;32m OK \x1b[0m done"), " OK  done");
        assert_eq!(clean_line(b"\x1b]0;title\x07prompt"), "prompt");
        assert_eq!(clean_line(b"\x1b]0;title\x1b\\prompt"), "prompt");
        assert_eq!(clean_line(b"a\x1b7b\x1b"), "ab");
        assert_eq!(clean_line(b"tab\there\x08 \x00"), "tab\there");
        assert_eq!(clean_line(b"bad \xff utf8"), "bad \u{fffd} utf8");
        assert_eq!(
            clean_line(b"[    0.000000] Linux version 6.1.0"),
            "[    0.000000] Linux version 6.1.0"
        );
    }
}
