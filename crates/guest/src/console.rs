//! Console lines: the host's only view of the guest before the agent channel is up.

use std::io::{self, Write};

/// Writes one line to the console (stdout), flushing it at once.
///
/// Write errors are ignored because there is nowhere else to report them.
pub fn console_line(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Formats the source chain of an error (`a: b: c`) for console lines.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_lists_sources_without_the_error_itself() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(source_chain(&e), "inner");
        assert_eq!(source_chain(&std::io::Error::other("alone")), "");
    }
}
