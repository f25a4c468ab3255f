//! The fault-injecting PKCS#11 module (`tests/pkcs11-faults`) between a test server and
//! its real token: built once per test binary, pointed at the token's real module, and
//! steered through its control file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use super::TestToken;

/// The built module's path. Built into a target directory of its own: the `cargo test`
/// that runs this binary holds the lock of the main one.
fn module() -> &'static Path {
    static MODULE: OnceLock<PathBuf> = OnceLock::new();
    MODULE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target").join("pkcs11-faults");
        let status = Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .args(["build", "--quiet", "-p", "pkcs11-faults", "--target-dir"])
            .arg(&target)
            .current_dir(root)
            .status()
            .expect("run cargo to build the fault-injecting module");
        assert!(status.success(), "building tests/pkcs11-faults failed");
        target.join("debug").join("libpkcs11_faults.so")
    })
}

/// One server's fault switchboard.
pub struct Faults {
    control: PathBuf,
    module: PathBuf,
    real_module: PathBuf,
}

static WRITES: AtomicU64 = AtomicU64::new(0);

impl Faults {
    /// Faults for a server on `token`, controlled through a file under `dir`; none set.
    pub fn new(token: &TestToken, dir: &Path) -> Faults {
        let faults = Faults {
            control: dir.join("pkcs11-faults.control"),
            module: module().to_owned(),
            real_module: token.module.clone(),
        };
        faults.clear();
        faults
    }

    /// The server environment that loads the module in front of the real one.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KMS_HSM_MODULE".into(), self.module.display().to_string()),
            (
                "PKCS11_FAULTS_MODULE".into(),
                self.real_module.display().to_string(),
            ),
            (
                "PKCS11_FAULTS_CONTROL".into(),
                self.control.display().to_string(),
            ),
        ]
    }

    /// Replaces every rule (see the module's doc), counts starting afresh.
    pub fn set(&self, rules: &str) {
        // A unique line, so that setting the same rules again still resets their counts;
        // written whole and renamed, so the module never reads half a file.
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let staged = self.control.with_extension("staged");
        std::fs::write(&staged, format!("# {n}\n{rules}\n")).unwrap();
        std::fs::rename(&staged, &self.control).unwrap();
    }

    pub fn clear(&self) {
        self.set("");
    }

    /// How many faults the module has injected so far.
    pub fn injected(&self) -> usize {
        let mut log = self.control.clone().into_os_string();
        log.push(".log");
        std::fs::read_to_string(log)
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }
}
