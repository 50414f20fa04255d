//! Applying the upstream's instructions to the store (SPEC \[4.5\]), before
//! the response head leaves. Every change goes through `Store::modify`,
//! so it lands on the latest stored version.

use std::sync::atomic::{AtomicBool, Ordering};

use log::{debug, warn};
use serde_json::{Map, Value};

use super::{ActiveSession, Failure, SessionProxy};
use crate::metrics::StoreOp;
use crate::session::cookie::{Handle, SessionId};
use crate::session::patch::{self, Action, Instructions};
use crate::store::{Change, Record, StoreError};

/// What the response does to the browser's cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieChange {
    /// Set the cookie to this value.
    Set(String),
    Clear,
}

impl SessionProxy {
    /// Stores what the upstream asked for; returns the cookie to send.
    pub(super) async fn commit(
        &self,
        active: &ActiveSession,
        instructions: Instructions,
    ) -> Result<Option<CookieChange>, Failure> {
        let now = crate::session::now();
        match (instructions.action, instructions.patch) {
            (Some(Action::Kill), _) => self.kill(active).await,
            (Some(Action::Regenerate), patch) => self.regenerate(active, patch.as_ref(), now).await,
            (None, Some(patch)) => self.update(active, &patch, now).await,
            (None, None) => self.keep(active, now).await,
        }
    }

    async fn kill(&self, active: &ActiveSession) -> Result<Option<CookieChange>, Failure> {
        if active.stored.is_some() {
            self.timed(StoreOp::Delete, self.store.delete(&active.handle))
                .await
                .map_err(|e| store_failure(&active.handle, e))?;
            debug!("session {}: killed", active.handle.short());
        }
        Ok(Some(CookieChange::Clear))
    }

    /// A new id for the latest version of the session, then the patch.
    ///
    /// The old id goes only at the version copied: a write another request
    /// made meanwhile (its 200 already sent) is copied again, as SPEC \[4.5\]
    /// asks of concurrent changes, rather than deleted with the old id.
    async fn regenerate(
        &self,
        active: &ActiveSession,
        patch: Option<&Map<String, Value>>,
        now: u64,
    ) -> Result<Option<CookieChange>, Failure> {
        let handle = &active.handle;
        let mut latest = match active.stored {
            Some(_) => self
                .timed(StoreOp::Load, self.store.load(handle))
                .await
                .map_err(|e| store_failure(handle, e))?,
            None => None,
        };
        let id = SessionId::generate();
        for copy in 0..MAX_REGENERATE_COPIES {
            let written = match self.regenerated_record(active, latest.as_ref(), patch, now) {
                Ok(record) => self.put(&id.handle(), record).await,
                Err(failure) => Err(failure),
            };
            if let Err(failure) = written {
                // An earlier round's copy, which no cookie will name: the
                // patch it holds may be the one refused now.
                if copy > 0 {
                    self.discard_copy(&id).await;
                }
                return Err(failure);
            }
            // A new session, or one killed since it was loaded: a fresh record.
            if latest.is_none() {
                self.metrics.sessions_created.inc();
            }
            // A new session, or one killed meanwhile: no old id to remove.
            let Some(copied) = latest.as_ref().map(|record| record.ver) else {
                return Ok(Some(self.regenerated(handle, &id)));
            };
            // Whether the old id was gone when its removal was decided
            // (only the decision's last run counts).
            let gone = AtomicBool::new(false);
            let decide = |current: Option<&Record>| {
                gone.store(current.is_none(), Ordering::Relaxed);
                Ok(match current {
                    Some(current) if current.ver == copied => Change::Delete,
                    _ => Change::Keep,
                })
            };
            latest = match self
                .timed(StoreOp::Delete, self.store.modify(handle, &decide))
                .await
            {
                Ok(latest) => latest,
                Err(e) => {
                    // The old id stays, and the client keeps its cookie.
                    self.discard_copy(&id).await;
                    return Err(store_failure(handle, e));
                }
            };
            if latest.is_none() && gone.load(Ordering::Relaxed) {
                // Killed (or swept) after the copy was made: the copy must
                // not bring it back. The new id starts afresh instead, as
                // an update of a killed session does.
                return self.regenerate_afresh(active, patch, &id, now).await;
            }
            if latest.is_none() {
                return Ok(Some(self.regenerated(handle, &id)));
            }
        }
        // Written to faster than it can be copied: the session stays as it
        // is under its old id, and the last copy goes.
        self.discard_copy(&id).await;
        warn!(
            "session {}: changed during every copy of its regenerate",
            handle.short()
        );
        Err(Failure::SessionBusy)
    }

    /// What a regenerate stores under the new id: the latest version of
    /// the session (a fresh record if there is none), the patch merged in,
    /// one version on.
    fn regenerated_record(
        &self,
        active: &ActiveSession,
        latest: Option<&Record>,
        patch: Option<&Map<String, Value>>,
        now: u64,
    ) -> Result<Record, Failure> {
        let mut record = latest
            .cloned()
            .unwrap_or_else(|| self.fresh_record(active, now));
        if let Some(patch) = patch {
            record.data = patch::apply(&record.data, patch, self.settings.max_data_bytes)
                .map_err(|e| invalid(&active.handle, e))?;
        }
        // A record read back from a shared store may hold any version.
        record.ver = record.next_ver();
        record.atime = now;
        Ok(record)
    }

    /// A regenerate whose session was killed after its copy was made:
    /// the copy, which holds the killed session's data, becomes a fresh
    /// session with the patch (or goes, if that cannot be stored).
    async fn regenerate_afresh(
        &self,
        active: &ActiveSession,
        patch: Option<&Map<String, Value>>,
        id: &SessionId,
        now: u64,
    ) -> Result<Option<CookieChange>, Failure> {
        let written = match self.regenerated_record(active, None, patch, now) {
            Ok(record) => self.put(&id.handle(), record).await,
            Err(failure) => Err(failure),
        };
        if let Err(failure) = written {
            self.discard_copy(id).await;
            return Err(failure);
        }
        debug!(
            "session {}: killed during its regenerate, starting anew",
            active.handle.short()
        );
        self.metrics.sessions_created.inc();
        Ok(Some(self.regenerated(&active.handle, id)))
    }

    /// Deletes a regenerate's copy that no cookie will name, if it can:
    /// left, it would only wait for the sweep.
    async fn discard_copy(&self, id: &SessionId) {
        let _ = self
            .timed(StoreOp::Delete, self.store.delete(&id.handle()))
            .await;
    }

    fn regenerated(&self, old: &Handle, id: &SessionId) -> CookieChange {
        debug!(
            "session {}: regenerated as {}",
            old.short(),
            id.handle().short()
        );
        self.cookie_for(id)
    }

    /// Merges the patch into the latest stored version. A patch that
    /// changes nothing there (`{}`, a `null` for an absent key, a value
    /// already stored) is no change: `ver` stays, the access time is
    /// written only as a touch would, and a new session is not stored.
    async fn update(
        &self,
        active: &ActiveSession,
        patch: &Map<String, Value>,
        now: u64,
    ) -> Result<Option<CookieChange>, Failure> {
        let max = self.settings.max_data_bytes;
        if let Some(seen) = &active.stored {
            // What the decision that was stored did: `decide` runs again
            // after a lost race, and only its last run counts.
            let wrote = AtomicBool::new(false);
            let decide = |current: Option<&Record>| {
                let Some(current) = current else {
                    return Ok(Change::Keep);
                };
                let data = patch::apply(&current.data, patch, max).map_err(|e| e.to_string())?;
                let changed = data != current.data;
                let touch = now.saturating_sub(current.atime) >= self.settings.touch_interval;
                wrote.store(changed || touch, Ordering::Relaxed);
                if !changed && !touch {
                    return Ok(Change::Keep);
                }
                Ok(Change::Put(Record {
                    data,
                    created: current.created,
                    atime: now,
                    ip: current.ip.clone(),
                    ver: if changed {
                        current.next_ver()
                    } else {
                        current.ver
                    },
                }))
            };
            let stored = self
                .timed(
                    StoreOp::Save,
                    self.store.modify_seen(&active.handle, seen, &decide),
                )
                .await;
            match stored.map_err(|e| store_failure(&active.handle, e))? {
                Some(_) => {
                    // The browser's expiry slides whenever the access time is written.
                    let slide = self.settings.cookie.max_age > 0 && wrote.load(Ordering::Relaxed);
                    return Ok(slide.then(|| self.cookie_for(&active.id)));
                }
                // Killed by another request meanwhile: a killed session must
                // stay dead, so the update starts a new one under a new id.
                None => debug!(
                    "session {}: gone before its update, starting anew",
                    active.handle.short()
                ),
            }
        }
        let mut record = self.fresh_record(active, now);
        let data =
            patch::apply(&record.data, patch, max).map_err(|e| invalid(&active.handle, e))?;
        if data == record.data && !self.settings.save_uninitialized {
            return Ok(None);
        }
        record.data = data;
        record.ver = 1;
        let id = if active.stored.is_some() {
            SessionId::generate()
        } else {
            active.id.clone()
        };
        self.put(&id.handle(), record).await?;
        self.metrics.sessions_created.inc();
        Ok(Some(self.cookie_for(&id)))
    }

    /// No change: touch an existing session now and then; store a new one
    /// only with `save_uninitialized`.
    async fn keep(
        &self,
        active: &ActiveSession,
        now: u64,
    ) -> Result<Option<CookieChange>, Failure> {
        match &active.stored {
            Some(record) if now.saturating_sub(record.atime) >= self.settings.touch_interval => {
                let touched = self
                    .timed(StoreOp::Save, self.store.touch(&active.handle, now))
                    .await
                    .map_err(|e| store_failure(&active.handle, e))?;
                if !touched {
                    // Killed or regenerated by another request meanwhile:
                    // its answer set the cookie, which this one must not undo.
                    debug!("session {}: gone before its touch", active.handle.short());
                    return Ok(None);
                }
                // The browser's expiry slides with the session's.
                Ok(self
                    .settings
                    .cookie
                    .max_age
                    .gt(&0)
                    .then(|| self.cookie_for(&active.id)))
            }
            Some(_) => Ok(None),
            None if self.settings.save_uninitialized => {
                let mut record = self.fresh_record(active, now);
                record.ver = 1;
                self.put(&active.handle, record).await?;
                self.metrics.sessions_created.inc();
                Ok(Some(self.cookie_for(&active.id)))
            }
            None => Ok(None),
        }
    }

    /// The record a new session starts from: the initializer's data (a
    /// patch makes a new copy, it never changes the shared one).
    fn fresh_record(&self, active: &ActiveSession, now: u64) -> Record {
        Record {
            data: self.settings.initializer.clone(),
            created: now,
            atime: now,
            ip: active.client_ip.to_string().into(),
            ver: 0,
        }
    }

    async fn put(&self, handle: &Handle, record: Record) -> Result<(), Failure> {
        let decide = move |_: Option<&Record>| Ok(Change::Put(record.clone()));
        self.timed(StoreOp::Save, self.store.modify(handle, &decide))
            .await
            .map_err(|e| store_failure(handle, e))?;
        Ok(())
    }

    fn cookie_for(&self, id: &SessionId) -> CookieChange {
        CookieChange::Set(self.settings.cookies.signer().sign(id))
    }
}

/// How many times a regenerate copies a session that other requests keep
/// changing before it answers 503 instead.
const MAX_REGENERATE_COPIES: usize = 8;

/// The answer to a store's failure, logged with the session's handle.
fn store_failure(handle: &Handle, e: StoreError) -> Failure {
    match e {
        StoreError::Rejected(reason) => {
            warn!(
                "session {}: invalid session update from upstream: {reason}",
                handle.short()
            );
            Failure::InvalidUpdate
        }
        other => {
            warn!("session {}: session store failed: {other}", handle.short());
            Failure::StoreUnavailable
        }
    }
}

fn invalid(handle: &Handle, e: patch::InvalidUpdate) -> Failure {
    warn!(
        "session {}: invalid session update from upstream: {e}",
        handle.short()
    );
    Failure::InvalidUpdate
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    use async_trait::async_trait;
    use serde_json::json;

    use super::*;
    use crate::metrics::Metrics;
    use crate::store::memory::MemoryStore;
    use crate::store::{Decide, Expiry, Store};

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().expect("an object")
    }

    /// A memory store on which another request's update of `old` lands
    /// right after a write of any other handle, `updates` times: in a
    /// regenerate, between the copy under the new id and the removal of
    /// the old one.
    struct UpdateDuringCopy {
        inner: MemoryStore,
        old: Handle,
        updates: AtomicUsize,
        /// Every change of `old` fails, as with a store gone away.
        old_unavailable: AtomicBool,
        /// Another request kills `old` right after the next write of
        /// any other handle.
        kill_during_copy: AtomicBool,
    }

    #[async_trait]
    impl Store for UpdateDuringCopy {
        async fn load(&self, handle: &Handle) -> Result<Option<Record>, StoreError> {
            self.inner.load(handle).await
        }

        async fn modify(
            &self,
            handle: &Handle,
            decide: Decide<'_>,
        ) -> Result<Option<Record>, StoreError> {
            if *handle == self.old && self.old_unavailable.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("gone away".to_owned()));
            }
            let stored = self.inner.modify(handle, decide).await;
            if *handle != self.old && self.kill_during_copy.swap(false, Ordering::SeqCst) {
                self.inner.delete(&self.old).await?;
            }
            let landing = |left: usize| left.checked_sub(1);
            if *handle != self.old
                && self
                    .updates
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, landing)
                    .is_ok()
            {
                let cart = |current: Option<&Record>| {
                    Ok(match current {
                        Some(current) => Change::Put(Record {
                            data: patch::apply(&current.data, &object(json!({"cart": 3})), 4096)
                                .map_err(|e| e.to_string())?,
                            ver: current.ver + 1,
                            ..current.clone()
                        }),
                        None => Change::Keep,
                    })
                };
                self.inner.modify(&self.old, &cart).await?;
            }
            stored
        }

        async fn delete(&self, handle: &Handle) -> Result<bool, StoreError> {
            self.inner.delete(handle).await
        }

        async fn list(&self) -> Result<Vec<(Handle, Record)>, StoreError> {
            self.inner.list().await
        }

        async fn delete_expired(&self, now: u64, expiry: Expiry) -> Result<u64, StoreError> {
            self.inner.delete_expired(now, expiry).await
        }

        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
    }

    /// A session `{"user": "guest"}` stored under a new id, the store
    /// landing `updates` updates of it during copies, and the proxy on it.
    async fn regenerating(
        updates: usize,
    ) -> (
        Arc<UpdateDuringCopy>,
        SessionProxy,
        ActiveSession,
        Instructions,
    ) {
        let config = crate::config::parse(
            "[upstream]\naddresses = [\"127.0.0.1:8000\"]\n",
            Path::new("test.toml"),
            Some("0123456789abcdef0123456789abcdef"),
        )
        .expect("valid config");
        let id = SessionId::generate();
        let store = Arc::new(UpdateDuringCopy {
            inner: MemoryStore::new(100),
            old: id.handle(),
            updates: AtomicUsize::new(updates),
            old_unavailable: AtomicBool::new(false),
            kill_during_copy: AtomicBool::new(false),
        });
        let now = crate::session::now();
        let stored = Record {
            data: object(json!({"user": "guest"})).into(),
            created: now,
            atime: now,
            ip: "192.0.2.1".into(),
            ver: 1,
        };
        let put = |_: Option<&Record>| Ok(Change::Put(stored.clone()));
        store.inner.modify(&id.handle(), &put).await.unwrap();
        let proxy = SessionProxy::new(&config, store.clone(), Arc::new(Metrics::new())).unwrap();
        let active = ActiveSession {
            handle: id.handle(),
            id,
            stored: Some(stored),
            client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        };
        let instructions = Instructions {
            patch: Some(object(json!({"user": "ann"}))),
            action: Some(Action::Regenerate),
        };
        (store, proxy, active, instructions)
    }

    #[tokio::test]
    async fn a_regenerate_keeps_an_update_that_lands_during_its_copy() {
        let (store, proxy, active, instructions) = regenerating(1).await;

        let cookie = proxy.commit(&active, instructions).await.unwrap();

        assert!(matches!(cookie, Some(CookieChange::Set(_))), "{cookie:?}");
        assert_eq!(store.updates.load(Ordering::SeqCst), 0, "the update landed");
        let records = store.inner.list().await.unwrap();
        assert_eq!(records.len(), 1, "only the new id is left: {records:?}");
        let (handle, record) = &records[0];
        assert_ne!(*handle, active.handle);
        assert_eq!(
            record.data.to_map().unwrap(),
            object(json!({"user": "ann", "cart": 3}))
        );
        assert_eq!(record.ver, 3);
    }

    #[tokio::test]
    async fn a_regenerate_of_a_session_killed_since_its_load_counts_a_new_one() {
        let (store, proxy, active, instructions) = regenerating(0).await;
        store.inner.delete(&active.handle).await.unwrap();

        let cookie = proxy.commit(&active, instructions).await.unwrap();

        assert!(matches!(cookie, Some(CookieChange::Set(_))), "{cookie:?}");
        let records = store.inner.list().await.unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(
            records[0].1.data.to_map().unwrap(),
            object(json!({"user": "ann"}))
        );
        assert_eq!(proxy.metrics.sessions_created.get(), 1);
    }

    #[tokio::test]
    async fn a_regenerate_of_a_session_killed_during_its_copy_does_not_bring_it_back() {
        let (store, proxy, active, mut instructions) = regenerating(0).await;
        instructions.patch = Some(object(json!({"lang": "fr"})));
        store.kill_during_copy.store(true, Ordering::SeqCst);

        let cookie = proxy.commit(&active, instructions).await.unwrap();

        let Some(CookieChange::Set(value)) = cookie else {
            panic!("no new cookie: {cookie:?}");
        };
        let records = store.inner.list().await.unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        let (handle, record) = &records[0];
        let id = value.split('.').next().unwrap();
        assert_eq!(*handle, Handle::of_id(id), "the cookie names the record");
        assert_ne!(*handle, active.handle);
        assert_eq!(
            record.data.to_map().unwrap(),
            object(json!({"lang": "fr"})),
            "the killed session's data came back under the new id"
        );
        assert_eq!(record.ver, 1);
        assert_eq!(proxy.metrics.sessions_created.get(), 1);
    }

    #[tokio::test]
    async fn a_regenerate_of_a_session_changed_during_every_copy_leaves_it_as_it_was() {
        let (store, proxy, active, instructions) = regenerating(usize::MAX).await;

        let outcome = proxy.commit(&active, instructions).await;

        assert_eq!(outcome, Err(Failure::SessionBusy));
        let records = store.inner.list().await.unwrap();
        assert_eq!(records.len(), 1, "no copy is left: {records:?}");
        let (handle, record) = &records[0];
        assert_eq!(*handle, active.handle);
        assert_eq!(
            record.data.to_map().unwrap(),
            object(json!({"user": "guest", "cart": 3}))
        );
        assert_eq!(record.ver, 1 + MAX_REGENERATE_COPIES as u64);
    }

    #[tokio::test]
    async fn a_regenerate_whose_update_no_longer_fits_after_a_change_leaves_no_copy() {
        let (store, proxy, active, mut instructions) = regenerating(1).await;
        // Fits the data as loaded ({"user": ...} is exactly 4096 bytes);
        // the `"cart":3` landing during the first copy takes it over.
        let user = "x".repeat(4096 - r#"{"user":""}"#.len());
        instructions.patch = Some(object(json!({ "user": user })));

        let outcome = proxy.commit(&active, instructions).await;

        assert_eq!(outcome, Err(Failure::InvalidUpdate));
        let records = store.inner.list().await.unwrap();
        assert_eq!(records.len(), 1, "no copy is left: {records:?}");
        assert_eq!(records[0].0, active.handle);
        assert_eq!(
            records[0].1.data.to_map().unwrap(),
            object(json!({"user": "guest", "cart": 3}))
        );
    }

    #[tokio::test]
    async fn a_regenerate_whose_old_id_cannot_go_leaves_no_copy() {
        let (store, proxy, active, instructions) = regenerating(0).await;
        store.old_unavailable.store(true, Ordering::SeqCst);

        let outcome = proxy.commit(&active, instructions).await;

        assert_eq!(outcome, Err(Failure::StoreUnavailable));
        let records = store.inner.list().await.unwrap();
        assert_eq!(records.len(), 1, "no copy is left: {records:?}");
        assert_eq!(records[0].0, active.handle);
        assert_eq!(
            records[0].1.data.to_map().unwrap(),
            object(json!({"user": "guest"}))
        );
    }
}
