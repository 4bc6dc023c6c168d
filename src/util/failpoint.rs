//! Test failpoints. `BERTH_FAILPOINT=<name>` makes the process kill itself with SIGKILL when
//! it reaches the named point, which is exactly what `kill -9` mid-operation does: no
//! destructors, no flushes, no cleanup. `BERTH_FAILPOINT=<name>:sleep=<ms>` instead holds
//! the operation there, to prove what happens to an RPC that is in flight (SIGTERM drain,
//! ABORTED for a concurrent call). `BERTH_FAILPOINT=<name>:error` makes the first [`check`]
//! of the point return an I/O error, once per process: an error the operation must undo
//! itself, where a crash is undone by the next start's reconcile. Used only by tests; when
//! the variable is unset the check is one cached comparison.

use std::{
    path::Path,
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::error::{Error, Result};

#[derive(Debug, PartialEq, Eq)]
enum Action {
    Kill,
    Sleep(Duration),
    Fail,
}

fn parse(spec: &str) -> Option<(String, Action)> {
    let (name, action) = if let Some(name) = spec.strip_suffix(":error") {
        (name, Action::Fail)
    } else if let Some((name, ms)) = spec.split_once(":sleep=") {
        (name, Action::Sleep(Duration::from_millis(ms.parse().ok()?)))
    } else {
        (spec, Action::Kill)
    };
    (!name.is_empty()).then(|| (name.to_string(), action))
}

/// [`hit`] for a point that can also fail: with `<name>:error` armed, its first call
/// returns an I/O error.
pub fn check(name: &str) -> Result<()> {
    static FIRED: AtomicBool = AtomicBool::new(false);
    match armed() {
        Some((armed, Action::Fail)) if armed == name => {
            if FIRED.swap(true, Ordering::SeqCst) {
                return Ok(());
            }
            tracing::warn!(failpoint = name, "failpoint reached, failing the operation");
            Err(Error::io("reach failpoint", Path::new(name))(
                std::io::Error::other("injected by BERTH_FAILPOINT"),
            ))
        }
        _ => {
            hit(name);
            Ok(())
        }
    }
}

fn armed() -> Option<&'static (String, Action)> {
    static ARMED: OnceLock<Option<(String, Action)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::env::var("BERTH_FAILPOINT")
                .ok()
                .and_then(|s| parse(&s))
        })
        .as_ref()
}

pub fn hit(name: &str) {
    match armed() {
        Some((armed, Action::Kill)) if armed == name => {
            tracing::warn!(failpoint = name, "failpoint reached, killing the process");
            let _ =
                nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
            // SIGKILL cannot be caught; if delivery is somehow delayed, never go past the point.
            loop {
                std::thread::park();
            }
        }
        Some((armed, Action::Sleep(d))) if armed == name => {
            tracing::warn!(
                failpoint = name,
                ms = d.as_millis() as u64,
                "failpoint reached, holding"
            );
            // Called from async handlers: on the multi-threaded runtime the worker hands its
            // other tasks away first, so the server keeps answering while this one is held.
            match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                    tokio::task::block_in_place(|| std::thread::sleep(*d))
                }
                _ => std::thread::sleep(*d),
            }
        }
        Some((armed, Action::Fail)) if armed == name => {
            // Only `check` can fail an operation; a test arming this point would pass
            // without testing anything.
            tracing::error!(
                failpoint = name,
                "failpoint armed with :error is a point that cannot fail; ignored"
            );
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(parse("a:b"), Some(("a:b".into(), Action::Kill)));
        assert_eq!(
            parse("a:b:sleep=250"),
            Some(("a:b".into(), Action::Sleep(Duration::from_millis(250))))
        );
        assert_eq!(parse("a:b:error"), Some(("a:b".into(), Action::Fail)));
        assert_eq!(parse("a:sleep=x"), None);
        assert_eq!(parse(":error"), None);
        assert_eq!(parse(""), None);
    }
}
