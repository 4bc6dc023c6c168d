//! Running the system tools berth drives (losetup, mkfs, mount helpers, fsfreeze…).
//! Every command runs with `LC_ALL=C` (so stderr we quote is stable), a timeout (except
//! the few that must run to completion, see [`run_limited`]), and `kill_on_drop` (a
//! cancelled RPC never leaves an orphaned mkfs behind); its stderr goes into the error.

use std::{ffi::OsStr, process::Stdio, time::Duration};

use tokio::process::Command;

use crate::error::{Error, Result};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `program args…`, returning stdout on exit status 0.
pub async fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_limited(program, args, Some(DEFAULT_TIMEOUT)).await
}

/// [`run`] with its own limit. `None` runs to completion: for a command whose time grows
/// with the data and which damages what it changes when killed mid-way (an offline
/// resize2fs), a timeout turns a slow success into a broken filesystem.
pub async fn run_limited<I, S>(program: &str, args: I, timeout: Option<Duration>) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = std::iter::once(program.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(%command, "exec");
    let child = Command::new(program)
        .args(&args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A command with a limit is killed with the request that dropped it. One without a
        // limit is one that must never stop half-way (an offline resize2fs): it runs to its
        // end even when berth itself stops.
        .kill_on_drop(timeout.is_some())
        .spawn()
        .map_err(|e| Error::Command {
            command: command.clone(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    let waited = match timeout {
        Some(t) => tokio::time::timeout(t, child.wait_with_output())
            .await
            .map_err(|_| t),
        None => Ok(child.wait_with_output().await),
    };
    let output = match waited {
        Ok(out) => out.map_err(|e| Error::Command {
            command: command.clone(),
            status: "wait failed".into(),
            stderr: e.to_string(),
        })?,
        Err(timeout) => return Err(Error::Timeout { command, timeout }),
    };
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Like [`run`] but an exit status is returned instead of being an error, for tools whose
/// non-zero status is an answer (blkid: 2 = "no filesystem found").
pub async fn status<I, S>(program: &str, args: I) -> Result<(i32, String)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    status_limited(program, args, Some(DEFAULT_TIMEOUT)).await
}

/// [`status`] with its own limit, as [`run_limited`].
pub async fn status_limited<I, S>(
    program: &str,
    args: I,
    timeout: Option<Duration>,
) -> Result<(i32, String)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    match run_limited(program, args, timeout).await {
        Ok(out) => Ok((0, out)),
        Err(Error::Command { status, stderr, .. }) if status.starts_with("exit status") => {
            let code = status
                .trim_start_matches("exit status: ")
                .parse()
                .unwrap_or(-1);
            Ok((code, stderr))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_limit_kills_and_none_runs_to_completion() {
        let late = run_limited("sleep", ["0.5"], Some(Duration::from_millis(50))).await;
        assert!(matches!(late, Err(Error::Timeout { .. })), "{late:?}");
        run_limited("sleep", ["0.5"], None)
            .await
            .expect("no limit: it runs to the end");
        let (code, _) = status_limited("sh", ["-c", "sleep 0.2; exit 3"], None)
            .await
            .unwrap();
        assert_eq!(code, 3);
    }
}
