//! `../shared`, beside the checkout: the CSI reference files and the test API server
//! (`k8s/up`). A fresh clone has none, so a test that needs it says what is missing and
//! skips; under CI (`CI` set) it must run, and a missing `../shared` fails it.

use std::{io::Write, path::PathBuf};

/// Under CI (`CI` set, and not to `false`) nothing that needs `../shared` may be skipped.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// `$BERTH_SHARED_DIR`, else `../shared` beside the checkout.
fn root() -> PathBuf {
    std::env::var_os("BERTH_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// `../shared/<rel>` when it exists. Otherwise None after a notice on stderr, or a panic
/// under CI, where nothing may be skipped. `test` names the skipped test in the notice.
pub fn path(rel: &str, test: &str) -> Option<PathBuf> {
    let p = root().join(rel);
    if p.exists() {
        return Some(p);
    }
    let msg = format!(
        "{test}: needs {} (shared/ beside the repository checkout, or $BERTH_SHARED_DIR)",
        p.display()
    );
    assert!(!under_ci(), "{msg}: CI is set, so this test must run");
    // Straight to stderr: libtest captures eprintln! of passing tests.
    let _ = writeln!(std::io::stderr(), "{msg}; skipping it");
    None
}
