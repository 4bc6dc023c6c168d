//! Crash-test failpoints. `BERTH_FAILPOINT=<name>` makes the process kill itself with
//! SIGKILL when it reaches the named point, which is exactly what `kill -9` mid-operation
//! does: no destructors, no flushes, no cleanup. Used only by the crash tests; when the
//! variable is unset the check is one cached comparison.

use std::sync::OnceLock;

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("BERTH_FAILPOINT")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .as_deref()
}

pub fn hit(name: &str) {
    if armed() == Some(name) {
        tracing::warn!(failpoint = name, "failpoint reached, killing the process");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; if delivery is somehow delayed, never go past the point.
        loop {
            std::thread::park();
        }
    }
}
