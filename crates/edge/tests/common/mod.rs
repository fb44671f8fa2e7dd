//! What the edge test files share.

/// Runs each `async fn NAME(kind: TransportKind)` of the list once per transport, as the tests
/// `pipelined::NAME` and `plain::NAME`.
macro_rules! on_both_transports {
    ($($test:ident),* $(,)?) => {
        mod pipelined {
            $(#[tokio::test]
            async fn $test() {
                super::$test(cachectl_edge::TransportKind::Pipelined).await;
            })*
        }
        mod plain {
            $(#[tokio::test]
            async fn $test() {
                super::$test(cachectl_edge::TransportKind::Plain).await;
            })*
        }
    };
}
