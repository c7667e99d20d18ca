//! Is the generator itself the bottleneck? Its CPU time (`/proc/self/stat`), its
//! file-descriptor limit (`/proc/self/limits`, raised with `prlimit(1)`: this workspace
//! forbids `unsafe`, so no direct `setrlimit`), and the number of cores. Also the server's
//! own cost when it runs here (`--server-pid`): CPU time and resident memory of its
//! processes, read from `/proc/<pid>/stat` and `/proc/<pid>/status` with every sample.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`): 100 on every Linux ABI
/// rtload targets (it is fixed for user space and independent of the kernel's HZ).
const USER_HZ: f64 = 100.0;

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Process CPU time (user + system, all threads) and the machine's busy/total CPU time,
/// at a moment.
/// With `--server-pid`, the server processes' readings too.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    ticks: u64,
    machine: Option<(u64, u64)>,
    server: Option<ServerSample>,
    at: Instant,
}

impl CpuSample {
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_machine_ticks(&s));
        Some(CpuSample {
            ticks: parse_stat_ticks(&stat)?,
            machine,
            server: ServerSample::now(),
            at: Instant::now(),
        })
    }

    /// CPU rtload used between `self` and `later`, as a percentage of all cores' capacity.
    pub fn percent_until(&self, later: &CpuSample, cores: usize) -> f64 {
        let wall = later.at.saturating_duration_since(self.at).as_secs_f64();
        let cpu = later.ticks.saturating_sub(self.ticks) as f64 / USER_HZ;
        if wall <= 0.0 {
            return 0.0;
        }
        100.0 * cpu / (wall * cores.max(1) as f64)
    }

    /// How busy the whole machine was between `self` and `later` (rtload, the server if it
    /// runs here, everything), as a percentage of all cores.
    pub fn machine_percent_until(&self, later: &CpuSample) -> Option<f64> {
        let (busy0, total0) = self.machine?;
        let (busy1, total1) = later.machine?;
        let total = total1.checked_sub(total0).filter(|t| *t > 0)?;
        Some(100.0 * busy1.saturating_sub(busy0) as f64 / total as f64)
    }
}

/// rtload's CPU and the machine's between two samples (either may be missing), as
/// percentages of all cores: what the progress line and the final report show.
pub fn cpu_between(
    a: Option<CpuSample>,
    b: Option<CpuSample>,
    cores: usize,
) -> (Option<f64>, Option<f64>) {
    match (a, b) {
        (Some(a), Some(b)) => (
            Some(a.percent_until(&b, cores)),
            a.machine_percent_until(&b),
        ),
        _ => (None, None),
    }
}

/// The server's processes (`--server-pid`, set once at start by `main`).
static SERVER_PIDS: OnceLock<Vec<u32>> = OnceLock::new();

/// Records the server's process ids; every later [`CpuSample`] reads them too.
pub fn set_server_pids(pids: Vec<u32>) {
    if !pids.is_empty() {
        let _ = SERVER_PIDS.set(pids);
    }
}

/// At most this many `--server-pid`s are sampled (the rest are ignored), so that a sample
/// stays `Copy`.
pub const MAX_SERVER_PIDS: usize = 16;

/// CPU ticks and resident memory of each server process at one moment; a process that
/// could not be read (gone) is left out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ServerSample {
    /// (pid, utime + stime ticks, VmRSS bytes); the first `len` are valid.
    slots: [(u32, u64, u64); MAX_SERVER_PIDS],
    len: usize,
}

impl ServerSample {
    fn now() -> Option<Self> {
        let pids = SERVER_PIDS.get()?;
        Some(ServerSample::read(pids))
    }

    pub fn read(pids: &[u32]) -> Self {
        Self::of(pids.iter().take(MAX_SERVER_PIDS).filter_map(|&pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            Some((pid, parse_stat_ticks(&stat)?, parse_vmrss(&status)?))
        }))
    }

    /// From (pid, ticks, rss) readings (the first [`MAX_SERVER_PIDS`]).
    pub fn of(readings: impl IntoIterator<Item = (u32, u64, u64)>) -> Self {
        let mut sample = ServerSample {
            slots: [(0, 0, 0); MAX_SERVER_PIDS],
            len: 0,
        };
        for r in readings.into_iter().take(MAX_SERVER_PIDS) {
            sample.slots[sample.len] = r;
            sample.len += 1;
        }
        sample
    }

    fn procs(&self) -> &[(u32, u64, u64)] {
        &self.slots[..self.len]
    }
}

/// What the server's processes cost over a window: `server` in the JSON reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServerUsage {
    /// The processes asked for (`--server-pid`).
    pub pids: Vec<u32>,
    /// Of those, the ones readable at both ends of the window.
    pub pids_measured: usize,
    /// utime + stime summed over the processes (all their threads), over the window.
    pub cpu_seconds: f64,
    /// The window's length.
    pub window_s: f64,
    /// cpu_seconds / window: 1.0 is one core busy all the time.
    pub cores_busy: f64,
    /// Summed VmRSS at the end of the window.
    pub rss_bytes: u64,
    /// Summed VmRSS at its start.
    pub rss_start_bytes: u64,
}

impl ServerUsage {
    /// One text line for the reports.
    pub fn render(&self, out: &mut String) {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        out.push_str(&format!(
            "server        cpu {:.2} s over {:.1} s ({:.2} cores busy); rss {:.1} MiB at the end ({:.1} MiB at the start); pids {}{}\n",
            self.cpu_seconds,
            self.window_s,
            self.cores_busy,
            mib(self.rss_bytes),
            mib(self.rss_start_bytes),
            self.pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            if self.pids_measured < self.pids.len() {
                format!(" ({} of them readable)", self.pids_measured)
            } else {
                String::new()
            },
        ));
    }
}

/// The server's CPU seconds and memory between two samples taken with `--server-pid`:
/// per process present in both (a process that exited is left out of both sides).
pub fn server_between(a: Option<CpuSample>, b: Option<CpuSample>) -> Option<ServerUsage> {
    let (a, b) = (a?, b?);
    let (sa, sb) = (a.server.as_ref()?, b.server.as_ref()?);
    let window = b.at.saturating_duration_since(a.at).as_secs_f64();
    Some(usage_between(sa, sb, window))
}

pub fn usage_between(a: &ServerSample, b: &ServerSample, window_s: f64) -> ServerUsage {
    let mut ticks = 0u64;
    let mut measured = 0usize;
    for (pid, t1, _) in b.procs() {
        if let Some((_, t0, _)) = a.procs().iter().find(|(p, _, _)| p == pid) {
            ticks += t1.saturating_sub(*t0);
            measured += 1;
        }
    }
    let cpu_seconds = crate::stats::round3(ticks as f64 / USER_HZ);
    let mut pids: Vec<u32> = SERVER_PIDS.get().cloned().unwrap_or_default();
    if pids.is_empty() {
        pids = b.procs().iter().map(|(p, _, _)| *p).collect();
    }
    ServerUsage {
        pids,
        pids_measured: measured,
        cpu_seconds,
        window_s: crate::stats::round3(window_s),
        cores_busy: if window_s > 0.0 {
            crate::stats::round3(cpu_seconds / window_s)
        } else {
            0.0
        },
        rss_bytes: b.procs().iter().map(|(_, _, r)| r).sum(),
        rss_start_bytes: a.procs().iter().map(|(_, _, r)| r).sum(),
    }
}

/// `VmRSS:    12345 kB` of `/proc/<pid>/status`, in bytes.
pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// (busy, total) jiffies of all CPUs from the first line of `/proc/stat`: busy excludes
/// idle and iowait.
pub fn parse_machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// utime + stime from the text of `/proc/<pid>/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // after ')' come: state(3) ppid(4) ... utime(14) stime(15)
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `RLIMIT_NOFILE`; `None` means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

pub fn fd_limit() -> Option<FdLimit> {
    parse_limits(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

pub fn parse_limits(text: &str) -> Option<FdLimit> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut values = line["Max open files".len()..].split_whitespace();
    let value = |v: &str| -> Option<Option<u64>> {
        if v == "unlimited" {
            Some(None)
        } else {
            v.parse().ok().map(Some)
        }
    };
    Some(FdLimit {
        soft: value(values.next()?)?,
        hard: value(values.next()?)?,
    })
}

/// Raises the soft descriptor limit to the hard one with `prlimit --pid <self>`. Returns
/// the limit in force afterwards, and a note when raising was needed but failed.
pub fn raise_fd_limit() -> (Option<FdLimit>, Option<String>) {
    let Some(before) = fd_limit() else {
        return (None, Some("cannot read /proc/self/limits".into()));
    };
    if before.soft == before.hard {
        return (Some(before), None);
    }
    let hard = before
        .hard
        .map_or_else(|| "unlimited".to_string(), |h| h.to_string());
    let outcome = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .output();
    let after = fd_limit();
    let note = match outcome {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "prlimit could not raise the descriptor limit: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!(
            "prlimit not run ({e}); descriptor limit left as is"
        )),
    };
    (after.or(Some(before)), note)
}

/// Raises the descriptor limit for a run that needs about `needed` descriptors: warns on
/// stderr at once when it stays too low, and returns the limit in force and a note for the
/// report when raising failed.
pub fn prepare_fds(needed: u64) -> (Option<FdLimit>, Vec<String>) {
    let (fd, note) = raise_fd_limit();
    if let Some(soft) = fd.and_then(|fd| fd.soft).filter(|soft| *soft < needed) {
        eprintln!(
            "rtload: warning: descriptor limit {soft} < ~{needed} needed; connections will fail"
        );
    }
    (fd, note.into_iter().collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_survive_odd_command_names() {
        let stat = "4242 (rt load) (x)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn own_stat_parses() {
        let now = CpuSample::now().unwrap();
        assert!(now.percent_until(&now, 2) == 0.0);
        assert!(now.machine.is_some());
        assert_eq!(now.machine_percent_until(&now), None);
    }

    #[test]
    fn machine_ticks_exclude_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_machine_ticks(stat), Some((170, 990)));
        assert_eq!(parse_machine_ticks("intr 1 2 3"), None);
        let a = CpuSample {
            ticks: 0,
            machine: Some((170, 990)),
            server: None,
            at: Instant::now(),
        };
        let b = CpuSample {
            machine: Some((260, 1090)),
            ..a
        };
        assert_eq!(a.machine_percent_until(&b), Some(90.0));
    }

    #[test]
    fn server_usage_sums_processes_present_at_both_ends() {
        let a = ServerSample::of([(1, 100, 10 << 20), (2, 50, 5 << 20), (3, 7, 1 << 20)]);
        // pid 3 exited, pid 4 appeared: both left out of the CPU sum.
        let b = ServerSample::of([(1, 350, 12 << 20), (2, 60, 6 << 20), (4, 900, 1 << 20)]);
        let u = usage_between(&a, &b, 10.0);
        assert_eq!(u.cpu_seconds, 2.6);
        assert_eq!(u.cores_busy, 0.26);
        assert_eq!(u.pids_measured, 2);
        assert_eq!(u.rss_bytes, 19 << 20);
        assert_eq!(u.rss_start_bytes, 16 << 20);
        let mut text = String::new();
        u.render(&mut text);
        assert!(
            text.starts_with(
                "server        cpu 2.60 s over 10.0 s (0.26 cores busy); rss 19.0 MiB"
            ),
            "{text}"
        );
        // Our own process reads like a server would.
        let own = ServerSample::read(&[std::process::id(), u32::MAX]);
        assert_eq!(own.procs().len(), 1);
        assert!(own.procs()[0].2 > 0);
        assert_eq!(
            ServerSample::of((0..40).map(|p| (p, 0, 0))).len,
            MAX_SERVER_PIDS
        );
    }

    #[test]
    fn limits_parse_numbers_and_unlimited() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 1048576              files     \n";
        assert_eq!(
            parse_limits(text),
            Some(FdLimit {
                soft: Some(1024),
                hard: Some(1_048_576)
            })
        );
        let text = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(
            parse_limits(text),
            Some(FdLimit {
                soft: None,
                hard: None
            })
        );
        assert!(fd_limit().is_some());
    }
}
