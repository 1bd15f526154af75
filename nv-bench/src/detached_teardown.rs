//! Waiting for the kernel's teardown of a VM whose VMM has already exited.
//!
//! After a committed power-fail save the VMM exits at once and leaves the kernel's destruction
//! of its KVM VM and address space to a helper process it `clone`s (`vmm/src/detached_teardown.rs`):
//! a child of the VMM, reparented to init once the VMM is gone, named like the VMM thread that
//! started it. That teardown frees what KVM allocated per memory slot (on this shadow-paging
//! host 8 bytes per 4 KiB page: 128 MiB for a 64 GiB VM) and runs for milliseconds to hundreds
//! of milliseconds after the VMM is reaped. A recovery started at once competes with it for the
//! two cores and the kernel's allocator, while a recovery after a real power failure starts on
//! a freshly booted host with nothing to tear down. Measurements of recovery as such wait for it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};

/// What identifies the teardown helper of a running VMM, read before it is told to exit.
pub struct ExitingVmm {
    pid: u32,
    /// The names of the VMM's threads: the helper carries the one of the thread that cloned it.
    thread_names: HashSet<String>,
}

impl ExitingVmm {
    /// Reads the names of `pid`'s threads (the VMM must still run).
    pub fn before_exit(pid: u32) -> Self {
        let thread_names = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks
                    .filter_map(|task| task.ok())
                    .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
                    .map(|name| name.trim_end().to_string())
                    .collect()
            })
            .unwrap_or_default();
        Self { pid, thread_names }
    }

    /// Waits until no teardown helper of this VMM is alive (a zombie has finished its
    /// teardown), at most `timeout`; how long it waited.
    pub fn wait_for_teardown(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let helpers = self.helpers_alive();
            if helpers.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() >= timeout {
                return Err(BenchError::Command {
                    command: format!("waiting for the VM teardown of VMM {}", self.pid),
                    detail: format!(
                        "processes {helpers:?} still run after {:.1} s",
                        timeout.as_secs_f64()
                    ),
                });
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Live processes that are this VMM's children, or orphans carrying one of its thread names.
    fn helpers_alive(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != self.pid)
            .filter(|pid| {
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                let Some(status) = ProcessStatus::parse(&stat) else {
                    return false;
                };
                status.alive()
                    && (status.parent == self.pid
                        || (status.parent == 1 && self.thread_names.contains(status.name)))
            })
            .collect()
    }
}

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, PartialEq, Eq)]
struct ProcessStatus<'a> {
    name: &'a str,
    state: char,
    parent: u32,
}

impl<'a> ProcessStatus<'a> {
    /// `pid (name) state ppid ...`; the name may itself hold spaces and parentheses.
    fn parse(stat: &'a str) -> Option<Self> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat.get(open + 1..close)?;
        let mut rest = stat.get(close + 1..)?.split_whitespace();
        let state = rest.next()?.chars().next()?;
        let parent = rest.next()?.parse().ok()?;
        Some(Self {
            name,
            state,
            parent,
        })
    }

    /// Not yet exited: a zombie (`Z`) or a dead task (`X`) has run its teardown.
    fn alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_parentheses_in_the_name_parses() {
        let status = ProcessStatus::parse("4242 (vm (x) y) S 1 4242 4242 0 -1").unwrap();
        assert_eq!(
            status,
            ProcessStatus {
                name: "vm (x) y",
                state: 'S',
                parent: 1
            }
        );
        assert!(status.alive());
        assert!(!ProcessStatus::parse("7 (a) Z 1 7").unwrap().alive());
        assert_eq!(ProcessStatus::parse("7 a S 1"), None);
    }

    #[test]
    fn this_process_is_found_as_a_child_of_its_parent() {
        let parent = std::os::unix::process::parent_id();
        let vmm = ExitingVmm {
            pid: parent,
            thread_names: HashSet::new(),
        };
        assert!(vmm.helpers_alive().contains(&std::process::id()));
    }
}
