//! One in-flight operation per volume or snapshot.
//!
//! CSI spec, "Concurrency": "In general the Cluster Orchestrator (CO) is responsible for
//! ensuring that there is no more than one call 'in-flight' per volume at a given time.
//! However, in some circumstances, the CO MAY lose state … and issue multiple calls
//! simultaneously for the same volume. The plugin SHOULD handle this as gracefully as
//! possible. The error code ABORTED MAY be returned by the plugin in this case."
//! A guard is taken per id at the start of an RPC and released when it is dropped, on every
//! path including errors and cancelled requests.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use crate::error::{Error, Result};

#[derive(Debug, Default, Clone)]
pub struct InFlight {
    busy: Arc<Mutex<HashSet<String>>>,
}

#[must_use = "the operation is only exclusive while the guard lives"]
#[derive(Debug)]
pub struct Guard {
    busy: Arc<Mutex<HashSet<String>>>,
    keys: Vec<String>,
}

impl InFlight {
    /// Whether an operation holds `key` now.
    pub fn is_busy(&self, key: &str) -> bool {
        self.busy
            .lock()
            .expect("in-flight set poisoned")
            .contains(key)
    }

    /// Claims every key or none; a key already claimed means ABORTED.
    pub fn try_lock<I, S>(&self, keys: I) -> Result<Guard>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut keys: Vec<String> = keys.into_iter().map(Into::into).collect();
        keys.sort();
        keys.dedup();
        let mut busy = self.busy.lock().expect("in-flight set poisoned");
        if let Some(k) = keys.iter().find(|k| busy.contains(*k)) {
            return Err(Error::Aborted(k.clone()));
        }
        busy.extend(keys.iter().cloned());
        Ok(Guard {
            busy: self.busy.clone(),
            keys,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().expect("in-flight set poisoned");
        for k in &self.keys {
            busy.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_aborts_until_first_drops() {
        let f = InFlight::default();
        let g = f.try_lock(["a", "b"]).unwrap();
        assert!(matches!(f.try_lock(["b"]), Err(Error::Aborted(k)) if k == "b"));
        assert!(f.try_lock(["c"]).is_ok(), "other ids are independent");
        drop(g);
        assert!(f.try_lock(["a", "b"]).is_ok());
    }
}
