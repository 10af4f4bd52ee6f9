//! When a served connection must be closed: requests in flight are tracked until their
//! response is written, and the [`watchdog`] resolves once the first request is late, the
//! connection has been idle too long, or a refused connection's window is over.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use hyper::body::{Frame, SizeHint};
use tokio::sync::Notify;

use super::ServeOptions;
use crate::limits::REFUSAL_WINDOW;

/// Why a served connection is being closed by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CloseReason {
    /// No complete request headers within `first_request_timeout` of the accept.
    NoFirstRequest,
    /// No request in flight for `idle_timeout`.
    Idle,
    /// A connection over its identity's cap has had its window to read the refusal.
    Refused,
    /// The server is shutting down.
    Drain,
}

/// When a connection last did something: requests in flight and the end of the last one.
pub(super) struct Activity {
    accepted: Instant,
    state: Mutex<ActivityState>,
    /// Signalled whenever a request stops being in flight.
    request_done: Notify,
}

struct ActivityState {
    in_flight: usize,
    requests: u64,
    last: Instant,
}

impl Activity {
    /// A connection accepted at `accepted`, with no request yet.
    pub(super) fn new(accepted: Instant) -> Self {
        Activity {
            accepted,
            state: Mutex::new(ActivityState { in_flight: 0, requests: 0, last: accepted }),
            request_done: Notify::new(),
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// A request's headers are complete: it is in flight until the guard (held by its
    /// response body) is dropped.
    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        let mut s = self.lock();
        s.in_flight += 1;
        s.requests += 1;
        Busy(self.clone())
    }
}

/// One request in flight; dropped when its response has been written (or abandoned).
pub(super) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        {
            let mut s = self.0.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            s.last = Instant::now();
        }
        self.0.request_done.notify_one();
    }
}

/// A response body that keeps its request counted as in flight until it is written.
pub(super) struct TrackedBody {
    pub(super) body: Body,
    pub(super) _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Resolves when the connection should be closed: its first request is late, it has been
/// idle too long, or (a refused connection) its window to read the refusal is over.
pub(super) async fn watchdog(activity: &Activity, options: &ServeOptions, refusing: bool) -> CloseReason {
    if refusing {
        let window = options.first_request_timeout.min(REFUSAL_WINDOW);
        tokio::time::sleep_until((activity.accepted + window).into()).await;
        return CloseReason::Refused;
    }
    loop {
        let now = Instant::now();
        let (deadline, reason) = {
            let s = activity.lock();
            if s.requests == 0 {
                (Some(activity.accepted + options.first_request_timeout), CloseReason::NoFirstRequest)
            } else if s.in_flight > 0 {
                (None, CloseReason::Idle)
            } else {
                (Some(s.last + options.idle_timeout), CloseReason::Idle)
            }
        };
        match deadline {
            // Busy: look again when a request is done (a permit is stored if it is done
            // before this waits).
            None => activity.request_done.notified().await,
            Some(deadline) if deadline <= now => return reason,
            Some(deadline) => {
                // A request that starts meanwhile is seen at the deadline.
                tokio::time::sleep_until(deadline.into()).await;
            }
        }
    }
}
