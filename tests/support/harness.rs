//! What every async integration test shares: the hang guard.

use std::future::Future;
use std::time::Duration;

/// Hang guard only: nothing asserts on time.
pub async fn guarded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(180), test)
        .await
        .expect("test finished within the hang guard");
}
