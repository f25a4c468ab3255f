//! The store cannot write: on sled, the filesystem under its database fills up (a small
//! tmpfs mounted there, then filled); on PostgreSQL, the database turns read-only.
//! Mutating calls answer UNAVAILABLE with a generic message, reads keep working,
//! nothing acknowledged is lost, and writes resume once the fault clears, without a
//! restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestServer, TestToken, create_key, instance, req};
use kms::proto::{CreateKeyRequest, GetKeyRequest, WrapKeyRequest};
use tonic::Code;

const STORE_UNAVAILABLE: [&str; 2] = [
    "the key store is unavailable; retry later",
    "the audit trail cannot be written; the call was not completed, retry later",
];

/// A tmpfs of `size` mounted at `at`, unmounted on drop; `None` where mounting is not
/// allowed.
struct SmallFilesystem(std::path::PathBuf);

impl SmallFilesystem {
    fn mount(at: &Path, size: &str) -> Option<SmallFilesystem> {
        std::fs::create_dir_all(at).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| SmallFilesystem(at.to_owned()))
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) {
        let filler = self.0.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn create(server: &TestServer, tenant: &str, name: &str) -> Result<String, tonic::Status> {
    server
        .keys()
        .await
        .create_key(req(
            tenant,
            CreateKeyRequest {
                name: name.into(),
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner().key.unwrap().id)
}

/// Creates until one succeeds (at most 20 s); every failure must be the generic
/// UNAVAILABLE.
async fn create_once_writable(server: &TestServer, tenant: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match create(server, tenant, "after the fault").await {
            Ok(id) => return id,
            Err(status) => {
                assert_store_unavailable(&status);
                if Instant::now() > deadline {
                    let log = server.log();
                    let tail: Vec<&str> = log
                        .lines()
                        .filter(|l| !l.contains("DEBUG"))
                        .rev()
                        .take(12)
                        .collect();
                    panic!("writes never resumed; log: {tail:#?}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn assert_store_unavailable(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        STORE_UNAVAILABLE.contains(&status.message()),
        "a generic message: {status:?}"
    );
}

/// While the store cannot write: creates are refused, the keys there stay readable and
/// usable; afterwards writes resume and nothing acknowledged is gone.
async fn refused_then_resumed(
    server: &TestServer,
    tenant: &str,
    acknowledged: &[String],
    break_store: impl AsyncFnOnce(),
    mend_store: impl AsyncFnOnce(),
) {
    let before = common::count_keys(server, tenant).await;
    break_store().await;
    // The first few writes may still fit in what the store had buffered or in the last
    // page of its file already on disk (a sled create is a few hundred bytes); once
    // one is refused, every later one is.
    let mut fitted = 0;
    loop {
        match create(server, tenant, &format!("fitted-{fitted}")).await {
            Err(status) => {
                assert_store_unavailable(&status);
                break;
            }
            Ok(_) => {
                fitted += 1;
                assert!(
                    fitted <= 8,
                    "writes kept succeeding on a store that cannot write"
                );
            }
        }
    }
    for i in 0..4 {
        let refused = create(server, tenant, &format!("refused-{i}")).await;
        assert_store_unavailable(&refused.expect_err("a write after a refused one"));
    }
    // Reads keep working: the keys, and WrapKey under them.
    let mut keys = server.keys().await;
    for id in acknowledged {
        keys.get_key(req(tenant, GetKeyRequest { id: id.clone() }))
            .await
            .unwrap();
        keys.wrap_key(req(
            tenant,
            WrapKeyRequest {
                id: id.clone(),
                plaintext: None,
                aad: vec![],
            },
        ))
        .await
        .unwrap();
    }
    mend_store().await;
    create_once_writable(server, tenant).await;
    // A refused create may still have been written (UNAVAILABLE promises no outcome,
    // as for any call cut off); the one acknowledged is there.
    let after = common::count_keys(server, tenant).await;
    assert!(
        after > before + fitted && after <= before + fitted + 6,
        "{before} -> {after} ({fitted} fitted)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers() {
    if common::postgres::selected() {
        eprintln!("skipped: the PostgreSQL pass runs the read-only database case");
        return;
    }
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    // sled's database is a directory of its own; redb's file goes in one made for it.
    let (mount, env) = if common::redb_selected() {
        let file = data.path().join("store").join("kms.redb");
        let env = vec![("KMS_STORE_PATH", file.to_str().unwrap().to_owned())];
        (data.path().join("store"), env)
    } else {
        (data.path().join("db"), Vec::new())
    };
    let Some(disk) = SmallFilesystem::mount(&mount, "64m") else {
        eprintln!("skipped: this machine does not allow mounting a tmpfs");
        return;
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = TestServer::start_with_env(&token, data.path(), &env).await;
    let tenant = instance();
    let mut acknowledged = Vec::new();
    for i in 0..3 {
        acknowledged.push(
            create(&server, &tenant, &format!("kept-{i}"))
                .await
                .unwrap(),
        );
    }
    refused_then_resumed(
        &server,
        &tenant,
        &acknowledged,
        async || disk.fill(),
        async || disk.free(),
    )
    .await;
    // A write error poisons a sled database, and leaves redb refusing writes: the store
    // closed and reopened it.
    assert!(
        server
            .log_eventually("the store reopened after a write failure")
            .await
    );
    if common::redb_selected() {
        assert_eq!(
            server.log_count("committing to the store failed"),
            1,
            "logged once"
        );
    } else {
        // sled writes in the background too: when one of its own writes meets the
        // full disk first, the probe reopens it before any flush fails.
        assert!(
            server.log_count("flushing the store failed") <= 1,
            "logged once at most"
        );
    }
    // Acknowledged keys survive a kill -9 after the episode.
    server.kill().await;
    let server = TestServer::start_with_env(&token, data.path(), &env).await;
    let mut keys = server.keys().await;
    for id in &acknowledged {
        keys.get_key(req(&tenant, GetKeyRequest { id: id.clone() }))
            .await
            .unwrap_or_else(|e| panic!("acknowledged key {id} lost: {e:?}"));
    }
    drop(keys);
    assert!(server.stop().await.success());
    // `--data-dir` finds a `kms.redb` in the directory it is given.
    let store_dir = if common::redb_selected() {
        mount.as_path()
    } else {
        data.path()
    };
    let (verified, report) = common::audit_verify(store_dir);
    assert!(verified, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_database_refuses_writes_keeps_reads_and_recovers() {
    if !common::postgres::selected() {
        eprintln!("skipped: runs in the PostgreSQL pass");
        return;
    }
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let tenant = instance();
    let key = create_key(
        &mut server.keys().await,
        &tenant,
        CreateKeyRequest {
            name: "kept".into(),
            ..Default::default()
        },
    )
    .await;
    let database = common::postgres::shared().database_of(&common::store_url(data.path()));
    let set_read_only = |on: bool| {
        let cluster = common::postgres::shared();
        let setting = if on {
            format!("ALTER DATABASE \"{database}\" SET default_transaction_read_only = on")
        } else {
            format!("ALTER DATABASE \"{database}\" RESET default_transaction_read_only")
        };
        cluster.psql(&setting);
        // Existing connections keep their setting: end them, as a failover would.
        cluster.psql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        ));
    };
    refused_then_resumed(
        &server,
        &tenant,
        std::slice::from_ref(&key.id),
        async || set_read_only(true),
        async || set_read_only(false),
    )
    .await;
}
