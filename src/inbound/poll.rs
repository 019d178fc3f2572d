//! For EHRs that cannot push (most offer no Subscriptions): every `poll_interval_ms`, search
//! the EHR for each resource type the workflow rules name, changed since the last search, and
//! take what it finds as the EHR's events (`Inbox::take`, sender `ehr`).
//!
//! The cursor of each type (`poll:<Type>`, the latest `meta.lastUpdated` seen) is kept in the
//! store, so a restart goes on where it stopped. The search is `_lastUpdated=ge<cursor>`: the
//! resources at the cursor's instant are read again and are duplicates (their versions were
//! seen), so nothing updated in the same instant as the last one read is missed. A first poll
//! starts a minute before the gateway's clock, not at the beginning of the EHR's history.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::{Inbox, InboxError};
use crate::store::Store;
use crate::workflow::notification::{Focus, Notice, Notification};

/// Resources read per search page.
const PAGE: usize = 100;
/// Pages read per type in one poll at most (the rest wait for the next poll).
const MAX_PAGES: usize = 50;

/// Polls until `shutdown` turns true.
pub async fn run(
    inbox: std::sync::Arc<Inbox>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        match poll_once(&inbox).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(resources = n, "poll: resources read from the EHR"),
            Err(e) => {
                tracing::warn!(error = %e, "poll: the EHR could not be searched; trying again next time")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// One poll of every type: how many resources were read.
pub async fn poll_once(inbox: &Inbox) -> Result<usize, InboxError> {
    let Some(ehr) = inbox.ehr.clone() else {
        return Err(InboxError::NoEhr("what changed".into()));
    };
    let mut read = 0;
    for resource_type in inbox.workflow.resource_types() {
        let name = format!("poll:{resource_type}");
        let mut since = match inbox.store.cursor(&name)? {
            Some(since) => since,
            None => {
                let start = (chrono::Utc::now() - chrono::Duration::minutes(1))
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                inbox.store.set_cursor(&name, &start).await?;
                start
            }
        };
        for _ in 0..MAX_PAGES {
            let query = format!(
                "{resource_type}?_lastUpdated=ge{}&_sort=_lastUpdated&_count={PAGE}",
                crate::fhir::search_encode(&since)
            );
            let page = ehr
                .read(&query)
                .await
                .map_err(|why| InboxError::Unreadable {
                    focus: format!("a search of {resource_type}"),
                    why,
                })?;
            let resources = matches(&page);
            let n = resources.len();
            let latest = resources
                .iter()
                .filter_map(|r| r["meta"]["lastUpdated"].as_str())
                .max()
                .map(str::to_string);
            let notices = resources
                .into_iter()
                .filter_map(|resource| {
                    let focus = Focus::of(&resource)?;
                    let seen = match &focus.version {
                        Some(_) => focus.versioned(),
                        None => format!(
                            "{}@{}",
                            focus.reference(),
                            resource["meta"]["lastUpdated"].as_str().unwrap_or("")
                        ),
                    };
                    Some(Notice {
                        focus: Some(focus),
                        resource: Some(resource),
                        seen,
                    })
                })
                .collect();
            inbox.take("ehr", Notification::Events(notices)).await?;
            read += n;
            let advanced = latest.filter(|l| *l > since);
            match advanced {
                Some(l) => {
                    inbox.store.set_cursor(&name, &l).await?;
                    since = l;
                }
                None => break,
            }
            if n < PAGE {
                break;
            }
        }
    }
    Ok(read)
}

/// The resources a search answered with (not those it included).
fn matches(bundle: &Value) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"].as_str().is_none_or(|m| m == "match"))
        .map(|e| e["resource"].clone())
        .filter(Value::is_object)
        .collect()
}
