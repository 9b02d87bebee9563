//! The server's side of the tracker protocol: register, keep the match key
//! fresh, and reconnect with backoff when the tracker goes away.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::tracker::{TrackerError, TrackerLink, random_matchkey};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps the server registered with `tracker` until `stop` is cancelled.
pub(crate) async fn run(shared: Arc<Shared>, tracker: String, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let mut status = shared.status.subscribe();
    loop {
        // An unavailable server stays out of the tracker until it can serve.
        tokio::select! {
            () = stop.cancelled() => return,
            r = status.wait_for(|st| st.unavailable.is_none()) => if r.is_err() { return },
        }
        let connected = tokio::select! {
            () = stop.cancelled() => return,
            r = TrackerLink::connect(&tracker) => r,
        };
        let result = match connected {
            Ok(link) => {
                backoff = BACKOFF_MIN;
                let mut status = shared.status.subscribe();
                tokio::select! {
                    () = stop.cancelled() => return,
                    r = serve(&shared, link) => r,
                    // Closing the link takes the server out of the tracker.
                    _ = status.wait_for(|st| st.unavailable.is_some()) => {
                        tracing::warn!(%tracker, "server unavailable; leaving the tracker until it can serve");
                        Ok(())
                    }
                }
            }
            Err(e) => Err(e),
        };
        shared.update(|st| st.registered = false);
        if let Err(e) = result {
            tracing::warn!(%tracker, error = %e, retry_in = ?backoff, "tracker connection lost");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Registers on a fresh tracker connection, then keeps the lease fresh.
async fn serve(shared: &Shared, mut link: TrackerLink) -> Result<(), TrackerError> {
    let cfg = &shared.cfg;
    let custom = cfg.custom_addr.as_deref();
    link.update_info(&cfg.key, custom, shared.port).await?;
    // A session may be running (the tracker restarted meanwhile): PUT once it ends.
    if !shared.snapshot().busy {
        put_fresh_key(shared, &mut link).await?;
    }
    let mut unused = Duration::ZERO;
    loop {
        tokio::select! {
            () = shared.rekey.notified() => {
                if !shared.snapshot().busy {
                    put_fresh_key(shared, &mut link).await?;
                    unused = Duration::ZERO;
                }
            }
            () = tokio::time::sleep(cfg.tracker_poll) => {
                let st = shared.snapshot();
                if st.busy {
                    unused = Duration::ZERO;
                    continue;
                }
                let pending = link.pending_matchkeys().await?;
                if !st.registered || pending.contains(&st.matchkey) {
                    unused = Duration::ZERO;
                } else {
                    // Leased, but nobody connected: TVM's "unmatched" key.
                    unused = unused.saturating_add(cfg.tracker_poll);
                    if unused >= cfg.unused_lease_timeout {
                        tracing::info!(key = %cfg.key, "leased match key unused; registering a new one");
                        put_fresh_key(shared, &mut link).await?;
                        unused = Duration::ZERO;
                    }
                }
            }
        }
    }
}

async fn put_fresh_key(shared: &Shared, link: &mut TrackerLink) -> Result<(), TrackerError> {
    let cfg = &shared.cfg;
    let matchkey = random_matchkey(&cfg.key);
    // The new key is valid before the tracker can hand it out; a session
    // that started meanwhile keeps the server off the tracker.
    let mut busy = false;
    shared.update(|st| {
        busy = st.busy;
        if !busy {
            st.matchkey = matchkey.clone();
        }
    });
    if busy {
        return Ok(());
    }
    link.put(&cfg.key, shared.port, &matchkey, cfg.custom_addr.as_deref()).await?;
    shared.update(|st| st.registered = true);
    Ok(())
}
