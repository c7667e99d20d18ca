//! A throwaway nats-server per test.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server with JetStream in a temp dir, on a free loopback port.
/// Killed, and its directory removed, on drop.
pub struct NatsServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts on a port the server picks itself (`-p -1`) and reports in its
    /// ports file: choosing a free port first and passing it would race with
    /// the other tests starting servers in parallel.
    pub fn start() -> Self {
        let binary = find_binary();
        let dir = tempfile::tempdir().expect("temp dir for JetStream");
        let mut child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
            .arg(dir.path())
            .arg("--ports_file_dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let ports_file = dir.path().join(format!("nats-server_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&ports_file)
                .ok()
                .and_then(|text| client_port(&text))
            {
                break port;
            }
            if Instant::now() >= deadline || matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                panic!(
                    "nats-server did not start (no ports file in {})",
                    dir.path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "nats-server did not listen on {port}"
        );
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// Starts on a given port (a test that needs the port before the server exists).
    pub fn start_on(port: u16) -> Self {
        let binary = find_binary();
        let dir = tempfile::tempdir().expect("temp dir for JetStream");
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "nats-server did not listen on {port}"
        );
        let mut child = child;
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "nats-server exited: port {port} was taken by another process"
        );
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// Kills the server abruptly (SIGKILL), keeping its JetStream store.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same JetStream store
    /// (killing it first if it still runs): what a restarted node looks like
    /// to its clients, which reconnect by themselves.
    pub fn restart(&mut self) {
        self.kill();
        let binary = find_binary();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The old process's port may take a moment to be free again.
        loop {
            let mut child = Command::new(&binary)
                .args([
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-js",
                    "-sd",
                ])
                .arg(self._dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            if wait_for_port(self.port, Duration::from_secs(5)) {
                std::thread::sleep(Duration::from_millis(50));
                if matches!(child.try_wait(), Ok(None)) {
                    self.child = child;
                    return;
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "nats-server did not restart on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client port from a ports file: `{"nats":["nats://127.0.0.1:PORT"],…}`.
fn client_port(text: &str) -> Option<u16> {
    let json: serde_json::Value = serde_json::from_str(text).ok()?;
    json["nats"][0].as_str()?.rsplit(':').next()?.parse().ok()
}

fn find_binary() -> PathBuf {
    if let Ok(path) = std::env::var("RT_NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let debian = PathBuf::from("/usr/sbin/nats-server");
    if debian.is_file() {
        return debian;
    }
    panic!(
        "nats-server not found: install it (scripts/install-nats-server) or set RT_NATS_SERVER_BIN"
    );
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
