//! A pooled PostgreSQL client on a runtime of its own, callable from blocking code
//! on any thread, inside another runtime or not. The audit trail, the approval
//! store and the principal store all talk to the shared `--store` this way: their
//! callers are the audit writer thread and `spawn_blocking` closures, which must
//! not depend on whichever runtime (if any) they run under.
//!
//! No TLS: the connection is for loopback or a trusted network.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// Why an operation could not be run at all (each store maps these to its own
/// error, so that what callers see stays the store's).
#[derive(Debug)]
pub(crate) enum PoolFailure {
    /// The client runtime could not be started.
    Runtime(std::io::Error),
    /// The pool could not be built.
    Build(String),
    /// The store was closed (its runtime is gone).
    Closed,
    /// The operation took longer than the time it was given.
    Timeout(Duration),
    /// The thread that waited for the operation panicked.
    ThreadFailed,
}

/// The connection settings every store uses for `url`: a 3 s connect timeout and
/// TCP keepalives, so a dead server is noticed rather than waited on.
pub(crate) fn config(
    url: &str,
    application_name: &str,
) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config
        .connect_timeout(Duration::from_secs(3))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .application_name(application_name);
    Ok(config)
}

/// A connection pool and the runtime its connections live on.
pub(crate) struct BlockingPool {
    pool: Pool,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for BlockingPool {
    fn drop(&mut self) {
        // May run inside another runtime, where a blocking shutdown would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl BlockingPool {
    /// A pool of at most `max_size` connections for `config`, each wait for,
    /// creation or recycling of a connection bounded by `timeout`, on a one-worker
    /// runtime whose thread is called `thread_name`. Connects lazily.
    pub(crate) fn new(
        config: tokio_postgres::Config,
        thread_name: &str,
        max_size: usize,
        timeout: Duration,
    ) -> Result<BlockingPool, PoolFailure> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(thread_name)
            .enable_all()
            .build()
            .map_err(PoolFailure::Runtime)?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|error| PoolFailure::Build(error.to_string()))?;
        Ok(BlockingPool {
            pool,
            runtime: Some(runtime),
        })
    }

    /// The pool, for taking connections inside work given to [`BlockingPool::run`].
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs `work` on the pool's runtime and waits for it, at most `timeout`.
    /// The outer error says the work did not finish; the inner one is its own.
    pub(crate) fn run<T: Send, E: Send>(
        &self,
        timeout: Duration,
        work: impl Future<Output = Result<T, E>> + Send,
    ) -> Result<Result<T, E>, PoolFailure> {
        let Some(runtime) = &self.runtime else {
            return Err(PoolFailure::Closed);
        };
        let handle = runtime.handle();
        let bounded = async {
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| PoolFailure::Timeout(timeout))
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return handle.block_on(bounded);
        }
        // Inside another runtime `block_on` would panic: wait on a thread of our own.
        std::thread::scope(|scope| {
            scope
                .spawn(|| handle.block_on(bounded))
                .join()
                .unwrap_or(Err(PoolFailure::ThreadFailed))
        })
    }
}
