//! Benchmark of the real server (prints figures; asserts nothing about speed):
//!
//! ```text
//! cargo test --release -p csnap-server --test server server_bench:: -- --ignored --nocapture
//! ```
//!
//! * metadata round trips: QueryWrite on chunks with no snapshot (no copy-out), one client
//!   in lock-step and 8 clients with 32 requests in flight each;
//! * copy-outs: QueryWrite on fresh chunks after a snapshot (read origin, write store,
//!   fdatasync, journal commit before the grant), in lock-step and with 8 x 32 in flight,
//!   which shows what group commit buys.

use crate::server_support;

use csnap_proto::*;
use csnap_server::net;
use server_support::*;
use std::sync::Arc;
use std::time::Instant;

async fn lock_step(c: &Client, chunks: std::ops::Range<u64>) -> f64 {
    let n = chunks.end - chunks.start;
    let t = Instant::now();
    for chunk in chunks {
        let r = c
            .request(ClientMsg::QueryWrite {
                ranges: vec![ChunkRange::new(chunk, 1)],
            })
            .await
            .unwrap();
        assert!(matches!(r, ServerMsg::OriginWriteOk { .. }), "{r:?}");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn pipelined(clients: &[Arc<Client>], first: u64, per_client: u64, depth: usize) -> f64 {
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        let base = first + i as u64 * per_client;
        tasks.spawn(async move {
            let mut inflight = std::collections::VecDeque::new();
            for chunk in base..base + per_client {
                inflight.push_back(
                    c.send(ClientMsg::QueryWrite {
                        ranges: vec![ChunkRange::new(chunk, 1)],
                    })
                    .1,
                );
                if inflight.len() >= depth {
                    let r = inflight.pop_front().unwrap().await.unwrap();
                    assert!(matches!(r, ServerMsg::OriginWriteOk { .. }), "{r:?}");
                }
            }
            for rx in inflight {
                assert!(matches!(rx.await.unwrap(), ServerMsg::OriginWriteOk { .. }));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    (clients.len() as u64 * per_client) as f64 / t.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn server_throughput() {
    let origin_chunks = 65536;
    let fx = Fixture::new(4096, origin_chunks, 512 << 20);
    let server = net::start(fx.config("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let addr = server.local_addr();
    let mut clients = Vec::new();
    for i in 0..8 {
        clients.push(Arc::new(
            Client::connect(&addr, &fx.key, 0x100 + i, ClientKind::Origin).await,
        ));
    }
    let admin = Client::connect(&addr, &fx.key, 0xAD, ClientKind::Admin).await;

    let rate = lock_step(&clients[0], 0..4000).await;
    println!("QueryWrite, no snapshot, 1 client lock-step:        {rate:>9.0} req/s");
    let rate = pipelined(&clients, 0, 4000, 32).await;
    println!("QueryWrite, no snapshot, 8 clients x 32 in flight:  {rate:>9.0} req/s");

    match admin
        .request(ClientMsg::CreateSnapshot {
            name: "bench".into(),
            token: 0,
        })
        .await
        .unwrap()
    {
        ServerMsg::SnapshotCreated { .. } => {}
        other => panic!("{other:?}"),
    }
    let rate = lock_step(&clients[0], 0..1000).await;
    println!("copy-out + commit, 1 client lock-step:              {rate:>9.0} req/s");
    let rate = pipelined(&clients, 1000, 2000, 32).await;
    println!("copy-out + commit, 8 clients x 32 in flight:        {rate:>9.0} req/s");
    server.shutdown().await.unwrap();
}
