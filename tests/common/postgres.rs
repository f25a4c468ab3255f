//! A throwaway PostgreSQL cluster from Debian's packages in a temporary directory:
//! initdb (as the `postgres` user when running as root), a Unix socket in that
//! directory and no TCP listener, trust authentication for user `kms`. Stopped when
//! dropped; the shared cluster of a test binary is stopped when the binary exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tempfile::TempDir;

pub struct TempPostgres {
    dir: TempDir,
    port: u16,
    /// Set for a cluster that listens on 127.0.0.1 (TLS needs TCP) instead of a socket.
    tcp: bool,
}

fn bin_dir() -> PathBuf {
    for version in ["17", "16", "15"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    panic!("PostgreSQL server binaries not found: run scripts/deps.sh --test");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Hands a file of the cluster to its owner (the `postgres` user, when root).
fn chown_to_owner(path: &Path) {
    if is_root() {
        let mut chown = Command::new("chown");
        chown.arg("postgres:").arg(path);
        run(chown, "chown");
    }
}

/// Runs a PostgreSQL binary as the cluster's owner.
fn pg_command(program: &str) -> Command {
    let path = bin_dir().join(program);
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn run(mut command: Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl TempPostgres {
    pub fn start() -> TempPostgres {
        let dir = tempfile::Builder::new()
            .prefix("kms-pg-")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:").arg(dir.path());
                    c
                },
                "chown",
            );
        }
        let mut initdb = pg_command("initdb");
        initdb.arg("-D").arg(dir.path().join("data")).args([
            "-U",
            "kms",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let pg = TempPostgres {
            dir,
            port,
            tcp: false,
        };
        pg.start_again();
        pg
    }

    /// A cluster that takes only TLS connections on 127.0.0.1 (certificate and key in
    /// PEM) and authenticates user `kms` by `password` (SCRAM).
    pub fn start_secured(cert_pem: &str, key_pem: &str, password: &str) -> TempPostgres {
        let dir = tempfile::Builder::new()
            .prefix("kms-pg-tls-")
            .tempdir()
            .expect("temp dir");
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, password).unwrap();
        chown_to_owner(dir.path());
        chown_to_owner(&pwfile);
        let mut initdb = pg_command("initdb");
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                "kms",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(initdb, "initdb");
        let data = dir.path().join("data");
        std::fs::write(data.join("server.crt"), cert_pem).unwrap();
        std::fs::write(data.join("server.key"), key_pem).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        for file in ["server.crt", "server.key", "pg_hba.conf"] {
            chown_to_owner(&data.join(file));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = TempPostgres {
            dir,
            port,
            tcp: true,
        };
        pg.start_again();
        pg
    }

    /// host=127.0.0.1 for a TLS cluster; the password is not in the string.
    pub fn tcp_url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=kms dbname={database}",
            self.port
        )
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A libpq key-value connection string for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host={} port={} user=kms dbname={database}",
            self.dir.path().display(),
            self.port
        )
    }

    /// Runs one SQL statement as `kms` in the `postgres` database; returns whether it
    /// succeeded and its stderr.
    pub fn try_psql(&self, sql: &str) -> (bool, String) {
        let output = Command::new("psql")
            .args(["-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "kms",
                "-d",
                "postgres",
                "-qc",
            ])
            .arg(sql)
            .output()
            .expect("psql");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs one SQL statement; panics if it fails.
    pub fn psql(&self, sql: &str) {
        let (ok, stderr) = self.try_psql(sql);
        assert!(ok, "{sql}: {stderr}");
    }

    /// Creates a database (an existing one is kept) and returns its connection string.
    pub fn database(&self, name: &str) -> String {
        let (ok, stderr) = self.try_psql(&format!("CREATE DATABASE \"{name}\""));
        assert!(
            ok || stderr.contains("already exists"),
            "CREATE DATABASE {name}: {stderr}"
        );
        self.url(name)
    }

    /// The database a connection string of [`Self::url`] names.
    pub fn database_of(&self, url: &str) -> String {
        url.split_whitespace()
            .find_map(|part| part.strip_prefix("dbname="))
            .expect("a dbname")
            .to_owned()
    }

    /// Stops the server (fast shutdown: connections are closed).
    pub fn stop(&self) {
        let mut stop = pg_command("pg_ctl");
        stop.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        run(stop, "pg_ctl stop");
    }

    pub fn start_again(&self) {
        let mut start = pg_command("pg_ctl");
        start
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "30", "-o"])
            .arg(format!(
                "-c listen_addresses='{}' -c unix_socket_directories='{}' -c port={} \
                 -c max_connections=300 -c fsync=on{}",
                if self.tcp { "127.0.0.1" } else { "" },
                self.dir.path().display(),
                self.port,
                if self.tcp { " -c ssl=on" } else { "" },
            ))
            .arg("start");
        run(start, "pg_ctl start");
    }

    fn stop_immediately(data: &Path) {
        let mut stop = pg_command("pg_ctl");
        stop.arg("-D")
            .arg(data)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.output();
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        Self::stop_immediately(&self.dir.path().join("data"));
    }
}

static SHARED: OnceLock<TempPostgres> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(pg) = SHARED.get() {
        TempPostgres::stop_immediately(&pg.dir.path().join("data"));
        let _ = std::fs::remove_dir_all(pg.dir.path());
    }
}

/// One cluster for the whole test binary, started on first use, stopped at exit.
pub fn shared() -> &'static TempPostgres {
    SHARED.get_or_init(|| {
        let pg = TempPostgres::start();
        // SAFETY: registers a plain function to run at process exit.
        unsafe { libc::atexit(stop_shared) };
        pg
    })
}

/// True when the suite runs against PostgreSQL (`KMS_TEST_STORE=postgres`).
pub fn selected() -> bool {
    std::env::var("KMS_TEST_STORE").is_ok_and(|s| s == "postgres")
}
