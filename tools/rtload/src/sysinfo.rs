//! Is the generator itself the bottleneck? Its CPU time (`/proc/self/stat`), its
//! file-descriptor limit (`/proc/self/limits`, raised with `prlimit(1)`: this workspace
//! forbids `unsafe`, so no direct `setrlimit`), and the number of cores.

use std::process::Command;
use std::time::Instant;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`): 100 on every Linux ABI
/// rtload targets (it is fixed for user space and independent of the kernel's HZ).
const USER_HZ: f64 = 100.0;

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Process CPU time (user + system, all threads) and the machine's busy/total CPU time,
/// at a moment.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    ticks: u64,
    machine: Option<(u64, u64)>,
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
            at: Instant::now(),
        };
        let b = CpuSample {
            machine: Some((260, 1090)),
            ..a
        };
        assert_eq!(a.machine_percent_until(&b), Some(90.0));
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
