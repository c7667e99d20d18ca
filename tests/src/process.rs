//! The services' real binaries as child processes, for the failures an
//! in-process service cannot model: `kill -9` takes the process's sockets
//! with it at once (its NATS connection, its half-sent writes), where an
//! in-process "kill" leaves the connection to the test's runtime.
//!
//! Binaries come from `RT_BIN_DIR`, else from the directory above the test
//! executable (`target/<profile>/`, where `cargo build --workspace --bins`
//! puts them; `scripts/test` builds them before the tests). A test that needs
//! a binary that is not there is skipped with a message, or fails when
//! `RT_REQUIRE_BINARIES` is set (as `scripts/test` and CI do), so a missing
//! build can never pass silently there.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where a workspace binary is, if it was built.
pub fn binary(name: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("RT_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        // target/<profile>/deps/<test executable>
        None => std::env::current_exe()
            .ok()?
            .parent()?
            .parent()?
            .to_path_buf(),
    };
    let path = dir.join(name);
    path.is_file().then_some(path)
}

/// [`binary`], or `None` after saying why the test is skipped; panics
/// instead when `RT_REQUIRE_BINARIES` is set.
pub fn binary_or_skip(name: &str) -> Option<PathBuf> {
    let found = binary(name);
    if found.is_none() {
        let message = format!(
            "{name} is not built (looked in RT_BIN_DIR or next to the test executable): \
             run `cargo build --workspace --bins` or scripts/test"
        );
        if std::env::var_os("RT_REQUIRE_BINARIES").is_some() {
            panic!("{message}");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}

/// A service running as its own process, configured by `RT_…` variables
/// (docs/operations.md), with its output kept for failure messages.
pub struct ServiceProcess {
    binary: PathBuf,
    env: Vec<(String, String)>,
    ready_message: String,
    child: Option<Child>,
    output: Arc<Mutex<Vec<String>>>,
}

impl ServiceProcess {
    /// Starts `binary` with `env` and waits until it logs `ready_message`.
    pub async fn start(binary: PathBuf, env: Vec<(String, String)>, ready_message: &str) -> Self {
        let mut process = Self {
            binary,
            env,
            ready_message: ready_message.to_owned(),
            child: None,
            output: Arc::new(Mutex::new(Vec::new())),
        };
        process.spawn().await;
        process
    }

    async fn spawn(&mut self) {
        let ready_message = self.ready_message.clone();
        let mut child = Command::new(&self.binary)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RT_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        let generation = self.output.lock().expect("output lock").len();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = self.output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().expect("output lock").push(line);
                }
            });
        }
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.output.lock().expect("output lock")[generation..]
                .iter()
                .any(|line| line.contains(&ready_message));
            if ready {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} did not log {ready_message:?} (exit: {exited:?}); its output:\n{}",
                    self.binary.display(),
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`: the process gets no chance to say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the same binary with the same settings again (as a supervisor
    /// would) and waits until it is ready.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Everything the process (and its earlier runs) wrote.
    pub fn output(&self) -> String {
        self.output.lock().expect("output lock").join("\n")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
