//! `kms bench` runs against a real server and reports every scenario. No timing is
//! asserted: throughput is measured by running the tool, not by tests.

mod common;

use common::{TestServer, TestToken};

#[tokio::test]
async fn bench_reports_every_scenario_against_a_running_server() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let pid = server.pid().to_string();
    let stdout = run_bench(
        &server,
        &[
            "--concurrency",
            "4",
            "--seconds",
            "1",
            "--warmup-seconds",
            "0",
            "--rounds",
            "2",
            "--keys",
            "10",
            "--server-pid",
            &pid,
        ],
    )
    .await;
    assert!(stdout.contains("2 round(s) of 1s"), "{stdout}");
    for row in [
        "| Health/Check (baseline) |",
        "| WrapKey |",
        "| UnwrapKey |",
        "| UnwrapKey, many keys |",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row} in:\n{stdout}"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let ops: f64 = cells[2].parse().unwrap();
        assert!(ops > 0.0, "{line}");
        // The per-round ratio range, and CPU per call for both processes.
        assert!(cells[6].ends_with('x') && cells[6].contains('-'), "{line}");
        for cpu in [cells[7], cells[8]] {
            let micros: f64 = cpu
                .strip_suffix(" µs")
                .unwrap_or_else(|| panic!("no CPU figure in {line}"))
                .parse()
                .unwrap();
            assert!(micros > 0.0, "{line}");
        }
    }
}

#[tokio::test]
async fn bench_measures_the_import_scenarios() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let stdout = run_bench(
        &server,
        &[
            "--import-calls",
            "1",
            "--scenarios",
            "create-import-token,get-parameters-for-import",
        ],
    )
    .await;
    for row in [
        "| CreateImportToken (RSA-4096) |",
        "| GetParametersForImport (RSA-2048) |",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(row)),
            "no row {row} in:\n{stdout}"
        );
    }
}

/// `--preload` fills an instance to the asked size (and a second run finds it full),
/// and the at-size scenarios each report a row; CountKeys then says what was preloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_preloads_an_instance_and_measures_it_at_size() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let tenant = common::instance();
    let args = [
        "--instance",
        &tenant,
        "--preload",
        "300",
        "--scenarios",
        "get,list-first,list-deep,count",
        "--concurrency",
        "2",
        "--seconds",
        "1",
        "--warmup-seconds",
        "0",
        "--rounds",
        "1",
    ];
    let stdout = run_bench(&server, &args).await;
    for row in [
        "| GetKey |",
        "| ListKeys, first page |",
        "| ListKeys, any page (token) |",
        "| CountKeys |",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row} in:\n{stdout}"));
        let ops: f64 = line
            .split('|')
            .map(str::trim)
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert!(ops > 0.0, "{line}");
    }
    assert_eq!(common::count_keys(&server, &tenant).await, 300);
    // A second run reuses the keys.
    run_bench(&server, &args).await;
    assert_eq!(
        common::count_keys(&server, &tenant).await,
        300,
        "a filled instance is not filled again"
    );

    // `kms store stats` of the stopped server's embedded store counts what is in it,
    // and on redb the pages each table takes.
    server.stop().await;
    if !common::postgres::selected() {
        let (ok, out) = common::run_kms(&[
            "store".as_ref(),
            "stats".as_ref(),
            "--data-dir".as_ref(),
            data.path().as_os_str(),
        ]);
        assert!(ok, "{out}");
        let keys_row = out
            .lines()
            .find(|l| l.starts_with("| keys |"))
            .unwrap_or_else(|| panic!("no keys row in:\n{out}"));
        let cells: Vec<&str> = keys_row.split('|').map(str::trim).collect();
        let entries: u64 = cells[2].parse().unwrap();
        assert_eq!(entries, 300, "{keys_row}");
        let stored: u64 = cells[3].parse().unwrap();
        if common::sled_selected() {
            assert_eq!((cells[4], cells[5]), ("-", "-"), "{keys_row}");
        } else {
            let (pages, unused): (u64, u64) =
                (cells[4].parse().unwrap(), cells[5].parse().unwrap());
            assert!(pages > stored && unused < pages, "{keys_row}");
            assert_eq!(pages % 4096, 0, "whole pages: {keys_row}");
        }
        let number_after = |label: &str| -> Option<u64> {
            let rest = out.split(label).nth(1)?;
            rest.split(' ').next()?.trim().parse().ok()
        };
        let on_disk = number_after("size on disk: ").unwrap_or_else(|| panic!("{out}"));
        match number_after("in pages the database uses: ") {
            Some(in_use) => {
                assert!(!common::sled_selected(), "{out}");
                assert!(in_use > 0 && in_use <= on_disk, "{out}");
            }
            None => assert!(
                common::sled_selected(),
                "redb counts its pages in use: {out}"
            ),
        }
    }
}

/// Runs `kms bench` against the server with `args`; returns its stdout, asserting success.
async fn run_bench(server: &TestServer, args: &[&str]) -> String {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kms"));
    let token_file = common::admin_token_path(&server.data_dir);
    command
        .args(["bench", "--addr", &server.url(), "--token-file"])
        .arg(&token_file)
        .args(args);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The overload scenario: well-behaved callers keep being served during a flood that
/// overruns a small HSM queue (the flood is refused RESOURCE_EXHAUSTED, nothing fails
/// otherwise), and the server's memory is reported per phase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_overload_shows_refusals_under_a_flood_and_service_for_the_others() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(
        &token,
        data.path(),
        &[("KMS_HSM_POOL_SIZE", "1"), ("KMS_HSM_QUEUE_SIZE", "4")],
    )
    .await;
    let pid = server.pid().to_string();
    let stdout = run_bench(
        &server,
        &[
            "--scenarios",
            "overload",
            "--concurrency",
            "4",
            "--flood-factor",
            "10",
            "--seconds",
            "2",
            "--warmup-seconds",
            "0",
            "--server-pid",
            &pid,
        ],
    )
    .await;
    let row = |phase: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {phase} |")))
            .unwrap_or_else(|| panic!("no {phase} row in:\n{stdout}"))
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let number = |cell: &str| cell.parse::<f64>().unwrap();
    for phase in ["steady", "flood", "after: first second", "after"] {
        let cells = row(phase);
        assert!(
            number(&cells[2]) > 0.0,
            "well-behaved callers served: {cells:?}"
        );
        assert_eq!(
            cells[8], "0",
            "no call failed other than by refusal: {cells:?}"
        );
        assert!(cells[9].ends_with("MiB"), "{cells:?}");
    }
    let flood = row("flood");
    assert!(
        number(&flood[7]) > 0.0,
        "the flood overran the queue: {flood:?}"
    );
    assert_eq!(number(&row("steady")[7]), 0.0);
}
