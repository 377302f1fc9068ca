//! The backends an engine brokers for, each with its own poll context
//! (adapter, cadence, give-up, counters) and limits — so its own queue of
//! due polls, its own permits and its own polls-per-second cap — and the
//! kinds routed to them. A backend that is down or slow holds only its own
//! queue back.

use super::pipeline::{Limits, PollCtx};
use super::Refused;
use crate::backend::split_route;
use crate::config::file::KindSpec;
use app::kinds::{KindInfo, Schema};
use app::protocol::ErrorCode;
use std::sync::Arc;

/// One backend.
pub struct Slot {
    /// Its name in the configuration, in metrics and in stored task ids.
    pub name: Arc<str>,
    pub ctx: Arc<PollCtx>,
    pub limits: Limits,
}

/// Where a `start` of a kind goes.
pub struct Target<'a> {
    /// Index of the backend.
    pub slot: usize,
    /// What the backend is asked to run.
    pub remote: &'a str,
    /// The kind's params, checked before the backend is asked.
    pub schema: Option<&'a Schema>,
    /// The kind's webhook, from the configuration.
    pub webhook: Option<&'a str>,
}

/// Every backend and kind. Cheap to clone.
#[derive(Clone)]
pub struct Backends {
    slots: Arc<[Slot]>,
    /// Empty: every kind goes to the first backend, unchecked.
    kinds: Arc<[KindSpec]>,
}

impl Backends {
    /// `slots` must not be empty; each kind's `backend` indexes it.
    pub fn new(slots: Vec<Slot>, kinds: Vec<KindSpec>) -> Backends {
        assert!(!slots.is_empty(), "an engine has at least one backend");
        Backends {
            slots: slots.into(),
            kinds: kinds.into(),
        }
    }

    /// One backend, `default`, taking every kind.
    pub fn single(ctx: Arc<PollCtx>, limits: Limits) -> Backends {
        Backends::new(
            vec![Slot {
                name: "default".into(),
                ctx,
                limits,
            }],
            Vec::new(),
        )
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots[i.min(self.slots.len() - 1)]
    }

    /// The backend of a stored backend id (ids from before there were
    /// several backends, or of a backend no longer configured: the first).
    pub fn slot_of(&self, stored: &str) -> usize {
        match split_route(stored).0 {
            Some(name) => self
                .slots
                .iter()
                .position(|s| &*s.name == name)
                .unwrap_or(0),
            None => 0,
        }
    }

    /// Where a `start` of `kind` goes, or `unknown_kind`.
    pub fn target<'a>(&'a self, kind: &'a str) -> Result<Target<'a>, Refused> {
        if self.kinds.is_empty() {
            return Ok(Target {
                slot: 0,
                remote: kind,
                schema: None,
                webhook: None,
            });
        }
        let k = self
            .kinds
            .iter()
            .find(|k| k.info.name == kind)
            .ok_or_else(|| {
                let names: Vec<&str> = self.kinds.iter().map(|k| k.info.name.as_str()).collect();
                Refused::new(
                    ErrorCode::UnknownKind,
                    format!(
                        "unknown kind `{kind}`; this server runs {}",
                        names.join(", ")
                    ),
                )
            })?;
        Ok(Target {
            slot: k.backend,
            remote: &k.remote,
            schema: k.info.params.as_ref(),
            webhook: k.webhook.as_deref(),
        })
    }

    /// The kinds a client may start, as the page lists them (empty: any).
    pub fn kinds(&self) -> Vec<KindInfo> {
        self.kinds.iter().map(|k| k.info.clone()).collect()
    }
}
