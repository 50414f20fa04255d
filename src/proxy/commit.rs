//! Applying the upstream's instructions to the store (SPEC [4.5]), before
//! the response head leaves. Every change goes through `Store::modify`,
//! so it lands on the latest stored version.

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
                .map_err(store_failure)?;
            debug!("session {}: killed", active.handle.short());
        }
        Ok(Some(CookieChange::Clear))
    }

    /// A new id for the latest version of the session, then the patch.
    async fn regenerate(
        &self,
        active: &ActiveSession,
        patch: Option<&Map<String, Value>>,
        now: u64,
    ) -> Result<Option<CookieChange>, Failure> {
        let latest = match active.stored {
            Some(_) => self
                .timed(StoreOp::Load, self.store.load(&active.handle))
                .await
                .map_err(store_failure)?,
            None => None,
        };
        let mut record = latest.unwrap_or_else(|| self.fresh_record(active, now));
        if let Some(patch) = patch {
            record.data =
                patch::apply(&record.data, patch, self.settings.max_data_bytes).map_err(invalid)?;
        }
        record.ver += 1;
        record.atime = now;
        let id = SessionId::generate();
        self.put(&id.handle(), record).await?;
        if active.stored.is_some() {
            self.timed(StoreOp::Delete, self.store.delete(&active.handle))
                .await
                .map_err(store_failure)?;
        } else {
            self.metrics.sessions_created.inc();
        }
        debug!(
            "session {}: regenerated as {}",
            active.handle.short(),
            id.handle().short()
        );
        Ok(Some(CookieChange::Set(
            self.settings.cookie_signer.sign(&id),
        )))
    }

    /// Merges the patch into the latest stored version.
    async fn update(
        &self,
        active: &ActiveSession,
        patch: &Map<String, Value>,
        now: u64,
    ) -> Result<Option<CookieChange>, Failure> {
        let max = self.settings.max_data_bytes;
        if let Some(seen) = &active.stored {
            let decide = |current: Option<&Record>| {
                let Some(current) = current else {
                    return Ok(Change::Keep);
                };
                Ok(Change::Put(Record {
                    data: patch::apply(&current.data, patch, max).map_err(|e| e.to_string())?,
                    created: current.created,
                    atime: now,
                    ip: current.ip.clone(),
                    ver: current.ver + 1,
                }))
            };
            let stored = self
                .timed(
                    StoreOp::Save,
                    self.store.modify_seen(&active.handle, seen, &decide),
                )
                .await;
            match stored.map_err(store_failure)? {
                Some(_) => {
                    return Ok(self
                        .settings
                        .cookie
                        .max_age
                        .gt(&0)
                        .then(|| self.cookie_for(&active.id)));
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
        record.data = patch::apply(&record.data, patch, max).map_err(invalid)?;
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
                self.timed(StoreOp::Save, self.store.touch(&active.handle, now))
                    .await
                    .map_err(store_failure)?;
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
            .map_err(store_failure)?;
        Ok(())
    }

    fn cookie_for(&self, id: &SessionId) -> CookieChange {
        CookieChange::Set(self.settings.cookie_signer.sign(id))
    }
}

fn store_failure(e: StoreError) -> Failure {
    match e {
        StoreError::Rejected(reason) => {
            warn!("invalid session update from upstream: {reason}");
            Failure::InvalidUpdate
        }
        other => {
            warn!("session store failed: {other}");
            Failure::StoreUnavailable
        }
    }
}

fn invalid(e: patch::InvalidUpdate) -> Failure {
    warn!("invalid session update from upstream: {e}");
    Failure::InvalidUpdate
}
