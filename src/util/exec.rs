//! Running the system tools berth drives (losetup, mkfs, mount helpers, fsfreeze…).
//! Every command runs with `LC_ALL=C` (so stderr we quote is stable), a timeout, and
//! `kill_on_drop` (a cancelled RPC never leaves an orphaned mkfs behind); its stderr goes
//! into the error.

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
    run_with_timeout(program, args, DEFAULT_TIMEOUT).await
}

pub async fn run_with_timeout<I, S>(program: &str, args: I, timeout: Duration) -> Result<String>
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
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Command {
            command: command.clone(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.map_err(|e| Error::Command {
            command: command.clone(),
            status: "wait failed".into(),
            stderr: e.to_string(),
        })?,
        Err(_) => return Err(Error::Timeout { command, timeout }),
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
    match run(program, args).await {
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
