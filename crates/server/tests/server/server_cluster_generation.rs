//! Cluster mode's durable generation cross-check, through the real server start on real
//! files: a server activated for a membership generation lower than the one the store was
//! last served at refuses to serve (another lineage served the store after this one's
//! view) and leaves the store untouched; an equal or higher generation serves and records
//! itself; generation 1 (a cluster started afresh) restarts the count.

use crate::server_support;

use csnap_server::net::{self, ServerError};
use csnap_server::store::{read_superblock, FileDevice, Store, StoreError};
use server_support::*;

fn store_generations(fx: &Fixture) -> (u64, u64) {
    let dev = FileDevice::open(&fx.store, false).unwrap();
    let sb = read_superblock(&dev).unwrap();
    (sb.cluster_generation, sb.server_generation)
}

async fn serve(fx: &Fixture, generation: Option<u64>) -> Result<(), ServerError> {
    let mut cfg = fx.config(fx.unix_addr("server.sock"));
    cfg.cluster_generation = generation;
    let server = net::start(cfg).await?;
    server.shutdown().await.expect("clean shutdown");
    Ok(())
}

#[tokio::test]
async fn a_server_behind_the_stores_cluster_generation_refuses_to_serve() {
    let fx = Fixture::small();
    assert_eq!(
        store_generations(&fx).0,
        0,
        "a formatted store has no cluster generation"
    );

    serve(&fx, Some(7)).await.expect("generation 7 serves");
    assert_eq!(store_generations(&fx).0, 7, "the activation is recorded");

    let before = store_generations(&fx);
    match serve(&fx, Some(5)).await {
        Err(ServerError::Store {
            source:
                StoreError::ClusterGenerationAhead {
                    store: 7,
                    activating: 5,
                },
            ..
        }) => {}
        other => panic!("generation 5 on a store served at 7 must be refused: {other:?}"),
    }
    let message = serve(&fx, Some(6)).await.unwrap_err().to_string();
    assert!(
        message.contains("cluster generation 7") && message.contains("generation 6"),
        "the error says both generations: {message}"
    );
    assert_eq!(
        store_generations(&fx),
        before,
        "a refused open writes nothing (not even the server generation bump)"
    );

    serve(&fx, Some(7))
        .await
        .expect("the same generation again serves");
    serve(&fx, Some(8))
        .await
        .expect("a later generation serves");
    assert_eq!(store_generations(&fx).0, 8);

    serve(&fx, None)
        .await
        .expect("standalone serves whatever the cluster wrote");
    assert_eq!(store_generations(&fx).0, 8, "standalone leaves it alone");

    serve(&fx, Some(1))
        .await
        .expect("generation 1 (a cluster without history) serves");
    assert_eq!(store_generations(&fx).0, 1, "and restarts the count");
    serve(&fx, Some(2)).await.expect("its successor serves");

    // The store is consistent after all of it.
    let dev = std::sync::Arc::new(FileDevice::open(&fx.store, false).unwrap());
    let mut store = Store::open(dev, Default::default()).unwrap();
    assert_eq!(store.superblock().cluster_generation, 2);
    assert!(store.check().unwrap().is_clean());
    store.close().unwrap();
}
