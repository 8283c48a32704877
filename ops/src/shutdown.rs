//! One cancellation token for the whole process, cancelled by SIGTERM or SIGINT.

use tokio_util::sync::CancellationToken;

/// Spawns a task that cancels `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install SIGTERM handler");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
                _ = token.cancelled() => return,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

/// Runs `f` on a new multi-threaded runtime (`workers` threads, default one per core) with a token that SIGTERM or
/// Ctrl-C cancels: the `run` command of both binaries.
pub fn run_until_signal<T, Fut>(
    workers: Option<usize>,
    f: impl FnOnce(CancellationToken) -> Fut,
) -> std::io::Result<T>
where
    Fut: std::future::Future<Output = T>,
{
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let rt = builder.enable_all().build()?;
    let out = rt.block_on(async {
        let cancel = CancellationToken::new();
        cancel_on_signal(cancel.clone());
        f(cancel).await
    });
    // `f` has finished its shutdown (flushed, drained, joined what it must). Blocking calls nobody waits for any
    // more — a name lookup on a network that is down, which only the resolver's own timeout ends — must not hold
    // the exit back: dropping the runtime would wait for them.
    rt.shutdown_timeout(BLOCKING_GRACE);
    Ok(out)
}

/// How long the exit waits for blocking calls still running once `run` returned ([`run_until_signal`]).
const BLOCKING_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
