//! The store conformance suite (`kms::store::conformance`), run against every backend:
//! sled and redb in a temporary directory, PostgreSQL in a throwaway cluster.

mod common;

use std::future::Future;
use std::sync::Arc;

use common::postgres::TempPostgres;
use kms::store::{PostgresConfig, PostgresStore, RedbStore, SledStore, Store, conformance};

async fn sled_store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("db")).unwrap();
    (dir, Arc::new(store))
}

fn postgres_config(pg: &TempPostgres) -> PostgresConfig {
    let name = format!("conformance_{}", uuid::Uuid::new_v4().simple());
    PostgresConfig::new(pg.database(&name))
}

fn redb_store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("kms.redb"), 16 << 20).unwrap();
    (dir, Arc::new(store))
}

async fn on_each<F, Fut>(check: F)
where
    F: Fn(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    let (_dir, store) = sled_store().await;
    check(store).await;
    let (_dir, store) = redb_store();
    check(store).await;
    let pg = common::postgres::shared();
    let store = PostgresStore::connect(&postgres_config(pg)).await.unwrap();
    check(Arc::new(store)).await;
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                on_each(conformance::$name).await;
            }
        )*
    };
}

conformance!(
    keys_and_counters,
    replace_by_revision,
    concurrent_updates_lose_nothing,
    versions,
    version_material,
    version_pages,
    list_pages,
    list_pages_after_a_position,
    expiry_index,
    import_tokens,
    last_retrieval_goes_once,
    import_parameters_and_pairs,
    audit_chain,
    snapshot_holds_everything,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_is_refused_by_sled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let open = || async { SledStore::open(&path).map(|s| Arc::new(s) as Arc<dyn Store>) };
    conformance::newer_schema_is_refused(
        open,
        |store| async {
            drop(store);
            let store = SledStore::open(&path).unwrap();
            assert_eq!(
                store.schema_version().unwrap(),
                Some(kms::store::STORE_SCHEMA)
            );
            store
                .force_schema_version(kms::store::STORE_SCHEMA + 1)
                .unwrap();
        },
        kms::store::STORE_SCHEMA,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_is_refused_by_redb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms.redb");
    let open = || async { RedbStore::open(&path, 16 << 20).map(|s| Arc::new(s) as Arc<dyn Store>) };
    conformance::newer_schema_is_refused(
        open,
        |store| async {
            drop(store);
            let store = RedbStore::open(&path, 16 << 20).unwrap();
            assert_eq!(
                store.schema_version().unwrap(),
                Some(kms::store::STORE_SCHEMA)
            );
            store
                .force_schema_version(kms::store::STORE_SCHEMA + 1)
                .await
                .unwrap();
        },
        kms::store::STORE_SCHEMA,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_is_refused_by_postgres() {
    let pg = common::postgres::shared();
    let config = postgres_config(pg);
    let known = kms::store::postgres::schema::known_version();
    let open = || async {
        PostgresStore::connect(&config)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
    };
    conformance::newer_schema_is_refused(
        open,
        |_| async {
            let store = PostgresStore::connect(&config).await.unwrap();
            assert_eq!(store.schema_version().await.unwrap(), known);
            store.force_schema_version(known + 1).await.unwrap();
        },
        known,
    )
    .await;
}

/// Replicas starting together: the migration runs once, under its lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_starts_migrate_once() {
    let pg = common::postgres::shared();
    let config = postgres_config(pg);
    let starts = (0..6).map(|_| {
        let config = config.clone();
        tokio::spawn(async move { PostgresStore::connect(&config).await.map(|_| ()) })
    });
    for start in starts.collect::<Vec<_>>() {
        start.await.unwrap().expect("every replica starts");
    }
    let store = PostgresStore::connect(&config).await.unwrap();
    assert_eq!(
        store.schema_version().await.unwrap(),
        kms::store::postgres::schema::known_version()
    );
}
