//! One cancellation token for the whole process, cancelled by SIGTERM or SIGINT. A second signal during the stop
//! exits at once: nothing the process acknowledged depends on the stop finishing (both binaries survive a
//! `kill -9` anywhere), so an operator who does not want to wait for the drain need not reach for SIGKILL.

use tokio_util::sync::CancellationToken;

/// The exit status after a second signal (128 + SIGINT, as a shell reports an interrupted command).
pub const SECOND_SIGNAL_EXIT: i32 = 130;

/// Spawns a task that cancels `token` on SIGTERM or Ctrl-C, and exits the process on the next one.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (mut int, mut term) = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(i), Ok(t)) => (i, t),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot install the SIGINT/SIGTERM handlers");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = token.cancelled() => return,
            }
            tracing::info!("shutdown requested");
            token.cancel();
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::warn!(
                "second shutdown signal: exiting now, without finishing the stop (what was acknowledged is committed)"
            );
            std::process::exit(SECOND_SIGNAL_EXIT);
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutdown requested");
            token.cancel();
        }
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
