//! Stopping a service in order: SIGINT (Ctrl-C) or SIGTERM (what systemd and `kill` send)
//! cancel the token every `serve` loop watches, so open requests drain before the process
//! exits instead of being cut off.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT or SIGTERM. Call inside a tokio runtime.
pub fn stop_on_signals() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let sigterm = async {
            match terminate.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            _ = sigterm => tracing::info!("SIGTERM: stopping"),
        }
        on_signal.cancel();
    });
    shutdown
}
