//! [`error_chain`]: an error and its sources on one line.

/// An error and its sources on one line (`a: b: c`): for ttRPC status messages, which are all
/// a client sees, and for the CLI's one-line reports.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}
