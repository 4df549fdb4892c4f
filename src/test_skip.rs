//! The rule for a test whose tool is missing, shared by the unit tests (`#[cfg(test)]`
//! in the library) and the daemon's integration tests (`tests/daemon/harness` includes
//! this file by path): one rule, two entry points.

/// Whether this run is CI's: `CI` is set (to anything but empty, `0` or `false`), as
/// `.ci/run` sets it and most CI services do.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !matches!(value.trim(), "" | "0" | "false"))
}

/// Skips the calling test because its tool is missing: in CI, where `.ci/run` installs
/// every tool and runs as root, that is a failure; elsewhere the test returns after
/// this prints `SKIPPED <test>: <reason>` straight to stderr, past libtest's capture,
/// so the skip shows in the output of a passing run (and `.ci/run` can look for it).
///
/// Call as `return skip("test_name", "why")` at the point the test cannot go on.
pub fn skip(test: &str, reason: &str) {
    assert!(
        !in_ci(),
        "{test} cannot run: {reason} (CI is set: .ci/run installs the tools and runs as root)"
    );
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}
